//! Text input of text-to-image pipelines: CLIP's tokenizer, and prompts read from text files.
//!
//! [`ClipTokenizer`] turns a prompt into the `input_ids` a CLIP text encoder (the one of every
//! Stable Diffusion 1.x/2.x pipeline) takes: exactly what transformers' `CLIPTokenizer(text,
//! padding="max_length", max_length=77, truncation=True).input_ids` gives, with the text that
//! did not fit reported in [`Encoded::truncated`].
//!
//! # Why our own code, not the `tokenizers` crate
//! - **Dependency weight.** `tokenizers` with its default features compiles Oniguruma (C) and
//!   esaxx (C++) from source and pulls rayon, indicatif and four model types with their
//!   trainers: a C/C++ toolchain in every build (cross-compiling for a Jetson included) and a
//!   large dependency tree, for one small algorithm. Here it is std, `regex`
//!   (already in the tree; only its Unicode general-category tables are added, for `\p{L}` and
//!   `\p{N}`) and `unicode-normalization` (the NFC tables).
//! - **Exactness.** CLIP's tokenisation is small and fully specified by transformers'
//!   `tokenization_clip.py` (NFC, whitespace runs to one space, per-character lower-casing,
//!   CLIP's split pattern, byte-level BPE with a `</w>` end-of-word suffix, added tokens matched
//!   before and after normalisation). Each step is written out and commented below, and the
//!   parity test (`tests/test_tokenizer.py`) compares ids with transformers on over a thousand
//!   strings and on every assigned Unicode code point (sampled in the large ideograph
//!   blocks), so a difference shows up as a test failure rather than hiding in a
//!   general-purpose library's configuration.
//! - **Speed.** Only the prompt's first 77 tokens are needed: encoding stops at the first token
//!   past the limit, so the BPE work of a long prompt is that of what fits (the rest is only
//!   lower-cased and NFC-checked); merges run on token ids with a priority queue (n log n in a
//!   word's length, not n²), and words are cached.
//!
//! # Which reference, and why (transformers 5, no ftfy)
//! transformers 4.x (to 4.57) had two CLIP tokenizers: a slow Python one that ran `ftfy.fix_text` when
//! ftfy was importable and a BERT-style `BasicTokenizer` clean-up otherwise (which also put
//! spaces around CJK characters and dropped control characters), and a fast one backed by
//! `tokenizers`. transformers 5 (the one that installs beside diffusers 0.42, which needs
//! huggingface-hub 1.x) has only the second: `CLIPTokenizer` *is* the tokenizers-backed one, and
//! no ftfy is involved whatever is installed. That is what diffusers' pipelines run with today,
//! so it is the reference matched here. (The ftfy path could not be matched anyway: ftfy is a
//! large heuristic mojibake fixer with no Rust port.) The test still blocks `ftfy` in its
//! reference process, so that a future transformers which brought the slow path back could not
//! silently switch the reference.

mod clip_tokenizer;
mod folder;

pub use clip_tokenizer::{ClipTokenizer, Encoded};

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The lines of a prompt file (or of standard input), one prompt per line, read as they come.
///
/// Lines end at `\n`; one `\r` before it is dropped (files written on Windows). A line that is
/// not UTF-8 is an [`Error::BadInput`] naming `source` and the line number (from 1); the lines
/// before it have been yielded by then. An empty line is an empty prompt.
///
/// ```
/// use std::path::Path;
/// let lines: Vec<_> = edgediff::text::prompt_lines(&b"a cat\r\n\nb\xffd\n"[..], Path::new("p.txt")).collect();
/// assert_eq!(lines[0].as_deref().unwrap(), "a cat");
/// assert_eq!(lines[1].as_deref().unwrap(), "");
/// let err = lines[2].as_ref().unwrap_err().to_string();
/// assert!(err.contains("p.txt") && err.contains("line 3"), "{err}");
/// ```
pub fn prompt_lines<'a, R: BufRead + 'a>(
    mut reader: R,
    source: &'a Path,
) -> impl Iterator<Item = Result<String>> + 'a {
    let mut number = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                failed = true;
                return Some(Err(Error::io(format!("reading {}", source.display()))(e)));
            }
        }
        number += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        Some(String::from_utf8(line).map_err(|e| {
            // Stop after the first bad line: a binary file would otherwise report every line.
            failed = true;
            let at = e.utf8_error().valid_up_to();
            Error::BadInput {
                path: PathBuf::from(source),
                detail: format!(
                    "line {number} is not UTF-8 text (byte 0x{:02x} at byte {} of the line); prompts must be UTF-8",
                    e.as_bytes()[at],
                    at + 1
                ),
            }
        }))
    })
}

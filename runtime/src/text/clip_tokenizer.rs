//! CLIP's byte-level BPE tokenizer (see the module docs of [`crate::text`] for the reference it
//! matches and why it is our own code).
//!
//! The steps, each as transformers 5's `CLIPTokenizer` (tokenizers-backed) does them:
//! 1. **Added tokens on the raw text.** Special tokens (`<|startoftext|>`, `<|endoftext|>`, SD
//!    2.x's pad `!`) and other added tokens not marked `normalized` are cut out of the text
//!    first, leftmost-longest, and become their ids directly. `a<|endoftext|>b` is `a`, 49407,
//!    `b`; `<|ENDOFTEXT|>` is not a match and is tokenised as text.
//! 2. **Normalisation** of each piece between them: Unicode NFC, every run of whitespace
//!    (Unicode `White_Space`) to one space, then lower-casing character by character (Rust's
//!    `char::to_lowercase`: `Σ` is always `σ`, never the final `ς` that Python's `str.lower`
//!    would choose). Nothing is dropped: control characters, U+FFFD and zero-width characters
//!    stay and are tokenised as punctuation.
//! 3. **Added tokens marked `normalized`** (textual-inversion tokens) are cut out of the
//!    normalised text, matched in their own normalised form.
//! 4. **Pre-tokenisation** by CLIP's pattern: the two special tokens' text,
//!    `'s|'t|'re|'ve|'m|'ll|'d`, runs of letters `\p{L}+`, single digits `\p{N}` (so "2024" is
//!    four tokens), runs of anything else but space; spaces separate and vanish. transformers
//!    then applies GPT-2's byte-level split to each piece, which changes only the special
//!    tokens' text (the one piece that mixes letters and punctuation): `<|endoftext|>` becomes
//!    `<|`, `endoftext`, `|>`. (It still matters that the pattern matched it whole: in
//!    `<|endoftext|>!!` the `!!` stays a word of its own rather than joining `|>`.)
//! 5. **Byte-level BPE** on each word: its UTF-8 bytes as GPT-2's printable byte symbols, the
//!    last one with the end-of-word suffix `</w>`, then the merge rules applied best rank first
//!    (leftmost among equals) until none applies.
//! 6. **Framing**: `bos`, the first `max_length - 2` tokens, `eos`, then `pad` up to
//!    `max_length`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::{Error, Result};

/// The special tokens of every CLIP vocabulary.
pub(super) const BOS: &str = "<|startoftext|>";
pub(super) const EOS: &str = "<|endoftext|>";
/// CLIP's context length, the default `max_length`.
pub(super) const DEFAULT_MAX_LENGTH: usize = 77;
/// The largest `max_length` accepted (CLIP variants with long contexts use a few hundred).
pub(super) const MAX_MAX_LENGTH: usize = 65_536;
const SUFFIX: &str = "</w>";

/// CLIP's pre-tokenisation pattern, on text whose whitespace is already single spaces (so
/// `[^ ...]` is the `[^\s ...]` of the original; see step 4 of the module docs).
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^ \p{L}\p{N}]+";

/// Words up to this many bytes are cached (longer ones are rare and would bloat the cache).
const CACHE_WORD_BYTES: usize = 64;
/// Entries kept in the word cache; past it, new words are merged but not stored (as
/// tokenizers' BPE cache does), so memory stays bounded whatever the prompts.
const CACHE_ENTRIES: usize = 20_000;

/// A token matched as a whole before BPE (special tokens, textual-inversion tokens).
#[derive(Debug, Clone)]
pub(super) struct AddedToken {
    pub content: String,
    pub id: u32,
    /// Matched in the normalised text (in its own normalised form) rather than the raw text.
    pub normalized: bool,
}

/// Which part of a tokenizer's files a problem is in (for naming the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Culprit {
    /// A merge rule (merges.txt, or tokenizer.json's `model.merges`).
    Merges,
    /// A special or added token (special_tokens_map.json, tokenizer_config.json...).
    Specials,
}

/// Everything a tokenizer is built from, whichever files it came from.
pub(super) struct Parts {
    pub vocab: HashMap<String, u32>,
    /// Merge rules, best (rank 0) first.
    pub merges: Vec<(String, String)>,
    pub max_length: usize,
    pub bos: String,
    pub eos: String,
    pub pad: String,
    pub unk: Option<String>,
    /// The added tokens, special ones included (a token that is only in `vocab` is not here).
    pub added: Vec<AddedToken>,
}

/// A prompt encoded for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `bos`, the tokens, `eos`, padding: exactly [`ClipTokenizer::max_length`] ids.
    pub ids: Vec<i64>,
    /// The text cut off at the end (None if it fit): the prompt from the first character of the
    /// first dropped token on, as the caller wrote it (not lower-cased). Where that token lies in
    /// a word that NFC changes (decomposed accents), from the start of that word.
    pub truncated: Option<String>,
}

impl Encoded {
    /// A warning for the user when the prompt did not fit (None if it did), naming what was
    /// dropped: `the prompt is longer than 77 tokens; dropped: 'and a red hat'`. Control
    /// characters are escaped, and a long remainder is shortened with the count left out.
    pub fn warning(&self) -> Option<String> {
        const SHOWN: usize = 200;
        let dropped = self.truncated.as_deref()?;
        let mut shown: String = dropped
            .chars()
            .take(SHOWN)
            .map(|c| {
                if c.is_control() {
                    c.escape_debug().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect();
        let rest = dropped.chars().count().saturating_sub(SHOWN);
        if rest > 0 {
            shown.push_str(&format!("... ({rest} more characters)"));
        }
        Some(format!(
            "the prompt is longer than {} tokens; dropped: '{shown}'",
            self.ids.len()
        ))
    }
}

/// CLIP's tokenizer: the `input_ids` of a prompt for a CLIP text encoder, identical to
/// transformers' `CLIPTokenizer(text, padding="max_length", max_length=77,
/// truncation=True).input_ids`.
///
/// Built from a tokenizer folder ([`from_dir`](Self::from_dir)), from `vocab.json` and
/// `merges.txt` ([`from_files`](Self::from_files)), or from a vocabulary in memory
/// ([`new`](Self::new), as here: a toy vocabulary whose merges make "low" and "lowest" single
/// tokens, byte symbols for the rest):
///
/// ```
/// use std::collections::HashMap;
/// use edgediff::text::ClipTokenizer;
///
/// let mut tokens: Vec<String> = vec![];
/// // The byte symbols, with and without the end-of-word suffix (printable ASCII is itself).
/// for c in ('!'..='~').map(String::from) {
///     tokens.push(c.clone());
///     tokens.push(c + "</w>");
/// }
/// let merges = [("l", "o"), ("lo", "w</w>"), ("lo", "w"), ("e", "s"), ("es", "t</w>"), ("low", "est</w>")];
/// tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
/// tokens.extend(["<|startoftext|>".into(), "<|endoftext|>".into()]);
/// let vocab: HashMap<String, i64> = tokens.iter().cloned().zip(0..).collect();
/// let merges = merges.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
/// let tok = ClipTokenizer::new(vocab.clone(), merges, 8, "<|endoftext|>")?;
///
/// let e = tok.encode("Low LOWEST lo");
/// let id = |t: &str| vocab[t];
/// // "lo" at a word's end is "l" + "o</w>": no rule merges those.
/// assert_eq!(e.ids, [tok.bos_id(), id("low</w>"), id("lowest</w>"), id("l"), id("o</w>"),
///                    tok.eos_id(), tok.pad_id(), tok.pad_id()]);
/// assert_eq!(e.truncated, None);
///
/// // Too long: 8 ids hold 6 tokens; the rest is reported as written.
/// let e = tok.encode("low low low low low low Low low");
/// assert_eq!(e.ids.len(), 8);
/// assert_eq!(e.truncated.as_deref(), Some("Low low"));
/// assert!(e.warning().unwrap().contains("dropped: 'Low low'"));
/// # Ok::<(), edgediff::Error>(())
/// ```
pub struct ClipTokenizer {
    /// Merge rules by the ids of their halves: (rank, id of the merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's symbol inside a word and at its end (with `</w>`); None when the
    /// vocabulary lacks it (only toy vocabularies do), then the unknown token stands in.
    byte_mid: [Option<u32>; 256],
    byte_end: [Option<u32>; 256],
    unk: Option<u32>,
    /// Added tokens matched in the raw text, and (normalised patterns) in the normalised text.
    added_raw: Vec<(String, u32)>,
    added_norm: Vec<(String, u32)>,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
    vocab_size: usize,
    pattern: Regex,
    /// BPE results of words seen before.
    cache: Mutex<WordCache>,
}

/// A word's bytes -> its tokens as (id, start of the token in the word's bytes).
type WordCache = HashMap<Box<[u8]>, Box<[(u32, u32)]>>;

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("merges", &self.merges.len())
            .field("max_length", &self.max_length)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field(
                "added_tokens",
                &(self.added_raw.len() + self.added_norm.len()),
            )
            .finish_non_exhaustive()
    }
}

/// GPT-2's (and CLIP's) reversible byte -> character table: printable Latin-1 bytes stand for
/// themselves, the other 68 (controls, space, 0x7f..=0xa0, 0xad) are moved to U+0100 upwards in
/// byte order, so that no symbol is whitespace or a control character.
pub(super) fn byte_symbols() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        *slot = if printable {
            char::from(b as u8)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("U+0100..U+0143 are characters")
        };
    }
    table
}

/// Step 2: NFC, whitespace runs to one space, per-character lower-casing. Returns the text and,
/// for each of its bytes, the offset in `text` (plus `base`) of the character it came from.
///
/// NFC is applied word by word (between whitespace): no canonical composition involves a
/// whitespace character, and NFC turns whitespace only into whitespace (U+2000/U+2001 into
/// U+2002/U+2003), so this equals NFC of the whole text. Where NFC changes a word, its
/// characters map to the word's start (the exact origin of a composed character is not kept).
pub(super) fn normalize(text: &str, base: usize) -> (String, Vec<usize>) {
    fn push(out: &mut String, offs: &mut Vec<usize>, c: char, at: usize) {
        for l in c.to_lowercase() {
            out.push(l);
            offs.resize(out.len(), at);
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut offs = Vec::with_capacity(text.len());
    let mut rest = text;
    let mut pos = base;
    while !rest.is_empty() {
        let ws = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        if ws > 0 {
            out.push(' ');
            offs.push(pos);
            rest = &rest[ws..];
            pos += ws;
            continue;
        }
        let word_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..word_len];
        let composed = match is_nfc_quick(word.chars()) {
            IsNormalized::Yes => None,
            _ => Some(word.nfc().collect::<String>()).filter(|n| n != word),
        };
        match composed {
            None => {
                for (i, c) in word.char_indices() {
                    push(&mut out, &mut offs, c, pos + i);
                }
            }
            Some(n) => {
                for c in n.chars() {
                    push(&mut out, &mut offs, c, pos);
                }
            }
        }
        rest = &rest[word_len..];
        pos += word_len;
    }
    (out, offs)
}

/// GPT-2's byte-level split of one CLIP word (see step 4): the special tokens' text in three,
/// every other word whole. Yields (offset in the word, part).
fn byte_level_split(word: &str) -> impl Iterator<Item = (usize, &str)> {
    let n = word.len();
    let parts = if word == BOS || word == EOS {
        [
            (0, &word[..2]),
            (2, &word[2..n - 2]),
            (n - 2, &word[n - 2..]),
        ]
    } else {
        [(0, word), (n, ""), (n, "")]
    };
    parts.into_iter().filter(|(_, p)| !p.is_empty())
}

/// A piece of text between added tokens, or an added token: what [`split_added`] yields.
enum Piece {
    /// `text[start..end]`.
    Text(usize, usize),
    /// An added token's id, and where it starts.
    Token(u32, usize),
}

/// Cuts the added tokens out of `text`, leftmost-longest (as tokenizers' AddedVocabulary),
/// calling `f` on each piece in order. Empty text pieces are not reported.
fn split_added(
    text: &str,
    tokens: &[(String, u32)],
    f: &mut dyn FnMut(Piece) -> ControlFlow<()>,
) -> ControlFlow<()> {
    if tokens.is_empty() {
        return if text.is_empty() {
            ControlFlow::Continue(())
        } else {
            f(Piece::Text(0, text.len()))
        };
    }
    let mut start = 0;
    let mut at = 0;
    let bytes = text.as_bytes();
    while at < text.len() {
        // Only positions whose byte starts some token can match (and those are char boundaries).
        let longest = tokens
            .iter()
            .filter(|(t, _)| bytes[at..].starts_with(t.as_bytes()))
            .max_by_key(|(t, _)| t.len());
        match longest {
            Some((t, id)) => {
                if start < at {
                    f(Piece::Text(start, at))?;
                }
                f(Piece::Token(*id, at))?;
                at += t.len();
                start = at;
            }
            None => at += 1,
        }
    }
    if start < text.len() {
        f(Piece::Text(start, text.len()))?;
    }
    ControlFlow::Continue(())
}

impl ClipTokenizer {
    /// A tokenizer folder as diffusers and optimum write it: `vocab.json` and `merges.txt` (or
    /// `tokenizer.json`, which transformers 5 writes instead and reads first when present),
    /// `tokenizer_config.json` (`model_max_length`, default 77) and `special_tokens_map.json`
    /// (the bos, eos, pad and unk tokens; pad is `<|endoftext|>` in SD 1.x, `!` in SD 2.x).
    /// Added tokens (textual inversion) in `tokenizer.json`, in `tokenizer_config.json`'s
    /// `added_tokens_decoder` or in `added_tokens.json` are matched whole, as transformers does.
    ///
    /// A missing, unreadable or malformed file is an [`Error::ModelFile`] naming the file and what
    /// is wrong with it (a tokenizer is part of a model: exit 3, as a missing graph).
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        let (parts, source) = super::folder::read_dir(dir)?;
        Self::build(parts).map_err(|(culprit, detail)| Error::ModelFile {
            path: source.path(culprit),
            detail,
        })
    }

    /// From `vocab.json` (token -> id) and `merges.txt` (a `#version` header line, then one
    /// merge rule "a b" per line, best first), with `<|startoftext|>` and `<|endoftext|>` as bos
    /// and eos (and unk), and `pad_token` (which must be in the vocabulary) as padding.
    pub fn from_files(
        vocab_json: &Path,
        merges_txt: &Path,
        max_length: usize,
        pad_token: &str,
    ) -> Result<ClipTokenizer> {
        check_max_length(max_length)?;
        let vocab = super::folder::read_vocab_json(vocab_json)?;
        let merges = super::folder::read_merges_txt(merges_txt)?;
        let parts = plain_parts(vocab, merges, max_length, pad_token);
        Self::build(parts).map_err(|(culprit, detail)| Error::ModelFile {
            path: match culprit {
                Culprit::Merges => merges_txt,
                Culprit::Specials => vocab_json,
            }
            .to_path_buf(),
            detail,
        })
    }

    /// From a vocabulary and merge rules in memory (best first), with `<|startoftext|>` and
    /// `<|endoftext|>` as bos and eos, and `pad_token` as padding; all three must be in `vocab`.
    pub fn new(
        vocab: HashMap<String, i64>,
        merges: Vec<(String, String)>,
        max_length: usize,
        pad_token: &str,
    ) -> Result<ClipTokenizer> {
        check_max_length(max_length)?;
        let mut ids = HashMap::with_capacity(vocab.len());
        for (token, id) in vocab {
            let id = u32::try_from(id).map_err(|_| {
                Error::invalid(format!("vocabulary id {id} of {token:?} is not in 0..2^32"))
            })?;
            ids.insert(token, id);
        }
        Self::build(plain_parts(ids, merges, max_length, pad_token))
            .map_err(|(_, detail)| Error::invalid(detail))
    }

    /// The ids' count of every [`encode`](Self::encode): the text encoder's sequence length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id (49407 `<|endoftext|>` in SD 1.x, 0 `!` in SD 2.x).
    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad)
    }

    /// The id that starts every sequence (`<|startoftext|>`, 49406 in CLIP's vocabulary).
    pub fn bos_id(&self) -> i64 {
        i64::from(self.bos)
    }

    /// The id that ends every sequence's tokens (`<|endoftext|>`, 49407).
    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos)
    }

    /// `bos` + the prompt's tokens + `eos`, truncated to `max_length` (eos kept last) and padded
    /// with `pad` to `max_length`: exactly transformers' `CLIPTokenizer(text,
    /// padding="max_length", max_length=77, truncation=True).input_ids`. What did not fit is in
    /// [`Encoded::truncated`].
    pub fn encode(&self, text: &str) -> Encoded {
        let room = self.max_length - 2;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(i64::from(self.bos));
        let mut cut = None;
        let _ = self.tokens(text, &mut |id, at| {
            if ids.len() > room {
                cut = Some(at);
                return ControlFlow::Break(());
            }
            ids.push(i64::from(id));
            ControlFlow::Continue(())
        });
        ids.push(i64::from(self.eos));
        ids.resize(self.max_length, i64::from(self.pad));
        Encoded {
            ids,
            truncated: cut.map(|at| text[at..].to_string()),
        }
    }

    /// Calls `f(id, start)` on each token of `text` in order (`start`: the byte offset in `text`
    /// of the character the token begins in) until it breaks.
    fn tokens(
        &self,
        text: &str,
        f: &mut dyn FnMut(u32, usize) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        split_added(text, &self.added_raw, &mut |piece| match piece {
            Piece::Token(id, at) => f(id, at),
            Piece::Text(start, end) => {
                let (norm, offs) = normalize(&text[start..end], start);
                split_added(&norm, &self.added_norm, &mut |piece| match piece {
                    Piece::Token(id, at) => f(id, offs[at]),
                    Piece::Text(s, e) => {
                        for word in self.pattern.find_iter(&norm[s..e]) {
                            let first = s + word.start();
                            for (at, part) in byte_level_split(word.as_str()) {
                                let first = first + at;
                                self.bpe(part.as_bytes(), &mut |id, at| f(id, offs[first + at]))?;
                            }
                        }
                        ControlFlow::Continue(())
                    }
                })
            }
        })
    }

    /// Step 5 on one word: its tokens as (id, start in the word's bytes), from the cache when
    /// the word was seen before.
    fn bpe(
        &self,
        word: &[u8],
        f: &mut dyn FnMut(u32, usize) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let cacheable = word.len() <= CACHE_WORD_BYTES;
        if cacheable {
            // `f` only collects ids (it never reaches the cache), so it may run under the lock.
            let cache = self.lock_cache();
            if let Some(tokens) = cache.get(word) {
                return tokens.iter().try_for_each(|&(id, at)| f(id, at as usize));
            }
        }
        let tokens = self.merge_word(word);
        for &(id, at) in &tokens {
            f(id, at as usize)?;
        }
        if cacheable {
            let mut cache = self.lock_cache();
            if cache.len() < CACHE_ENTRIES {
                cache.insert(word.into(), tokens.into_boxed_slice());
            }
        }
        ControlFlow::Continue(())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, WordCache> {
        // A panic while holding the lock cannot leave a half-written entry (insert is one call),
        // so a poisoned cache is still a valid one.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The merges of one word, as tokenizers' BPE does them: a priority queue of adjacent pairs
    /// ordered by (rank, position); the best is merged, its neighbours' new pairs are queued, and
    /// entries whose pair has changed since they were queued are skipped. n log n in the word's
    /// length, so a long run of letters costs little.
    fn merge_word(&self, word: &[u8]) -> Vec<(u32, u32)> {
        struct Symbol {
            id: u32,
            start: u32,
            prev: usize,
            next: usize,
            alive: bool,
        }
        const NONE: usize = usize::MAX;
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for (i, &b) in word.iter().enumerate() {
            let table = if i + 1 == word.len() {
                &self.byte_end
            } else {
                &self.byte_mid
            };
            // A byte without a symbol becomes the unknown token, or vanishes without one (as
            // tokenizers does); CLIP's vocabulary has them all.
            let Some(id) = table[usize::from(b)].or(self.unk) else {
                continue;
            };
            let n = symbols.len();
            symbols.push(Symbol {
                id,
                start: i as u32,
                prev: if n == 0 { NONE } else { n - 1 },
                next: n + 1,
                alive: true,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        for (i, pair) in symbols.windows(2).enumerate() {
            if let Some(&(rank, merged)) = self.merges.get(&(pair[0].id, pair[1].id)) {
                queue.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((_, i, merged))) = queue.pop() {
            let next = symbols[i].next;
            if !symbols[i].alive || next == NONE {
                continue;
            }
            // Still the pair that was queued? (Either half may have merged with another since.)
            match self.merges.get(&(symbols[i].id, symbols[next].id)) {
                Some(&(_, m)) if m == merged => {}
                _ => continue,
            }
            symbols[i].id = merged;
            symbols[next].alive = false;
            let after = symbols[next].next;
            symbols[i].next = after;
            if after != NONE {
                symbols[after].prev = i;
            }
            let prev = symbols[i].prev;
            if prev != NONE {
                if let Some(&(rank, m)) = self.merges.get(&(symbols[prev].id, merged)) {
                    queue.push(Reverse((rank, prev, m)));
                }
            }
            if after != NONE {
                if let Some(&(rank, m)) = self.merges.get(&(merged, symbols[after].id)) {
                    queue.push(Reverse((rank, i, m)));
                }
            }
        }
        symbols
            .iter()
            .filter(|s| s.alive)
            .map(|s| (s.id, s.start))
            .collect()
    }

    /// Checks the parts and builds the lookup tables; the error says which part is at fault and
    /// the detail of the message.
    pub(super) fn build(parts: Parts) -> std::result::Result<ClipTokenizer, (Culprit, String)> {
        let Parts {
            vocab,
            merges,
            max_length,
            bos,
            eos,
            pad,
            unk,
            added,
        } = parts;
        let lookup = |token: &str, role: &str| -> std::result::Result<u32, (Culprit, String)> {
            added
                .iter()
                .find(|a| a.content == token)
                .map(|a| a.id)
                .or_else(|| vocab.get(token).copied())
                .ok_or_else(|| {
                    (Culprit::Specials, format!("the {role} token {token:?} is neither in the vocabulary nor an added token"))
                })
        };
        let (bos, eos, pad) = (
            lookup(&bos, "bos")?,
            lookup(&eos, "eos")?,
            lookup(&pad, "pad")?,
        );
        let unk = unk.map(|u| lookup(&u, "unk")).transpose()?;
        let symbols = byte_symbols();
        let mut byte_mid = [None; 256];
        let mut byte_end = [None; 256];
        for (b, c) in symbols.iter().enumerate() {
            byte_mid[b] = vocab.get(c.to_string().as_str()).copied();
            byte_end[b] = vocab.get(format!("{c}{SUFFIX}").as_str()).copied();
        }
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    (Culprit::Merges, format!("merge rule {} ({a:?} {b:?}): {t:?} is not in the vocabulary (vocabulary and merges of different tokenizers?)", rank + 1))
                })
            };
            let pair = (id(a)?, id(b)?);
            let merged = id(&format!("{a}{b}"))?;
            // A repeated rule keeps its first (best) rank, as tokenizers does.
            table.entry(pair).or_insert((rank as u32, merged));
        }
        let normalized_pattern = |t: &AddedToken| (normalize(&t.content, 0).0, t.id);
        let mut added_raw = vec![];
        let mut added_norm = vec![];
        for t in &added {
            if t.content.is_empty() {
                return Err((Culprit::Specials, format!("added token {} is empty", t.id)));
            }
            if t.normalized {
                added_norm.push(normalized_pattern(t));
            } else {
                added_raw.push((t.content.clone(), t.id));
            }
        }
        Ok(ClipTokenizer {
            merges: table,
            byte_mid,
            byte_end,
            unk,
            added_raw,
            added_norm,
            bos,
            eos,
            pad,
            max_length,
            vocab_size: vocab.len(),
            pattern: Regex::new(PATTERN).expect("the CLIP pattern compiles"),
            cache: Mutex::new(HashMap::new()),
        })
    }
}

/// `max_length` as a caller gives it: room for bos and eos, and not absurdly large.
fn check_max_length(max_length: usize) -> Result<()> {
    if (2..=MAX_MAX_LENGTH).contains(&max_length) {
        Ok(())
    } else {
        Err(Error::out_of_range(
            "max_length",
            max_length,
            &format!("is outside 2..={MAX_MAX_LENGTH}"),
        ))
    }
}

/// The parts of a bare vocabulary: CLIP's bos/eos (eos also unk, when the vocabulary has it)
/// and `pad`, each a special token matched in the raw text, as transformers sets them up from
/// plain strings.
fn plain_parts(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    max_length: usize,
    pad: &str,
) -> Parts {
    let mut added: Vec<AddedToken> = vec![];
    for t in [BOS, EOS, pad] {
        if let Some(&id) = vocab.get(t) {
            if !added.iter().any(|a| a.content == t) {
                added.push(AddedToken {
                    content: t.to_string(),
                    id,
                    normalized: false,
                });
            }
        }
    }
    let unk = vocab.contains_key(EOS).then(|| EOS.to_string());
    Parts {
        vocab,
        merges,
        max_length,
        bos: BOS.into(),
        eos: EOS.into(),
        pad: pad.into(),
        unk,
        added,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: all byte symbols with and without `</w>`, the merged tokens of `merges`
    /// in order, then bos and eos.
    fn toy(merges: &[(&str, &str)], max_length: usize) -> (ClipTokenizer, HashMap<String, i64>) {
        let mut tokens: Vec<String> = vec![];
        for c in byte_symbols() {
            tokens.push(c.to_string());
            tokens.push(format!("{c}</w>"));
        }
        for (a, b) in merges {
            tokens.push(format!("{a}{b}"));
        }
        tokens.push(BOS.into());
        tokens.push(EOS.into());
        let vocab: HashMap<String, i64> = tokens.into_iter().zip(0..).collect();
        let merges = merges
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        (
            ClipTokenizer::new(vocab.clone(), merges, max_length, EOS).unwrap(),
            vocab,
        )
    }

    fn content(tok: &ClipTokenizer, text: &str) -> Vec<i64> {
        let e = tok.encode(text);
        let end = e.ids.iter().position(|&i| i == tok.eos_id()).unwrap();
        e.ids[1..end].to_vec()
    }

    #[test]
    fn merges_apply_by_rank_not_by_position() {
        // "abc": (b, c) ranks before (a, b), so "bc" forms first and "ab" never can.
        let (tok, v) = toy(&[("b", "c</w>"), ("a", "b")], 77);
        assert_eq!(content(&tok, "abc"), [v["a"], v["bc</w>"]]);
        // With the ranks the other way round, "ab" wins and then merges on with "c</w>".
        let (tok, v) = toy(&[("a", "b"), ("b", "c</w>"), ("ab", "c</w>")], 77);
        assert_eq!(content(&tok, "abc"), [v["abc</w>"]]);
    }

    #[test]
    fn equal_pairs_merge_leftmost_first() {
        // "aaa" with only (a, a): the left pair merges, the last "a</w>" stays alone.
        let (tok, v) = toy(&[("a", "a"), ("a", "a</w>")], 77);
        assert_eq!(content(&tok, "aaa"), [v["aa"], v["a</w>"]]);
        // Four: two "aa" pairs; the second ends the word, so it is (a, a</w>).
        assert_eq!(content(&tok, "aaaa"), [v["aa"], v["aa</w>"]]);
    }

    #[test]
    fn end_of_word_suffix_separates_words() {
        // "lo" inside a word is not "lo</w>" at its end.
        let (tok, v) = toy(&[("l", "o"), ("l", "o</w>")], 77);
        assert_eq!(content(&tok, "lo lol"), [v["lo</w>"], v["lo"], v["l</w>"]]);
    }

    #[test]
    fn pre_tokenisation_splits_as_clip() {
        let (tok, v) = toy(&[], 77);
        let sym = |s: &str| v[s];
        // Digits one by one; a contraction is its own word; punctuation runs stay together.
        assert_eq!(
            content(&tok, "a1!?"),
            [sym("a</w>"), sym("1</w>"), sym("!"), sym("?</w>")]
        );
        assert_eq!(content(&tok, "X's"), [sym("x</w>"), sym("'"), sym("s</w>")]);
        // The special token written exactly is its id; in another case it is plain text.
        let e = tok.encode("a<|endoftext|>b");
        assert_eq!(
            e.ids[..4],
            [tok.bos_id(), sym("a</w>"), tok.eos_id(), sym("b</w>")]
        );
        assert_eq!(content(&tok, "<|ENDOFTEXT|>").len(), "<|endoftext|>".len());
    }

    #[test]
    fn truncation_keeps_eos_and_reports_the_original_text() {
        let (tok, _) = toy(&[], 6);
        let e = tok.encode("ab CDé");
        // 4 tokens fit: a b c d; the two bytes of é are dropped and reported whole.
        assert_eq!(e.ids.len(), 6);
        assert_eq!(*e.ids.last().unwrap(), tok.eos_id());
        assert_eq!(e.truncated.as_deref(), Some("é"));
        assert_eq!(tok.encode("ab cd").truncated, None);
        // Exactly full is not truncated.
        assert_eq!(tok.encode("abcd").truncated, None);
        assert!(tok
            .encode("abcd\tE")
            .warning()
            .unwrap()
            .ends_with("dropped: 'E'"));
    }

    #[test]
    fn normalisation_composes_and_lowercases_with_offsets() {
        let (n, offs) = normalize("E\u{301}  ΣA\tx", 10);
        assert_eq!(n, "é σa x");
        // The composed é maps to its word's start; the rest to their own characters.
        assert_eq!(offs[0], 10);
        assert_eq!(offs[n.find('σ').unwrap()], 15);
        assert_eq!(offs[n.find('x').unwrap()], 19);
    }

    #[test]
    fn warning_escapes_and_shortens() {
        let e = Encoded {
            ids: vec![0; 77],
            truncated: Some("a\nb".into()),
        };
        assert_eq!(
            e.warning().unwrap(),
            "the prompt is longer than 77 tokens; dropped: 'a\\nb'"
        );
        let long = Encoded {
            ids: vec![0; 77],
            truncated: Some("x".repeat(250)),
        };
        assert!(long
            .warning()
            .unwrap()
            .ends_with("... (50 more characters)'"));
        assert_eq!(
            Encoded {
                ids: vec![],
                truncated: None
            }
            .warning(),
            None
        );
    }

    #[test]
    fn shareable_between_threads() {
        // The pipeline may hold one tokenizer in a model shared by threads (the C API's).
        fn check<T: Send + Sync>() {}
        check::<ClipTokenizer>();
    }

    #[test]
    fn bad_parts_are_refused() {
        let vocab: HashMap<String, i64> = [("a".to_string(), 0)].into_iter().collect();
        let e = ClipTokenizer::new(vocab.clone(), vec![], 77, EOS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bos token"), "{e}");
        let e = ClipTokenizer::new(vocab, vec![], 1, EOS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_length 1"), "{e}");
    }
}

//! `edgediff tokenize`: prompts in, CLIP token ids out, one line each; the debugging view of
//! what a text encoder is given, and how the parity test drives the tokenizer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use argh::FromArgs;

use edgediff::text::{prompt_lines, ClipTokenizer};
use edgediff::{Error, Result};

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "tokenize")]
/// Tokenize prompts as a CLIP text encoder gets them: reads one prompt per line (UTF-8) from
/// standard input, prints one JSON array of token ids per line (bos, tokens, eos, padding to
/// the tokenizer's max length), each line as soon as its prompt is read.
pub(super) struct TokenizeCmd {
    /// tokenizer folder (vocab.json and merges.txt, or tokenizer.json, beside
    /// tokenizer_config.json), or a pipeline folder holding one as tokenizer/
    #[argh(option)]
    tokenizer: PathBuf,
    /// print {"ids": [...], "truncated": null or the text that did not fit} per line
    #[argh(switch)]
    json: bool,
    /// read each line as a JSON string, for prompts holding newlines or other control characters
    #[argh(switch)]
    json_input: bool,
}

pub(super) fn tokenize(cmd: TokenizeCmd) -> Result<()> {
    let nested = cmd.tokenizer.join("tokenizer");
    let dir = if nested.is_dir() && !has_vocabulary(&cmd.tokenizer) {
        nested
    } else {
        cmd.tokenizer
    };
    let tok = ClipTokenizer::from_dir(&dir)?;
    let stdin = std::io::stdin();
    let source = Path::new("<stdin>");
    let mut out = std::io::stdout().lock();
    // Time in encode alone (not reading, JSON, writing), logged at the end: RUST_LOG=info.
    let mut encoding = Duration::ZERO;
    let mut prompts = 0usize;
    for (i, line) in prompt_lines(stdin.lock(), source).enumerate() {
        let line = line?;
        let prompt = if cmd.json_input {
            json_string(&line, i + 1, source)?
        } else {
            line
        };
        let start = Instant::now();
        let e = tok.encode(&prompt);
        encoding += start.elapsed();
        prompts += 1;
        let text = if cmd.json {
            serde_json::json!({ "ids": e.ids, "truncated": e.truncated }).to_string()
        } else {
            serde_json::Value::from(e.ids).to_string()
        };
        // One write and a flush per prompt: a program talking to us line by line gets each
        // answer before it sends the next prompt.
        writeln!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(Error::io("writing the token ids"))?;
    }
    log::info!(
        "encoded {prompts} prompts in {:.6} s ({:.2} us per prompt)",
        encoding.as_secs_f64(),
        encoding.as_secs_f64() * 1e6 / prompts.max(1) as f64
    );
    Ok(())
}

fn has_vocabulary(dir: &Path) -> bool {
    dir.join("tokenizer.json").exists() || dir.join("vocab.json").exists()
}

/// A `--json-input` line: one JSON string.
fn json_string(line: &str, number: usize, source: &Path) -> Result<String> {
    serde_json::from_str::<String>(line).map_err(|e| Error::BadInput {
        path: source.to_path_buf(),
        detail: format!("line {number} is not a JSON string: {e}"),
    })
}

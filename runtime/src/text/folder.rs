//! Reading a tokenizer folder: the files transformers (4 and 5), diffusers and optimum write.
//!
//! Two layouts hold the vocabulary:
//! - `tokenizer.json` (transformers 5 writes only this, with `tokenizer_config.json`): the
//!   tokenizers library's serialisation, with the vocabulary, the merges and the added tokens
//!   with their flags. When present it is what transformers loads, so it is read first; its
//!   normaliser and pre-tokeniser must be CLIP's (anything else would tokenise differently, so
//!   it is refused rather than approximated).
//! - `vocab.json` + `merges.txt` (transformers 4's slow tokenizer, the Stable Diffusion
//!   checkpoints on the hub): the special tokens come from `special_tokens_map.json` and
//!   `tokenizer_config.json` (strings, or dicts with `content` and flags), added tokens from
//!   `tokenizer_config.json`'s `added_tokens_decoder` or the older `added_tokens.json`.
//!
//! Which special tokens are matched in the normalised text (`normalized: true`) follows
//! transformers 5 loading these files: from `added_tokens_decoder` when there is one; otherwise
//! a token is normalised only when every special-token role naming it gives it as a dict with
//! `normalized: true` (a plain string means raw). This matters only for prompts that spell a
//! special token in another case, such as `<|ENDOFTEXT|>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::clip_tokenizer::{
    AddedToken, Culprit, Parts, BOS, DEFAULT_MAX_LENGTH, EOS, MAX_MAX_LENGTH,
};
use crate::{Error, Result};

/// Merge rules, best first.
type Merges = Vec<(String, String)>;

/// The roles of special tokens, in transformers' order, with CLIP's defaults.
const ROLES: [(&str, &str); 4] = [
    ("bos_token", BOS),
    ("eos_token", EOS),
    ("unk_token", EOS),
    ("pad_token", EOS),
];

/// transformers writes `model_max_length` as int(1e30) when a tokenizer has no limit.
const NO_LIMIT: f64 = 1e15;

/// Where a folder's problems are reported: the file each part came from.
pub(super) struct Sources {
    merges: PathBuf,
    specials: PathBuf,
}

impl Sources {
    pub(super) fn path(&self, culprit: Culprit) -> PathBuf {
        match culprit {
            Culprit::Merges => self.merges.clone(),
            Culprit::Specials => self.specials.clone(),
        }
    }
}

/// A tokenizer file is part of a model (a pipeline folder's `tokenizer/`), so a missing or
/// broken one is a model problem (exit 3), as a missing graph is, not a bad input file.
fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::ModelFile {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad(path, "missing")
        } else {
            bad(path, format!("cannot be read: {e}"))
        }
    })?;
    String::from_utf8(bytes).map_err(|e| {
        bad(
            path,
            format!(
                "is not UTF-8 text (at byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| bad(path, format!("is not valid JSON: {e}")))
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A token id from JSON: a whole number that fits the tables.
fn id_of(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|i| u32::try_from(i).ok())
}

/// `vocab.json`: an object of token -> id.
pub(super) fn read_vocab_json(path: &Path) -> Result<HashMap<String, u32>> {
    vocab_from(&read_json(path)?).map_err(|d| bad(path, d))
}

fn vocab_from(v: &Value) -> std::result::Result<HashMap<String, u32>, String> {
    let obj = v
        .as_object()
        .ok_or("the vocabulary is not a JSON object of token -> id")?;
    if obj.is_empty() {
        return Err("the vocabulary is empty".into());
    }
    obj.iter()
        .map(|(t, id)| {
            id_of(id)
                .map(|id| (t.clone(), id))
                .ok_or_else(|| format!("the id of {t:?} is {id}, not a whole number in 0..2^32"))
        })
        .collect()
}

/// `merges.txt`: an optional `#version` line, then "a b" per line, best first.
pub(super) fn read_merges_txt(path: &Path) -> Result<Merges> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(bad(
                    path,
                    format!("line {} is not a merge rule \"a b\": {line:?}", i + 1),
                ))
            }
        }
    }
    if merges.is_empty() {
        return Err(bad(path, "has no merge rules"));
    }
    Ok(merges)
}

/// A special token's value in the configs: a string, or a dict with `content` (and flags).
/// Returns the content and whether it is matched in the normalised text.
fn token_value(v: &Value) -> Option<(String, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            // transformers' AddedToken: normalized defaults to `not special`, and these are special.
            let normalized = o
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Some((content, normalized))
        }
        _ => None,
    }
}

/// The tokenizer of a folder, and where each part came from.
pub(super) fn read_dir(dir: &Path) -> Result<(Parts, Sources)> {
    if !dir.is_dir() {
        return Err(bad(
            dir,
            if dir.exists() {
                "is not a folder (a tokenizer folder holds vocab.json and merges.txt, or tokenizer.json)"
            } else {
                "missing (a tokenizer folder holds vocab.json and merges.txt, or tokenizer.json)"
            },
        ));
    }
    let config_path = dir.join("tokenizer_config.json");
    let map_path = dir.join("special_tokens_map.json");
    let config = read_json_opt(&config_path)?;
    let map = read_json_opt(&map_path)?;
    let max_length = max_length_of(config.as_ref(), &config_path)?;

    // Each role's token: special_tokens_map.json over tokenizer_config.json over CLIP's default.
    let mut roles: Vec<(&str, String, bool, PathBuf)> = vec![];
    for (role, default) in ROLES {
        let mut found = None;
        for (file, path) in [(&map, &map_path), (&config, &config_path)] {
            if let Some(v) = file
                .as_ref()
                .and_then(|f| f.get(role))
                .filter(|v| !v.is_null())
            {
                let (content, normalized) = token_value(v).ok_or_else(|| {
                    bad(
                        path,
                        format!("{role} is {v}, neither a string nor an object with \"content\""),
                    )
                })?;
                found = Some((content, normalized, path.clone()));
                break;
            }
        }
        let (content, normalized, path) =
            found.unwrap_or((default.to_string(), false, config_path.clone()));
        roles.push((role, content, normalized, path));
    }
    let role = |name: &str| {
        roles
            .iter()
            .find(|r| r.0 == name)
            .map(|r| r.1.clone())
            .expect("a known role")
    };
    let specials_source = roles
        .iter()
        .find(|r| r.3.exists())
        .map(|r| r.3.clone())
        .unwrap_or(config_path.clone());

    let tokenizer_json = dir.join("tokenizer.json");
    let (vocab, merges, added, sources) = if tokenizer_json.exists() {
        let (vocab, merges, mut added) = read_tokenizer_json(&tokenizer_json)?;
        // transformers adds the role tokens it was given that tokenizer.json lacks.
        add_roles(&mut added, &roles, &vocab)?;
        let sources = Sources {
            merges: tokenizer_json.clone(),
            specials: tokenizer_json.clone(),
        };
        (vocab, merges, added, sources)
    } else {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for p in [&vocab_path, &merges_path] {
            if !p.exists() {
                return Err(bad(p, "missing (a CLIP tokenizer folder holds vocab.json and merges.txt, or tokenizer.json)"));
            }
        }
        let vocab = read_vocab_json(&vocab_path)?;
        let merges = read_merges_txt(&merges_path)?;
        let added = legacy_added_tokens(dir, config.as_ref(), &config_path, &roles, &vocab)?;
        (
            vocab,
            merges,
            added,
            Sources {
                merges: merges_path,
                specials: specials_source,
            },
        )
    };
    let unk = Some(role("unk_token"));
    Ok((
        Parts {
            vocab,
            merges,
            max_length,
            bos: role("bos_token"),
            eos: role("eos_token"),
            pad: role("pad_token"),
            unk,
            added,
        },
        sources,
    ))
}

/// `model_max_length` of tokenizer_config.json: 77 when absent or "no limit".
fn max_length_of(config: Option<&Value>, path: &Path) -> Result<usize> {
    let Some(v) = config
        .and_then(|c| c.get("model_max_length"))
        .filter(|v| !v.is_null())
    else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    if v.as_f64().is_some_and(|x| x >= NO_LIMIT) {
        return Ok(DEFAULT_MAX_LENGTH);
    }
    match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
        Some(n) if (2..=MAX_MAX_LENGTH).contains(&n) => Ok(n),
        _ => Err(bad(path, format!("model_max_length is {v}; expected a whole number in 2..={MAX_MAX_LENGTH} (77 for CLIP)"))),
    }
}

/// The added tokens of a vocab.json + merges.txt folder (see the module docs for the rules).
fn legacy_added_tokens(
    dir: &Path,
    config: Option<&Value>,
    config_path: &Path,
    roles: &[(&str, String, bool, PathBuf)],
    vocab: &HashMap<String, u32>,
) -> Result<Vec<AddedToken>> {
    let mut added: Vec<AddedToken> = vec![];
    let decoder = config
        .and_then(|c| c.get("added_tokens_decoder"))
        .filter(|v| !v.is_null());
    if let Some(decoder) = decoder {
        let obj = decoder.as_object().ok_or_else(|| {
            bad(
                config_path,
                "added_tokens_decoder is not an object of id -> token",
            )
        })?;
        for (id, t) in obj {
            let id: u32 = id.parse().map_err(|_| {
                bad(
                    config_path,
                    format!("added_tokens_decoder has the key {id:?}, not a token id"),
                )
            })?;
            added.push(
                added_token(t, id)
                    .map_err(|d| bad(config_path, format!("added_tokens_decoder[{id}]: {d}")))?,
            );
        }
    }
    add_roles(&mut added, roles, vocab)?;
    // The oldest form of added tokens (textual inversion): content -> id, matched normalised.
    let legacy = dir.join("added_tokens.json");
    if let Some(v) = read_json_opt(&legacy)? {
        let obj = v
            .as_object()
            .ok_or_else(|| bad(&legacy, "is not a JSON object of token -> id"))?;
        for (content, id) in obj {
            let id = id_of(id).ok_or_else(|| {
                bad(
                    &legacy,
                    format!("the id of {content:?} is {id}, not a token id"),
                )
            })?;
            if !added.iter().any(|a| &a.content == content) {
                let special = roles.iter().any(|r| &r.1 == content);
                added.push(AddedToken {
                    content: content.clone(),
                    id,
                    normalized: !special,
                });
            }
        }
    }
    Ok(added)
}

/// The special tokens by role (SD 2.x's pad `!` among them), unless already listed.
fn add_roles(
    added: &mut Vec<AddedToken>,
    roles: &[(&str, String, bool, PathBuf)],
    vocab: &HashMap<String, u32>,
) -> Result<()> {
    for (role, content, _, path) in roles {
        if added.iter().any(|a| &a.content == content) {
            continue;
        }
        let Some(&id) = vocab.get(content) else {
            return Err(bad(
                path,
                format!("the {role} {content:?} is not in the vocabulary"),
            ));
        };
        // Normalised only if every role naming this token says so.
        let normalized = roles.iter().filter(|r| &r.1 == content).all(|r| r.2);
        added.push(AddedToken {
            content: content.clone(),
            id,
            normalized,
        });
    }
    Ok(())
}

/// One entry of `added_tokens` / `added_tokens_decoder`.
fn added_token(t: &Value, id: u32) -> std::result::Result<AddedToken, String> {
    let content = t
        .get("content")
        .and_then(Value::as_str)
        .ok_or("no \"content\" string")?
        .to_string();
    let flag = |k: &str| t.get(k).and_then(Value::as_bool);
    if flag("single_word") == Some(true) {
        // It changes which occurrences match (not inside a word); CLIP's tokens never set it.
        return Err(format!(
            "{content:?} has single_word set, which this tokenizer does not support"
        ));
    }
    // lstrip/rstrip only swallow the whitespace beside the token, which CLIP drops anyway.
    let special = flag("special").unwrap_or(false);
    let normalized = flag("normalized").unwrap_or(!special);
    Ok(AddedToken {
        content,
        id,
        normalized,
    })
}

/// The vocabulary, merges and added tokens of a `tokenizer.json`, after checking that it
/// describes CLIP's tokenisation.
fn read_tokenizer_json(path: &Path) -> Result<(HashMap<String, u32>, Merges, Vec<AddedToken>)> {
    let j = read_json(path)?;
    let model = j
        .get("model")
        .ok_or_else(|| bad(path, "has no \"model\""))?;
    let is = |v: Option<&Value>, want: &str| v.and_then(Value::as_str) == Some(want);
    if !is(model.get("type"), "BPE") {
        return Err(bad(
            path,
            format!(
                "model type is {}, not BPE: not a CLIP tokenizer",
                model.get("type").unwrap_or(&Value::Null)
            ),
        ));
    }
    if !is(model.get("end_of_word_suffix"), "</w>") {
        return Err(bad(
            path,
            "model.end_of_word_suffix is not \"</w>\": not a CLIP tokenizer",
        ));
    }
    for (key, off) in [("ignore_merges", false), ("byte_fallback", false)] {
        if model.get(key).and_then(Value::as_bool).unwrap_or(off) != off {
            return Err(bad(
                path,
                format!("model.{key} is set, which CLIP's tokenizer does not use"),
            ));
        }
    }
    if model.get("dropout").is_some_and(|d| !d.is_null()) {
        return Err(bad(
            path,
            "model.dropout is set: BPE dropout makes tokenisation random",
        ));
    }
    if !is(model.get("continuing_subword_prefix"), "")
        && model
            .get("continuing_subword_prefix")
            .is_some_and(|p| !p.is_null())
    {
        return Err(bad(
            path,
            "model.continuing_subword_prefix is set, which CLIP's tokenizer does not use",
        ));
    }
    check_clip_pipeline(&j).map_err(|d| bad(path, d))?;
    let vocab = vocab_from(model.get("vocab").unwrap_or(&Value::Null))
        .map_err(|d| bad(path, format!("model.vocab: {d}")))?;
    let list = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "model.merges is not a list"))?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        // tokenizers writes ["a", "b"] pairs since 0.20, "a b" strings before.
        let pair = match m {
            Value::String(s) => {
                let mut p = s.split(' ');
                match (p.next(), p.next(), p.next()) {
                    (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
                    _ => None,
                }
            }
            Value::Array(a) => match a.as_slice() {
                [Value::String(x), Value::String(y)] => Some((x.clone(), y.clone())),
                _ => None,
            },
            _ => None,
        };
        merges.push(
            pair.ok_or_else(|| bad(path, format!("model.merges[{i}] is {m}, not a merge rule")))?,
        );
    }
    let mut added = vec![];
    for t in j
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let id = t
            .get("id")
            .and_then(id_of)
            .ok_or_else(|| bad(path, format!("added token {t} has no id")))?;
        added.push(added_token(t, id).map_err(|d| bad(path, format!("added token {id}: {d}")))?);
    }
    Ok((vocab, merges, added))
}

/// CLIP's normaliser and pre-tokeniser as transformers writes them; others are refused.
fn check_clip_pipeline(j: &Value) -> std::result::Result<(), String> {
    let types = |v: Option<&Value>, list: &str| -> Vec<String> {
        match v {
            Some(v) if v.get("type").and_then(Value::as_str) == Some("Sequence") => v
                .get(list)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|n| {
                            n.get("type")
                                .and_then(Value::as_str)
                                .unwrap_or("?")
                                .to_string()
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Some(v) => vec![v
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string()],
            None => vec![],
        }
    };
    let normalizer = j.get("normalizer");
    let norms = types(normalizer, "normalizers");
    let replace_ok = normalizer
        .and_then(|n| n.get("normalizers"))
        .and_then(|l| l.get(1))
        .is_some_and(|r| {
            r.pointer("/pattern/Regex").and_then(Value::as_str) == Some(r"\s+")
                && r.get("content").and_then(Value::as_str) == Some(" ")
        });
    if norms != ["NFC", "Replace", "Lowercase"] || !replace_ok {
        return Err(format!(
            "the normalizer is [{}], not CLIP's (NFC, whitespace runs to one space, Lowercase)",
            norms.join(", ")
        ));
    }
    let pre = j.get("pre_tokenizer");
    let pres = types(pre, "pretokenizers");
    let split = pre
        .and_then(|p| p.get("pretokenizers"))
        .and_then(|l| l.get(0));
    let clip_split = split.is_some_and(|s| {
        s.pointer("/pattern/Regex").and_then(Value::as_str) == Some(CLIP_SPLIT)
            && s.get("invert").and_then(Value::as_bool) == Some(true)
            && s.get("behavior").and_then(Value::as_str) == Some("Removed")
    });
    let byte_level = pre
        .and_then(|p| p.get("pretokenizers"))
        .and_then(|l| l.get(1));
    let clip_bytes = byte_level.is_some_and(|b| {
        b.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
            && b.get("use_regex").and_then(Value::as_bool) != Some(false)
    });
    if pres != ["Split", "ByteLevel"] || !clip_split || !clip_bytes {
        return Err(format!(
            "the pre_tokenizer is [{}], not CLIP's (its split pattern, then ByteLevel)",
            pres.join(", ")
        ));
    }
    Ok(())
}

/// CLIP's split pattern as transformers writes it into tokenizer.json.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

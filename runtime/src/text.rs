//! PLACEHOLDER until branch `tokenizer` lands (its `text/` module replaces this file at the
//! merge): the agreed API of the CLIP tokenizer, with a plain byte-level BPE that is exact for
//! ASCII prompts of letters, digits, spaces and punctuation (what the pipeline tests use).
//! It has none of CLIP's unicode clean-up.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// CLIP's byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    bos: i64,
    eos: i64,
    pad: i64,
    max_length: usize,
}

/// A tokenized prompt.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `max_length` ids: start token, the prompt's, end token, padding.
    pub ids: Vec<i64>,
    /// What truncation dropped, if anything.
    pub truncated: Option<String>,
}

impl Encoded {
    /// The truncation warning, if any.
    pub fn warning(&self) -> Option<String> {
        self.truncated
            .as_ref()
            .map(|t| format!("the prompt was truncated; dropped: {t}"))
    }
}

fn byte_symbols() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    table
}

impl ClipTokenizer {
    /// Loads a tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json,
    /// special_tokens_map.json).
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).map_err(|e| Error::ModelFile {
                path: dir.join(f),
                detail: format!("cannot read the tokenizer file ({e})"),
            })
        };
        let bad = |f: &str, d: String| Error::Metadata {
            path: dir.join(f),
            detail: d,
        };
        let vocab: HashMap<String, i64> =
            serde_json::from_str(&read("vocab.json")?).map_err(|e| bad("vocab.json", e.to_string()))?;
        let ranks = read("merges.txt")?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .enumerate()
            .map(|(i, p)| (p, i))
            .collect();
        let cfg: serde_json::Value = read("tokenizer_config.json")
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let max_length = cfg
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .filter(|&l| l < 10_000)
            .unwrap_or(77) as usize;
        let id = |t: &str| vocab.get(t).copied();
        let bos = id("<|startoftext|>").ok_or_else(|| bad("vocab.json", "no <|startoftext|>".into()))?;
        let eos = id("<|endoftext|>").ok_or_else(|| bad("vocab.json", "no <|endoftext|>".into()))?;
        let special: serde_json::Value = read("special_tokens_map.json")
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let pad_token = match special.get("pad_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
            None => None,
        };
        let pad = pad_token.and_then(|t| id(&t)).unwrap_or(eos);
        Ok(ClipTokenizer {
            vocab,
            ranks,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    fn bpe(&self, word: &str) -> Vec<String> {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    self.ranks
                        .get(&(parts[i].clone(), parts[i + 1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts.splice(i..i + 2, [merged]);
        }
        parts
    }

    /// Tokenizes `text` to `max_length` ids.
    pub fn encode(&self, text: &str) -> Encoded {
        let table = byte_symbols();
        let lower = text.to_lowercase();
        // Runs of letters, single digits, runs of other non-space characters.
        let mut words: Vec<String> = Vec::new();
        let mut cur = String::new();
        let mut kind = 0;
        for c in lower.chars() {
            let k = if c.is_whitespace() {
                0
            } else if c.is_alphabetic() {
                1
            } else if c.is_numeric() {
                2
            } else {
                3
            };
            if (k != kind || k == 2 || k == 0) && !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            if k != 0 {
                cur.push(c);
            }
            kind = k;
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        let mut ids = vec![self.bos];
        for w in &words {
            let mapped: String = w.bytes().map(|b| table[b as usize]).collect();
            for piece in self.bpe(&mapped) {
                ids.push(self.vocab.get(&piece).copied().unwrap_or(self.eos));
            }
        }
        let room = self.max_length - 1;
        let truncated = (ids.len() > room).then(|| format!("{} tokens", ids.len() - room));
        ids.truncate(room);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Encoded { ids, truncated }
    }

    /// Ids per prompt.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

"""The real CLIP BPE vocabulary as a tokenizer folder (vocab.json, merges.txt and the configs).

OpenAI's CLIP (and every Stable Diffusion 1.x/2.x text encoder) uses one byte-level BPE
vocabulary of 49408 tokens. It ships on PyPI inside `open-clip-torch` as
`open_clip/bpe_simple_vocab_16e6.txt.gz`: a header line, then merge rules "a b", best first.
CLIP uses the first 48894 of them (49152 - 256 - 2); the vocabulary follows from them:

    ids 0..255       the 256 byte symbols, in GPT-2's bytes_to_unicode order
    ids 256..511     the same symbols with the end-of-word suffix `</w>`
    ids 512..49405   one token per merge, the two halves joined, in merge order
    49406, 49407     `<|startoftext|>`, `<|endoftext|>`

This is what `openai/clip-vit-*` and the Stable Diffusion `tokenizer/` folders hold, so the folder
written here loads in transformers' `CLIPTokenizer.from_pretrained` and in edgediff's
`ClipTokenizer::from_dir` alike.

    python -m edgediff_export.clip_vocab --out DIR [--bpe FILE] [--pad-token '!'] [--max-length 77]

The package is found without importing it (`open_clip` imports torch and timm at import time;
only its data file is needed), so `pip install --no-deps open-clip-torch` is enough.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's merge count: 49152 tokens were trained, less the 256 bytes and the 2 special tokens.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP uses it unchanged).

    Printable Latin-1 bytes map to themselves; the others (control characters, space, 0x7f..0xa0,
    0xad) are shifted to U+0100 upwards so that no symbol is whitespace or a control character.
    The dict's order (printable bytes first) is the order of vocabulary ids 0..255.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def default_bpe_path() -> Path:
    """`bpe_simple_vocab_16e6.txt.gz` of the installed open-clip-torch, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the CLIP vocabulary comes from the open-clip-torch package, which is not installed: "
            "pip install --no-deps open-clip-torch (or pass the .txt.gz file)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    raise FileNotFoundError("open-clip-torch is installed but has no bpe_simple_vocab_16e6.txt.gz")


def load_clip_bpe(bpe_gz: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and merge rules ("a b", best first)."""
    lines = gzip.open(bpe_gz or default_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz}: expected {NUM_MERGES} merge lines 'a b' after the header")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merges produce a token twice; not CLIP's vocabulary")
    return vocab, merges


def write_clip_tokenizer(out: Path, bpe_gz: Path | None = None, max_length: int = 77,
                         pad_token: str = EOS) -> Path:
    """Writes a tokenizer folder as Stable Diffusion's `tokenizer/` (pad `!` is SD 2.x's)."""
    vocab, merges = load_clip_bpe(bpe_gz)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The header line is what transformers and the original CLIP code expect (they skip line 1).
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, "errors": "replace", **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgediff_export.clip_vocab", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    p.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (default: open-clip-torch's)")
    p.add_argument("--max-length", type=int, default=77)
    p.add_argument("--pad-token", default=EOS, help="'<|endoftext|>' (SD 1.x, default) or '!' (SD 2.x)")
    a = p.parse_args(argv)
    print(write_clip_tokenizer(a.out, a.bpe, a.max_length, a.pad_token))


if __name__ == "__main__":
    main()

"""edgediff's CLIP tokenizer (Rust, `edgediff tokenize`) against transformers' `CLIPTokenizer`.

The reference is transformers 5's `CLIPTokenizer`, the tokenizers-backed one (transformers 5
has no other; see runtime/src/text/mod.rs for why it is the one to match). It never calls
ftfy, but the reference runs in its own process with `ftfy` blocked (`sys.modules["ftfy"] =
None`) all the same, and checks which class it got: if a later transformers brought back the
slow tokenizer that applies `ftfy.fix_text` when it can, the reference would stay on the path
the Rust code implements instead of silently moving to one it cannot.

The vocabulary is the real CLIP one (49408 tokens), written by `edgediff_export.clip_vocab`
from open-clip-torch's `bpe_simple_vocab_16e6.txt.gz`; the strings are generated here,
deterministically. The Rust side is one `edgediff tokenize` process for all strings of a test.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT

EXPORTER_SRC = ROOT / "exporter" / "src"

# Runs in a fresh interpreter: ftfy blocked, then transformers' CLIPTokenizer on the strings.
REFERENCE = r"""
import json, sys, time
sys.modules["ftfy"] = None  # an import of ftfy now raises ImportError
from transformers import CLIPTokenizer
req = json.load(open(sys.argv[1], encoding="utf-8"))
t0 = time.perf_counter()
tok = CLIPTokenizer.from_pretrained(req["dir"])
load = time.perf_counter() - t0
assert type(tok).__module__ == "transformers.models.clip.tokenization_clip", type(tok)
assert type(tok).__mro__[1].__name__ == "TokenizersBackend", type(tok).__mro__
L = req["max_length"]
kw = dict(padding="max_length", max_length=L, truncation=True)
t0 = time.perf_counter()
ids = [tok(s, **kw).input_ids for s in req["strings"]]
one_by_one = time.perf_counter() - t0
t0 = time.perf_counter()
batch = tok(req["strings"], **kw).input_ids
batched = time.perf_counter() - t0
assert batch == ids
# Untruncated, with offsets: where the first dropped token starts in the original string.
cut = []
for s in req["strings"]:
    full = tok(s, return_offsets_mapping=True)
    cut.append(full.offset_mapping[L - 1][0] if len(full.input_ids) > L else None)
tokens = sum(sum(1 for m in tok(s, **kw).attention_mask if m) for s in req["strings"])
json.dump({"ids": ids, "cut": cut, "tokens": tokens, "load_s": load,
           "one_by_one_s": one_by_one, "batched_s": batched,
           "versions": {m: __import__(m).__version__ for m in ("transformers", "tokenizers")}},
          open(sys.argv[2], "w"))
"""


def reference(tmp: Path, tokenizer: Path, strings: list[str], max_length: int = 77) -> dict:
    req, out = tmp / "req.json", tmp / "ref.json"
    req.write_text(json.dumps({"dir": str(tokenizer), "strings": strings, "max_length": max_length}))
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(req), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def edgediff_tokenize(binary: Path, tokenizer: Path, strings: list[str]) -> tuple[list[dict], float]:
    """All strings through one `edgediff tokenize --json --json-input`; and its encode time."""
    stdin = "".join(json.dumps(s) + "\n" for s in strings)
    proc = subprocess.run([str(binary), "tokenize", "--tokenizer", str(tokenizer), "--json", "--json-input"],
                          input=stdin, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "info"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(strings)
    m = re.search(r"encoded (\d+) prompts in ([0-9.]+) s", proc.stderr)
    assert m and int(m.group(1)) == len(strings), proc.stderr
    return rows, float(m.group(2))


def write_vocab(out: Path, *args: str) -> Path:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXPORTER_SRC), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "edgediff_export.clip_vocab", "--out", str(out), *args],
                   check=True, env=env, capture_output=True)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("clip") / "tokenizer")


# --- the strings ------------------------------------------------------------------------------

WORDS = ("a photo of the cat dog astronaut riding horse on mars lighthouse at dusk portrait "
         "oil painting by greg rutkowski trending artstation highly detailed 8k unreal engine "
         "cinematic lighting beautiful landscape mountains river sunset watercolor sketch "
         "cyberpunk city night neon rain reflections hyperrealistic octane render bokeh "
         "handwritten digit seven number zero one two three four five six eight nine").split()
ACCENTED = "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœšžÀÉÎÕÜÇŒŠŽßẞđłőűăşţąęėįųūčďěňřťůźżŀ"
GREEK = "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩάέήίόύώϊϋΐΰς"
CYRILLIC = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯіїєґІЇЄҐ"
CJK = "日本語中文汉字漢字東京猫犬山川空海花火雨雪風光影愛夢一二三四五六七八九十百千万ひらがなカタカナ한국어서울고양이"
ARABIC = "العربيةمرحباقطكلبشمسقمرבעבריתשלוםहिन्दीनमस्तेไทยสวัสดีქართულიՀայերեն"
COMBINING = ["\u0301", "\u0300", "\u0308", "\u0303", "\u0327", "\u030a", "\u0323", "\u0331", "\u20dd", "\u0489"]
EMOJI = ["😀", "🐱", "🚀", "🌅", "🎨", "❤️", "✨", "🔥", "👍", "🏳️‍🌈", "👨‍👩‍👧‍👦", "👩🏽‍🚀", "🧑🏿‍🎨",
         "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "🇯🇵", "🇫🇷", "1️⃣", "#️⃣", "☺︎", "🫠", "🦄", "🌈", "⌚", "♥"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["…", "—", "–", "«", "»", "¿", "¡", "。", "、", "「", "」",
                                                       "‘", "’", "“", "”", "•", "·", "§", "¶", "†", "‰", "©", "®", "™"]
NUMBERS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "12.5kg", "+1-555-0100", "٣٤", "४२", "１２３", "²", "½",
           "Ⅻ", "ⅷ", "①", "๒๕", "०", "𝟙𝟚", "1e-3", "0x1F", "99%", "#1", "v2.1"]
CONTRACTIONS = ["it's", "you're", "I'VE", "we'll", "she'd", "I'm", "can't", "won't", "they've", "IT'S", "it’s",
                "''s", "'S", "'tis", "rock'n'roll", "o'clock", "y'all'd've", "'", "''", "'s's's", "he's'nt"]
SPACES = ["\t", "\n", "\r\n", "\r", "\u00a0", "\u2009", "\u3000", "\u200b", "\u200c", "\u200d", "\ufeff", "\u180e",
          "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u2000", "\u2001", "\u202f", "\u205f", "  ", "\x00", "\x7f"]
CASES = ["İstanbul", "ıi", "STRASSE", "straße", "ẞ", "ΟΔΟΣ", "ΣΑΣ σας", "ǅemal", "ǈ", "K", "Ω", "ﬁ", "ﬀ", "Å", "ΐ",
         "ŉ", "İİ", "ΰ", "ᾈ", "Ⓐ", "ＡＢＣ", "𝐀𝐁𝐂"]


def generate_strings() -> list[str]:
    rng = random.Random(18)
    pick = rng.choice
    out: list[str] = []

    def prose(n: int) -> str:
        words = [pick(WORDS) for _ in range(n)]
        words = [w.capitalize() if rng.random() < 0.2 else w.upper() if rng.random() < 0.05 else w for w in words]
        text = " ".join(words)
        return text + pick(["", ".", ",", "!", "?", "...", " ,", ";"])

    for _ in range(200):  # ASCII prose
        out.append(prose(rng.randint(1, 20)))
    for _ in range(200):  # letters of other scripts, composed and decomposed
        alphabet = pick([ACCENTED, GREEK, CYRILLIC, CJK, ARABIC])
        words = ["".join(pick(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 6))]
        text = " ".join(words)
        if rng.random() < 0.3:
            text = unicodedata.normalize("NFD", text)
        if rng.random() < 0.3:  # stray or stacked combining marks, also after spaces and digits
            text = "".join(c + "".join(pick(COMBINING) for _ in range(rng.randint(1, 3))) if rng.random() < 0.2 else c
                           for c in text)
        out.append(text if rng.random() < 0.5 else prose(3) + " " + text)
    for _ in range(100):  # emoji: ZWJ sequences, skin tones, flags, keycaps, variation selectors
        out.append(pick(["", prose(3) + " "]) + "".join(pick(EMOJI) + pick(["", "", " "]) for _ in range(rng.randint(1, 8))))
    for _ in range(100):  # punctuation runs
        out.append("".join(pick(PUNCT) for _ in range(rng.randint(1, 12))) + pick(["", " " + prose(2), "word"]))
    for _ in range(100):  # numbers: one token per digit
        out.append(" ".join(pick(NUMBERS + [str(rng.randint(0, 10**12))]) + pick(["", "px", " cm", "th"])
                            for _ in range(rng.randint(1, 5))))
    for _ in range(80):  # contractions
        out.append(" ".join(pick(CONTRACTIONS + WORDS[:10]) for _ in range(rng.randint(1, 6))))
    for _ in range(80):  # case
        text = " ".join(pick(CASES + WORDS[:20]) for _ in range(rng.randint(1, 5)))
        out.append("".join(c.upper() if rng.random() < 0.5 else c for c in text) if rng.random() < 0.5 else text)
    for _ in range(100):  # whitespace oddities and control characters
        parts = [pick(SPACES) if rng.random() < 0.5 else pick(WORDS + CASES) for _ in range(rng.randint(1, 10))]
        out.append("".join(parts))
    out += ["", " ", "\n", "\t \u00a0\u3000", "\u200b", "a", "A", "!", "7", "é", "e\u0301", "\u0301", "😀",
            "<|endoftext|>", "<|startoftext|>"]
    for i in range(100):  # longer than 77 tokens: the cut lands in words, digits, emoji, multi-byte chars
        kind = i % 6
        if kind == 0:
            text = prose(rng.randint(70, 200))
        elif kind == 1:
            text = "".join(pick(CJK + GREEK) for _ in range(rng.randint(40, 120)))
        elif kind == 2:
            text = "".join(pick(EMOJI) for _ in range(rng.randint(20, 60)))
        elif kind == 3:
            text = "".join(pick("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(200, 3000)))
        elif kind == 4:
            text = str(rng.randint(10**20, 10**21)) * rng.randint(3, 6)
        else:
            text = prose(60) + " " + unicodedata.normalize("NFD", "".join(pick(ACCENTED) for _ in range(40)))
        out.append(text)
    for _ in range(50):  # special tokens written in the text, exactly or not
        token = pick(["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>", "<|endoftext",
                      "<|endoftext|>>", "<<|endoftext|>", "<| endoftext |>", "<|endoftext|><|endoftext|>"])
        out.append(pick(["", "a", prose(2) + " ", "x" * 3]) + token + pick(["", "b", " " + prose(2), "!!"]))
    pool = ACCENTED + GREEK + CYRILLIC + CJK + ARABIC + "".join(EMOJI + PUNCT + SPACES + COMBINING) + "abcXYZ0123 '"
    for _ in range(100):  # anything together
        out.append("".join(pick(pool) for _ in range(rng.randint(1, 60))))
    return out


def test_parity_with_transformers(edgediff_bin, clip_dir, tmp_path):
    strings = generate_strings()
    assert len(strings) >= 1000
    ref = reference(tmp_path, clip_dir, strings)
    rows, rust_s = edgediff_tokenize(edgediff_bin, clip_dir, strings)

    mismatches = [(s, r["ids"], want) for s, r, want in zip(strings, rows, ref["ids"]) if r["ids"] != want]
    truncated = sum(c is not None for c in ref["cut"])
    build = "release" if "release" in str(edgediff_bin) else "debug"
    tokens = ref["tokens"]
    print(f"\nCLIP tokenizer parity: {len(strings) - len(mismatches)}/{len(strings)} strings identical "
          f"({truncated} truncated at 77 tokens), transformers {ref['versions']['transformers']} / "
          f"tokenizers {ref['versions']['tokenizers']}")
    print(f"timing, {tokens} tokens: edgediff ({build} build) {tokens / rust_s:,.0f} tokens/s "
          f"({rust_s * 1e6 / len(strings):.1f} us/string); transformers one call per string "
          f"{tokens / ref['one_by_one_s']:,.0f} tokens/s ({ref['one_by_one_s'] * 1e6 / len(strings):.1f} us/string), "
          f"batched {tokens / ref['batched_s']:,.0f} tokens/s")
    assert not mismatches, "\n".join(f"{s!r}\n  edgediff     {a}\n  transformers {b}" for s, a, b in mismatches[:10])

    # What was cut off: the original text from the first dropped token on.
    for s, r, cut in zip(strings, rows, ref["cut"]):
        if cut is None:
            assert r["truncated"] is None, s
        elif unicodedata.is_normalized("NFC", s):
            assert r["truncated"] == s[cut:], (s, r["truncated"], s[cut:])
        else:
            # A word that NFC changes reports from the word's start (see normalize()).
            assert s.endswith(r["truncated"]) and r["truncated"].endswith(s[cut:]), (s, r["truncated"])


def every_code_point() -> list[str]:
    """Each assigned code point between letters and between punctuation, so that its class
    (letter, digit, other, space), its lower case and its NFC all show in the ids."""
    cps = []
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        if cat in ("Cn", "Cs") or (cat == "Co" and cp > 0xE0FF):
            continue
        # The large uniform blocks (CJK ideographs, Hangul syllables, Tangut...): every 16th.
        if cat == "Lo" and unicodedata.name(chr(cp), "").startswith(("CJK", "HANGUL SYLLABLE", "TANGUT", "YI SYLLABLE")) and cp % 16:
            continue
        cps.append(cp)
    return [" ".join(f"a{chr(c)}a !{chr(c)}! {chr(c).upper()}" for c in cps[i:i + 20]) for i in range(0, len(cps), 20)]


def test_every_assigned_code_point(edgediff_bin, clip_dir, tmp_path):
    """The Unicode tables (letters, numbers, white space, lower case, NFC) of the Rust side
    against those of transformers', over every code point Python's unicodedata knows to be
    assigned (private use: the first 256; CJK, Hangul, Tangut and Yi blocks: every 16th)."""
    long = tmp_path / "long"
    shutil.copytree(clip_dir, long)
    config = json.loads((long / "tokenizer_config.json").read_text())
    (long / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 2048}))
    strings = every_code_point()
    ref = reference(tmp_path, long, strings, max_length=2048)
    rows, _ = edgediff_tokenize(edgediff_bin, long, strings)
    assert all(c is None for c in ref["cut"])
    bad = [s for s, r, want in zip(strings, rows, ref["ids"]) if r["ids"] != want]
    print(f"\n{sum(len(s.split(' ')) for s in strings) // 3} code points (Unicode {unicodedata.unidata_version}): "
          f"{len(strings) - len(bad)}/{len(strings)} strings identical")
    if bad:
        # Narrow it down to the code points.
        words = sorted({w for s in bad for w in s.split(" ")})
        rows, _ = edgediff_tokenize(edgediff_bin, long, words)
        ref = reference(tmp_path, long, words, max_length=2048)
        odd = [(w, hex(ord(w[1])) if len(w) > 1 else w) for w, r, want in zip(words, rows, ref["ids"]) if r["ids"] != want]
        pytest.fail(f"{len(odd)} code points tokenised differently: {odd[:40]}")


# --- other tokenizer folders --------------------------------------------------------------------

VARIANT_STRINGS = ["a photo of a cat", "hello!!! wow! !", "!", "<|endoftext|>", "<|ENDOFTEXT|> and <|StartOfText|>",
                   "a<|startoftext|>b", "<cat-toy> on a <Cat-Toy>x", "A <CAT-TOY>!", "it's 2024 ΣΑΣ", "",
                   "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]


def variant(base: Path, out: Path, edit) -> Path:
    shutil.copytree(base, out)
    edit(out)
    return out


def _set_json(path: Path, **kv):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(kv)
    path.write_text(json.dumps(data))


def _ti(d: Path):  # textual inversion, as older diffusers scripts saved it
    (d / "added_tokens.json").write_text(json.dumps({"<Cat-Toy>": 49408}))


def _legacy_sd15(d: Path):  # the runwayml/CompVis SD 1.x files: dict tokens with normalized true
    tok = lambda c: {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}  # noqa: E731
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"), "pad_token": "<|endoftext|>",
         "unk_token": tok("<|endoftext|>")}))


def _decoder(d: Path):  # transformers 4.3x saves: added_tokens_decoder in tokenizer_config.json
    entry = lambda c, n: {"content": c, "lstrip": False, "normalized": n, "rstrip": False,  # noqa: E731
                          "single_word": False, "special": True}
    _set_json(d / "tokenizer_config.json", added_tokens_decoder={
        "49406": entry("<|startoftext|>", True), "49407": entry("<|endoftext|>", False)})


@pytest.mark.parametrize("name", ["sd2-pad", "textual-inversion", "legacy-sd15", "added-tokens-decoder",
                                  "max-length-16", "tokenizer-json", "tokenizer-json-ti",
                                  "tokenizer-json-normalized"])
def test_folder_variants(edgediff_bin, clip_dir, tmp_path, name):
    if name == "sd2-pad":
        d = write_vocab(tmp_path / name, "--pad-token", "!")
    elif name == "textual-inversion":
        d = variant(clip_dir, tmp_path / name, _ti)
    elif name == "legacy-sd15":
        d = variant(clip_dir, tmp_path / name, _legacy_sd15)
    elif name == "added-tokens-decoder":
        d = variant(clip_dir, tmp_path / name, _decoder)
    elif name == "max-length-16":
        d = variant(clip_dir, tmp_path / name, lambda d: _set_json(d / "tokenizer_config.json", model_max_length=16))
    else:
        # What transformers 5 writes (tokenizer.json + tokenizer_config.json only), from a folder
        # with a pad "!" and a textual-inversion token, so both survive the round trip.
        src = variant(write_vocab(tmp_path / "src", "--pad-token", "!"), tmp_path / "src2", _ti) \
            if name == "tokenizer-json-ti" else clip_dir
        d = tmp_path / name
        script = ("import sys; sys.modules['ftfy'] = None\nfrom transformers import CLIPTokenizer\n"
                  f"CLIPTokenizer.from_pretrained({str(src)!r}).save_pretrained({str(d)!r})")
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
        assert not (d / "vocab.json").exists() and (d / "tokenizer.json").exists()
        if name == "tokenizer-json-normalized":  # the hub's openai/clip-vit-* tokenizer.json flags
            tj = json.loads((d / "tokenizer.json").read_text())
            for t in tj["added_tokens"]:
                t["normalized"] = True
            (d / "tokenizer.json").write_text(json.dumps(tj))
    max_length = 16 if name == "max-length-16" else 77
    ref = reference(tmp_path, d, VARIANT_STRINGS, max_length)
    rows, _ = edgediff_tokenize(edgediff_bin, d, VARIANT_STRINGS)
    for s, r, want in zip(VARIANT_STRINGS, rows, ref["ids"]):
        assert r["ids"] == want, (name, s)
        assert len(r["ids"]) == max_length


# --- the command line ---------------------------------------------------------------------------

def tokenize(binary: Path, tokenizer: Path, stdin: bytes, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), "tokenize", "--tokenizer", str(tokenizer), *flags],
                          input=stdin, capture_output=True)


def test_cli_lines(edgediff_bin, clip_dir, tmp_path):
    # Plain lines: one array per line, \r\n endings, an empty line is an empty prompt; the pipeline
    # folder (tokenizer/ inside) is accepted for the tokenizer folder.
    proc = tokenize(edgediff_bin, clip_dir.parent, b"a cat\r\n\nA CAT")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert lines[0] == lines[2] and lines[0][:4] == [49406, 320, 2368, 49407] and len(lines[0]) == 77
    assert lines[1][:3] == [49406, 49407, 49407]
    proc = tokenize(edgediff_bin, clip_dir, b"word " * 80 + b"\n", "--json")
    row = json.loads(proc.stdout)
    assert row["truncated"] == "word word word word word " and len(row["ids"]) == 77
    assert proc.stdout.count(b"\n") == 1


@pytest.mark.parametrize("case", ["not-utf8", "bad-json-line", "no-folder", "no-merges", "bad-vocab",
                                  "bad-merge-line", "bad-max-length", "foreign-merges", "foreign-tokenizer-json"])
def test_cli_errors(edgediff_bin, clip_dir, tmp_path, case):
    d, stdin, flags = clip_dir, b"fine\n", []
    if case == "not-utf8":
        stdin = b"fine\nalso fine\nbroken \xc3\x28 here\n"
    elif case == "bad-json-line":
        stdin, flags = b'"fine"\nnot json\n', ["--json-input"]
    elif case == "no-folder":
        d = tmp_path / "nowhere"
    else:
        d = variant(clip_dir, tmp_path / case, lambda d: None)
        if case == "no-merges":
            (d / "merges.txt").unlink()
        elif case == "bad-vocab":
            (d / "vocab.json").write_text('{"a": 0, ')
        elif case == "bad-merge-line":
            (d / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n")
        elif case == "bad-max-length":
            _set_json(d / "tokenizer_config.json", model_max_length=1)
        elif case == "foreign-merges":
            (d / "merges.txt").write_text("#version: 0.2\ni n\nzz qq\n")
        elif case == "foreign-tokenizer-json":
            tj = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "end_of_word_suffix": "</w>"},
                  "normalizer": {"type": "NFKC"}, "pre_tokenizer": None}
            (d / "tokenizer.json").write_text(json.dumps(tj))
    proc = tokenize(edgediff_bin, d, stdin, *flags)
    err = proc.stderr.decode()
    # The text read is an input file (exit 4); the tokenizer folder is part of a model (exit 3).
    assert proc.returncode == (4 if case in ("not-utf8", "bad-json-line") else 3), err
    want = {
        "not-utf8": ["<stdin>", "line 3 is not UTF-8"],
        "bad-json-line": ["<stdin>", "line 2 is not a JSON string"],
        "no-folder": ["nowhere", "missing"],
        "no-merges": ["merges.txt", "missing"],
        "bad-vocab": ["vocab.json", "not valid JSON"],
        "bad-merge-line": ["merges.txt", "line 3 is not a merge rule"],
        "bad-max-length": ["tokenizer_config.json", "model_max_length is 1"],
        "foreign-merges": ["merges.txt", "merge rule 2", "not in the vocabulary"],
        "foreign-tokenizer-json": ["tokenizer.json", "normalizer is [NFKC]"],
    }[case]
    for w in want:
        assert w in err, err
    assert "--" not in err.split("error:", 1)[1], err  # library messages name no flag
    if case == "not-utf8":  # the good lines before the bad one were answered
        assert proc.stdout.decode().count("\n") == 2

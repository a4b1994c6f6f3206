"""A tiny randomly initialised diffusers StableDiffusionPipeline, built from configs (no download);
with `inpainting=True` a StableDiffusionInpaintPipeline whose U-Net takes 9 channels (latents,
mask, masked image latents), as stable-diffusion-inpainting's.

The tokenizer is a real CLIP byte-level BPE tokenizer (transformers' CLIPTokenizer) over a
small generated vocabulary: the 256 byte symbols, each also with the end-of-word mark `</w>`,
one token per merge of the words below, and CLIP's two special tokens last, in the layout of
the real vocabulary (bpe_simple_vocab_16e6). Words outside the list fall back to characters,
so any text tokenizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgediff_export.clip_vocab import bytes_to_unicode

WORDS = ("a", "the", "lighthouse", "at", "dusk", "blurry", "photo", "of", "cat", "dog", "red",
         "number", "seven", "handwritten", "digit", "low", "quality", "sky", "sea")
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                 set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")


def write_tiny_vocab(folder: Path) -> tuple[int, int, int]:
    """vocab.json and merges.txt in `folder`; returns (vocab size, bos id, eos id)."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in WORDS:
        chars = list(word)
        chars[-1] += "</w>"
        tok = chars[0]
        for c in chars[1:]:
            merge = f"{tok} {c}"
            tok += c
            if merge not in merges:
                merges.append(merge)
                vocab.append(tok)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab), len(vocab) - 2, len(vocab) - 1


def build(out: Path, seed: int = 0, hidden_size: int = 32, cross_attention_dim: int = 32,
          inpainting: bool = False) -> Path:
    """Save a tiny StableDiffusionPipeline (with `inpainting`, a StableDiffusionInpaintPipeline
    with a 9-channel U-Net) to `out` with save_pretrained; returns `out`."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir = out.parent / (out.name + "-vocab")
    size, bos, eos = write_tiny_vocab(vocab_dir)
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8,
        in_channels=9 if inpainting else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_size=hidden_size,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=size, max_position_embeddings=77))
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
               scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out


_EXPORTED: dict[str, Path] = {}


def exported(root: Path | None = None, inpainting: bool = False) -> Path:
    """The tiny pipeline (`inpainting`: the 9-channel one) exported by `edgediff-export
    diffusers` (under `root`, else a new temporary folder), built once per process."""
    import os
    import subprocess
    import sys
    import tempfile
    key = "inpaint" if inpainting else "dir"
    if key not in _EXPORTED:
        root = root or Path(tempfile.mkdtemp(prefix="edgediff-sd-"))
        name = "tiny-inpaint" if inpainting else "tiny"
        src = build(root / name, inpainting=inpainting)
        out = root / f"{name}-edgediff"
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(repo / "exporter" / "src")}
        subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src),
                        "--out", str(out)], check=True, capture_output=True, env=env)
        _EXPORTED[key] = out
    return _EXPORTED[key]

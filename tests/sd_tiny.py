"""A tiny randomly initialised diffusers StableDiffusionPipeline, built from configs (no download);
with `inpainting=True` a StableDiffusionInpaintPipeline whose U-Net takes 9 channels (latents,
mask, masked image latents), as stable-diffusion-inpainting's; with `time_cond_proj_dim=D` a
LatentConsistencyModelPipeline with LCMScheduler whose U-Net takes the guidance-scale embedding
of width D (`timestep_cond`), as a guidance-distilled LCM's (LCM_Dreamshaper_v7: 256).

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


# A bigger SD-structured pipeline for benchmarks (benches/bench_text_to_image.py): Stable
# Diffusion 1.x's block layout (three cross-attention levels and a plain one, two layers per
# block, an 8x VAE) at a fifth of its widths, 32x32 latents (256x256 images), CLIP width 256.
SD_SMALL = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, sample_size=32,
                attention_head_dim=8, norm_num_groups=32, vae_channels=(32, 64, 128, 128),
                vae_layers_per_block=2, hidden_size=256, cross_attention_dim=256,
                text_layers=4, text_heads=4, intermediate_size=1024)


def build(out: Path, seed: int = 0, hidden_size: int = 32, cross_attention_dim: int = 32,
          inpainting: bool = False, *, block_out_channels: tuple[int, ...] = (16, 32),
          layers_per_block: int = 1, sample_size: int = 8, attention_head_dim: int = 4,
          norm_num_groups: int = 8, vae_channels: tuple[int, ...] = (16, 32),
          vae_layers_per_block: int = 1, text_layers: int = 2, text_heads: int = 4,
          intermediate_size: int = 37, time_cond_proj_dim: int | None = None) -> Path:
    """Save a tiny StableDiffusionPipeline (with `inpainting`, a StableDiffusionInpaintPipeline
    with a 9-channel U-Net; with `time_cond_proj_dim`, a LatentConsistencyModelPipeline whose
    U-Net takes `timestep_cond` of that width) to `out` with save_pretrained; returns `out`.

    The keywords size the parts (the defaults are the tiny test pipeline; `SD_SMALL` is a
    bigger one): the U-Net's widths (every level but the first has cross-attention when there
    are two levels, as here; with more, every level but the last, as in Stable Diffusion), its
    latents `sample_size` a side, the VAE's widths (each level past the first doubles the
    image side), the text encoder's depth and width."""
    from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline,
                           LCMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir = out.parent / (out.name + "-vocab")
    size, bos, eos = write_tiny_vocab(vocab_dir)
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    if levels == 2:
        down = ("DownBlock2D", "CrossAttnDownBlock2D")
    else:
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    unet = UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block,
        sample_size=sample_size, in_channels=9 if inpainting else 4, out_channels=4,
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        time_cond_proj_dim=time_cond_proj_dim)
    vae = AutoencoderKL(block_out_channels=vae_channels, in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), latent_channels=4,
                        layers_per_block=vae_layers_per_block, norm_num_groups=norm_num_groups,
                        sample_size=sample_size * 2 ** (len(vae_channels) - 1))
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_size=hidden_size,
        intermediate_size=intermediate_size, layer_norm_eps=1e-5, num_attention_heads=text_heads,
        num_hidden_layers=text_layers, vocab_size=size, max_position_embeddings=77))
    cls, scheduler = StableDiffusionPipeline, DDIMScheduler(**SCHEDULER)
    if inpainting:
        cls = StableDiffusionInpaintPipeline
    if time_cond_proj_dim is not None:
        cls, scheduler = LatentConsistencyModelPipeline, LCMScheduler(**SCHEDULER)
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out


_EXPORTED: dict[str, Path] = {}


def exported(root: Path | None = None, inpainting: bool = False, sample_size: int = 8) -> Path:
    """The tiny pipeline (`inpainting`: the 9-channel one; latents `sample_size` a side, the
    VAE doubling them into the images) exported by `edgediff-export diffusers` (under `root`,
    else a new temporary folder), built once per process for each kind and latent size."""
    import os
    import subprocess
    import sys
    import tempfile
    name = ("tiny-inpaint" if inpainting else "tiny") + ("" if sample_size == 8 else str(sample_size))
    if name not in _EXPORTED:
        root = root or Path(tempfile.mkdtemp(prefix="edgediff-sd-"))
        src = build(root / name, inpainting=inpainting, sample_size=sample_size)
        out = root / f"{name}-edgediff"
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(repo / "exporter" / "src")}
        subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src),
                        "--out", str(out)], check=True, capture_output=True, env=env)
        _EXPORTED[name] = out
    return _EXPORTED[name]


def mode_encoding_pipeline(module, cls, src: Path, monkeypatch):
    """`cls` (a diffusers img2img or inpainting pipeline defined in `module`) loaded from `src`,
    with its VAE encodings taken at the mode (argmax) as edgediff takes them, not drawn."""
    real = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    pipe = cls.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""`edgediff-train-t2i`: train a small Stable-Diffusion-structured text-to-image pipeline on
captioned MNIST digits, with exact resume, and save it as a diffusers pipeline folder.

The parts are the ones a Stable Diffusion 1.x pipeline has, only small: an `AutoencoderKL`
(32x32 grayscale <-> 4x8x8 latents), a `CLIPTextModel` over the real CLIP vocabulary
(open-clip-torch's bpe_simple_vocab_16e6, via `clip_vocab`), a `UNet2DConditionModel` with
cross-attention, and SD's DDIM scheduler config (scaled-linear betas 0.00085..0.012, leading
spacing, steps_offset 1, set_alpha_to_one false). The result is written with
`StableDiffusionPipeline.save_pretrained`, so it exports like any user's pipeline:

    edgediff-train-t2i --out-dir models/training/mnist-t2i          # trains (resumable)
    edgediff-export diffusers models/training/mnist-t2i/pipeline --out models/mnist-t2i

Two stages, each resumable at any checkpoint: (1) the VAE (MSE reconstruction + a small KL
term, as SD's first stage without its perceptual/GAN losses, which a 32x32 digit does not need);
its latent scaling factor is 1/std of the training latents, as SD 1.x chose 0.18215. (2) The
U-Net and the text encoder together, on the frozen VAE's latents, with SD's epsilon objective and
10% of captions dropped to the empty prompt for classifier-free guidance.

Every random draw of step k of stage s comes from a generator seeded by (seed, s, k): a run
stopped at a checkpoint and resumed is bit-for-bit the run that never stopped, on the same torch
build and thread count.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data import load_mnist
from .schedules import alphas_cumprod, betas_for
from .train import optimizer_step, save_atomic

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates: {w} is the digit's word, {n} its numeral. The two prompts the model card
# is judged on are among them; the others teach that word and numeral mean the same digit.
TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n}",
    "the digit {n}",
    "a handwritten {n}",
    "the number {w}",
    "a digit {w}",
    "{w}",
    "{n}",
    "a photo of the number {w}",
    "handwritten number {n}, white on black",
)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                 set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
LOG_FIELDS = ["stage", "step", "loss", "lr", "seconds"]


@dataclass
class T2IConfig:
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 8000  # may grow on resume: the U-Net's learning rate is flat after warm-up
    unet_batch: int = 128
    unet_lr: float = 1e-3
    warmup: int = 500
    lr_min: float = 1e-5
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    text_hidden: int = 64
    unet_channels: tuple[int, int] = (32, 64)
    max_length: int = 77


def captions(digit: int) -> list[str]:
    return [t.format(w=WORDS[digit], n=digit) for t in TEMPLATES]


def build_parts(cfg: T2IConfig, vocab_dir: Path):
    """(vae, text encoder, unet, tokenizer) freshly initialised from configs, no download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                        model_max_length=cfg.max_length)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, sample_size=32,
                        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=cfg.max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, layer_norm_eps=1e-5))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=32)
    return vae, text, unet, tok


def pad_to_32(x: np.ndarray) -> torch.Tensor:
    """MNIST's 28x28 in [-1, 1] padded with background to 32x32 (the VAE halves twice)."""
    return torch.from_numpy(np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-1.0))


def lr_at(step: int, steps: int | None, peak: float, cfg: T2IConfig) -> float:
    """Linear warm-up, then cosine decay over `steps`, or flat when `steps` is None."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    if steps is None:
        return peak
    frac = min(1.0, (step - cfg.warmup) / max(1, steps - cfg.warmup))
    return cfg.lr_min + 0.5 * (peak - cfg.lr_min) * (1 + math.cos(math.pi * frac))


def generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stage) * 1_000_003 + step)


def encode_all(vae, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std of every image (latents are drawn from them per step)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            d = vae.encode(x[i:i + batch]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


class Log:
    def __init__(self, path: Path, vae_done: int, unet_done: int) -> None:
        """The loss log, with the rows of steps after the checkpoint's (`vae_done` VAE steps,
        `unet_done` U-Net steps) dropped: they are trained again."""
        rows = []
        if path.exists():
            with path.open() as f:
                done = {"vae": vae_done, "unet": unet_done}
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < done.get(r["stage"], 0)]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.path = path

    def add(self, stage: str, step: int, loss: float, lr: float, seconds: float) -> None:
        with self.path.open("a") as f:
            f.write(f"{stage},{step},{loss:.6f},{lr:.3e},{seconds:.1f}\n")


def train(out_dir: Path, cfg: T2IConfig, checkpoint_every: int, time_budget_min: float | None,
          threads: int | None, device: str = "cpu", data: tuple | None = None,
          snapshot: bool = False) -> Path | None:
    """Train or resume into out_dir; returns the pipeline folder once both stages are done,
    None when the time budget stopped it first. `data` (images [N,1,28,28], labels) replaces
    MNIST, for tests. `snapshot`: write the pipeline of the checkpoint as it stands (EMA
    weights), without training, e.g. to judge a run that is still going."""
    from .clip_vocab import write_clip_tokenizer

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "loss.csv"
    vocab_dir = out_dir / "tokenizer"
    if not (vocab_dir / "vocab.json").is_file():
        write_clip_tokenizer(vocab_dir, max_length=cfg.max_length)
    x_np, y_np = data if data is not None else load_mnist("trainval")
    x_all, y_all = pad_to_32(x_np).to(dev), torch.from_numpy(y_np).to(dev)

    torch.manual_seed(cfg.seed)
    vae, text, unet, tok = build_parts(cfg, vocab_dir)
    vae, text, unet = vae.to(dev), text.to(dev), unet.to(dev)
    ema_text, ema_unet = build_parts(cfg, vocab_dir)[1:3]
    ema_text, ema_unet = ema_text.to(dev), ema_unet.to(dev)
    ema_text.load_state_dict(text.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    # unet_steps is not part of the run's identity: with a flat learning rate, a run continued
    # to more steps is the longer run that never stopped.
    stored = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
              if k != "unet_steps"}
    state = {"stage": "vae", "step": 0, "elapsed_s": 0.0, "scaling_factor": None}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=dev)
        if ck["config"] != stored:
            raise SystemExit(f"{ckpt_path} was made with other settings; use another --out-dir "
                             f"or the same settings (stored: {ck['config']})")
        vae.load_state_dict(ck["vae"])
        vae_opt.load_state_dict(ck["vae_opt"])
        for m, k in ((text, "text"), (unet, "unet"), (ema_text, "ema_text"), (ema_unet, "ema_unet")):
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        print(f"resuming {state['stage']} stage at step {state['step']} "
              f"({state['elapsed_s'] / 60:.1f} min trained)")

    def checkpoint() -> None:
        save_atomic({"config": stored, "state": state, "vae": vae.state_dict(),
                     "vae_opt": vae_opt.state_dict(), "text": text.state_dict(),
                     "unet": unet.state_dict(), "ema_text": ema_text.state_dict(),
                     "ema_unet": ema_unet.state_dict(), "opt": opt.state_dict()}, ckpt_path)

    if snapshot and state["stage"] == "vae":
        raise SystemExit(f"{ckpt_path} is still in the VAE stage; nothing to snapshot")
    # A snapshot reads the checkpoint only: the log belongs to the run that may still be going.
    log = None if snapshot else Log(log_path, state["step"] if state["stage"] == "vae" else cfg.vae_steps,
                                    0 if state["stage"] == "vae" else state["step"])
    t0 = time.time() - state["elapsed_s"]

    def tick(done: int, total: int) -> bool:
        """Checkpoint when due; True when the time budget says stop."""
        state["elapsed_s"] = time.time() - t0
        over = time_budget_min is not None and state["elapsed_s"] > time_budget_min * 60
        if done % checkpoint_every == 0 or done == total or over:
            checkpoint()
        if over:
            print(f"time budget reached in the {state['stage']} stage at step {done}; "
                  "rerun the same command to resume")
        return over

    if state["stage"] == "vae":
        vae.train()
        for step in range(state["step"], cfg.vae_steps):
            g = generator(cfg.seed, 1, step)
            x = x_all[torch.randint(0, len(x_all), (cfg.vae_batch,), generator=g).to(dev)]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
            rec = vae.decode(z).sample
            loss = torch.nn.functional.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
            lr = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg)
            optimizer_step(vae_opt, loss, list(vae.parameters()), lr, cfg.grad_clip)
            state["step"] = step + 1
            log.add("vae", step, loss.item(), lr, time.time() - t0)
            if step + 1 == cfg.vae_steps:
                state["stage"], state["step"] = "unet", 0
            if tick(step + 1, cfg.vae_steps):
                return None
        if state["stage"] == "vae":
            state["stage"], state["step"] = "unet", 0
    vae.eval()
    if snapshot and state["scaling_factor"] is not None:
        return save_pipeline(out_dir / "pipeline", vae, ema_text, ema_unet, tok,
                             state["scaling_factor"])
    mean, std = encode_all(vae, x_all)
    if state["scaling_factor"] is None:
        state["scaling_factor"] = float(1.0 / mean.std())
    scale = state["scaling_factor"]
    print(f"VAE: latent std {1 / scale:.4f}, scaling_factor {scale:.5f}")
    if snapshot:
        return save_pipeline(out_dir / "pipeline", vae, ema_text, ema_unet, tok, scale)

    # Every caption of every digit tokenised once; a step picks rows of this table.
    table = torch.tensor([tok(c, padding="max_length", max_length=cfg.max_length, truncation=True).input_ids
                          for d in range(10) for c in captions(d)], device=dev)
    empty = torch.tensor(tok("", padding="max_length", max_length=cfg.max_length).input_ids, device=dev)
    # SD's scaled_linear betas are this project's "quadratic" schedule.
    abar = torch.from_numpy(alphas_cumprod(betas_for(
        "quadratic", SCHEDULER["num_train_timesteps"], SCHEDULER["beta_start"],
        SCHEDULER["beta_end"]))).float().to(dev)
    unet.train()
    text.train()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    for step in range(state["step"], cfg.unet_steps):
        g = generator(cfg.seed, 2, step)
        b = cfg.unet_batch
        idx = torch.randint(0, len(x_all), (b,), generator=g).to(dev)
        tmpl = torch.randint(0, len(TEMPLATES), (b,), generator=g).to(dev)
        drop = (torch.rand(b, generator=g) < cfg.caption_dropout).to(dev)
        t = torch.randint(0, SCHEDULER["num_train_timesteps"], (b,), generator=g).to(dev)
        z_noise = torch.randn((b, 4, 8, 8), generator=g).to(dev)
        eps = torch.randn((b, 4, 8, 8), generator=g).to(dev)
        z0 = (mean[idx] + std[idx] * z_noise) * scale
        ids = torch.where(drop[:, None], empty[None], table[y_all[idx] * len(TEMPLATES) + tmpl])
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        cond = text(input_ids=ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(zt, t, cond).sample, eps)
        lr = lr_at(step, None, cfg.unet_lr, cfg)
        optimizer_step(opt, loss, params, lr, cfg.grad_clip)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        state["step"] = step + 1
        log.add("unet", step, loss.item(), lr, time.time() - t0)
        if tick(step + 1, cfg.unet_steps):
            return None
    state["stage"] = "done"
    checkpoint()
    return save_pipeline(out_dir / "pipeline", vae, ema_text, ema_unet, tok, scale)


def save_pipeline(folder: Path, vae, text, unet, tok, scale: float) -> Path:
    """The trained parts (EMA weights of text encoder and U-Net) as a StableDiffusionPipeline
    folder, written next to `folder` and renamed into place."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(vae=vae.cpu().eval(), text_encoder=text.cpu().eval(),
                                   tokenizer=tok, unet=unet.cpu().eval(),
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    pipe.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    d = T2IConfig()
    p = argparse.ArgumentParser(prog="edgediff-train-t2i", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, required=True,
                   help="checkpoint, loss log, tokenizer and (when done) pipeline/ folder")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument("--unet-batch", type=int, default=d.unet_batch)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes of training in total")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--snapshot", action="store_true",
                   help="write pipeline/ from the checkpoint as it stands and exit (no training)")
    a = p.parse_args(argv)
    cfg = T2IConfig(seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps,
                    unet_batch=a.unet_batch)
    try:
        folder = train(a.out_dir, cfg, a.checkpoint_every, a.time_budget_min, a.threads, a.device,
                       snapshot=a.snapshot)
    except FileNotFoundError as e:
        print(f"edgediff-train-t2i: error: {e}", file=sys.stderr)
        raise SystemExit(4) from None
    print(json.dumps({"pipeline": str(folder) if folder else None, "done": folder is not None}))


if __name__ == "__main__":
    main()

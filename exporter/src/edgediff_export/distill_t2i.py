"""`edgediff-train distill-t2i`: a few-step student of a text-to-image pipeline by latent
consistency distillation (LCM, Luo et al. 2023), resumable and exact like `edgediff-train`.

    edgediff-export recover-pipeline models/mnist-t2i --out runs/mnist-t2i-pipeline
    edgediff-train distill-t2i --pipeline runs/mnist-t2i-pipeline --out-dir runs/t2i-lcm
    edgediff-export diffusers runs/t2i-lcm/pipeline --out models/mnist-t2i-lcm

The teacher is a diffusers StableDiffusionPipeline folder (a recovered one is as good); its
VAE and text encoder are frozen and shared, and only the U-Net is trained. The student is the
teacher's U-Net with `time_cond_proj_dim` set: diffusers' TimestepEmbedding then adds
`cond_proj(timestep_cond)` to the time embedding, and with cond_proj zero-initialised the
student starts as the teacher exactly. `timestep_cond` is the guidance-scale embedding of w
(diffusers' get_guidance_scale_embedding), so the one student call per step does what the
teacher's two classifier-free-guided calls did: guidance distilled in.

One training step, as LCM's (diffusers' train_lcm_distill_sd_wds.py): latents z0 of a batch of
captioned digits; a time t_n of the skipping grid t_n = n k - 1 (k = T / `num_ddim_timesteps`,
LCM's 50: 19, 39, ..., 999), z = alpha(t_n) z0 + sigma(t_n) eps; w ~ U[w_min, w_max]; one DDIM
step of the guided teacher, x0 = x0_c + w (x0_c - x0_u) and eps likewise, to t_n - k (alpha of
index 0 at the first grid time, diffusers' DDIMSolver); the loss is the pseudo-Huber distance
(c = 0.001, LCM's, per element) between f_student(z, t_n) and f_target(z', t_n - k), the
target an EMA of the student (decay `target_ema`) with no gradient. f is LCMScheduler's
boundary form, c_skip(t) z + c_out(t) x0 with c_skip = s^2 / ((10 t)^2 + s^2), c_out =
10 t / sqrt((10 t)^2 + s^2), s = 0.5, so f(z, 0) = z: what the runtime's `lcm` sampler
computes from the student's output. LCM's w is the shifted one: the pipeline's guidance scale
G is 1 + w (the runtime embeds G - 1), so w in [3, 15] trains guidance scales 4 to 16.

The training data are the teacher's own (MNIST digits with edgediff-train-t2i's captions):
consistency distillation needs clean latents to noise.

Every random draw of step k comes from a generator seeded by (seed, k): a run stopped at any
checkpoint and resumed is bit-for-bit the run that never stopped (same torch and threads).
When all steps are done, `--out-dir`/pipeline is a LatentConsistencyModelPipeline folder (EMA
U-Net, the teacher's VAE, text encoder and tokenizer, an LCMScheduler on the training grid) with
`distillation.json`, which `edgediff-export diffusers` writes into edgediff.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .distill import consistency_update
from .train import (Clock, progress_bar, reset_log, resume, run_and_report, save_atomic,
                    step_generator, to_cpu)

SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition constants
TIMESTEP_SCALING = 10.0


@dataclass
class T2IDistillConfig:
    teacher_sha256: str = ""
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    lr_min: float = 1e-5
    warmup: int = 50
    num_ddim_timesteps: int = 50  # the skipping grid: LCM's, and LCMScheduler's original steps
    w_min: float = 3.0  # LCM's guidance range (w = guidance scale - 1)
    w_max: float = 15.0
    cond_dim: int = 256  # time_cond_proj_dim, LCM's
    target_ema: float = 0.95
    ema_decay: float = 0.995
    huber_c: float = 0.001
    grad_clip: float = 1.0
    seed: int = 0


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' get_guidance_scale_embedding(w, dim): sin then cos of 1000 w at VDM's
    frequencies (a zero last for odd dim) [N, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's (c_skip, c_out) at integer times t, shaped [N, 1, 1, 1]."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / torch.sqrt(scaled**2 + SIGMA_DATA**2)
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def skipping_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """t_n = n k - 1, n = 1..num_ddim_timesteps (k = T / num_ddim_timesteps)."""
    if num_ddim_timesteps < 1 or num_train_timesteps % num_ddim_timesteps:
        raise ValueError(f"--num-ddim-timesteps {num_ddim_timesteps} must divide the teacher's "
                         f"{num_train_timesteps} training timesteps (e.g. 50, 25, 20)")
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def consistency(unet, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                cond: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """f(z, t) of an epsilon U-Net: c_skip z + c_out x0."""
    a = abar[t].view(-1, 1, 1, 1)
    eps = unet(z, t, text, timestep_cond=cond).sample
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    c_skip, c_out = boundary_scalings(t)
    return c_skip * z + c_out * x0


def guided_ddim_step(teacher, z: torch.Tensor, t: torch.Tensor, t_prev_alpha: torch.Tensor,
                     text: torch.Tensor, empty: torch.Tensor, w: torch.Tensor,
                     abar: torch.Tensor) -> torch.Tensor:
    """One DDIM step of the classifier-free-guided teacher (x0 and eps both guided, LCM's)
    from t to the time whose alpha-bar is `t_prev_alpha`; one teacher call of 2N."""
    n = z.shape[0]
    both = teacher(torch.cat([z, z]), torch.cat([t, t]),
                   torch.cat([text, empty.expand(n, -1, -1)])).sample
    a = abar[t].view(-1, 1, 1, 1)
    wv = w.view(-1, 1, 1, 1)
    eps_c, eps_u = both[:n], both[n:]
    x0_c, x0_u = (z - (1 - a).sqrt() * eps_c) / a.sqrt(), (z - (1 - a).sqrt() * eps_u) / a.sqrt()
    x0 = x0_c + wv * (x0_c - x0_u)
    eps = eps_c + wv * (eps_c - eps_u)
    ap = t_prev_alpha.view(-1, 1, 1, 1)
    return ap.sqrt() * x0 + (1 - ap).sqrt() * eps


def lcm_loss(student, target, teacher, cfg: T2IDistillConfig, grid: torch.Tensor,
             abar: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor, n: torch.Tensor,
             w: torch.Tensor, text: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """The latent consistency distillation loss of one batch (gradient into `student` only)."""
    k = int(grid[0]) + 1
    t = grid[n]
    t_prev = (t - k).clamp(min=0)
    a = abar[t].view(-1, 1, 1, 1)
    z = a.sqrt() * z0 + (1 - a).sqrt() * eps
    cond = guidance_embedding(w, cfg.cond_dim)
    with torch.no_grad():
        # diffusers' DDIMSolver: the step below the first grid time lands on index 0's alpha.
        z_prev = guided_ddim_step(teacher, z, t, abar[t_prev], text, empty, w, abar)
        goal = consistency(target, z_prev, t_prev, text, cond, abar)
    f = consistency(student, z, t, text, cond, abar)
    return (torch.sqrt((f - goal) ** 2 + cfg.huber_c**2) - cfg.huber_c).mean()


def teacher_sha256(pipeline: Path) -> str:
    """Hash of the teacher U-Net's weight files (what the student is distilled from)."""
    h = hashlib.sha256()
    for f in sorted((pipeline / "unet").glob("*.safetensors")) + sorted((pipeline / "unet").glob("*.bin")):
        h.update(f.read_bytes())
    return h.hexdigest()


def load_teacher(pipeline: Path):
    """(pipeline, teacher U-Net) of a diffusers folder this distiller can use."""
    from diffusers import StableDiffusionPipeline

    index = json.loads((pipeline / "model_index.json").read_text())
    if index.get("_class_name") != "StableDiffusionPipeline":
        raise ValueError(f"{pipeline} is a {index.get('_class_name')}; distill-t2i distills "
                         "StableDiffusionPipeline folders")
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None,
                                                   requires_safety_checker=False)
    unet = pipe.unet.float().eval()
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"{pipeline}'s U-Net already takes timestep_cond (it is distilled)")
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{pipeline} predicts {pipe.scheduler.config['prediction_type']}; "
                         "distill-t2i needs an epsilon U-Net")
    for p in unet.parameters():
        p.requires_grad_(False)
    return pipe, unet


def make_student(teacher, cond_dim: int):
    """The teacher's U-Net with time_cond_proj_dim = cond_dim, its cond_proj zero: the
    teacher's function exactly until trained."""
    from diffusers import UNet2DConditionModel

    # Without the private keys: `_use_default_values` would reset time_cond_proj_dim.
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": cond_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"the student does not take the teacher's weights (missing {missing}, "
                         f"unexpected {unexpected})")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def caption_embeddings(pipe) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The frozen text encoder's embeddings of every (digit, template) caption [10 T, L, D],
    the empty prompt's [1, L, D], and T (templates per digit)."""
    from .train_t2i import TEMPLATES, captions

    tok, text = pipe.tokenizer, pipe.text_encoder.float().eval()
    L = tok.model_max_length

    def embed(prompts: list[str]) -> torch.Tensor:
        ids = tok(prompts, padding="max_length", max_length=L, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return text(input_ids=ids).last_hidden_state

    return embed([c for d in range(10) for c in captions(d)]), embed([""]), len(TEMPLATES)


def latents_of(pipe, data: tuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(posterior means, stds, labels, scaling factor) of the training digits."""
    from .data import load_mnist
    from .train_t2i import encode_all, pad_to_32

    x_np, y_np = data if data is not None else load_mnist("trainval")
    vae = pipe.vae.float().eval()
    mean, std = encode_all(vae, pad_to_32(x_np))
    return mean, std, torch.from_numpy(y_np).long(), float(vae.config.scaling_factor)


def distillation_record(cfg: T2IDistillConfig, pipeline: Path, done: int, seconds: float,
                        grid: torch.Tensor) -> dict:
    """distillation.json: how the student was made (edgediff.json's `distillation`)."""
    return {
        "method": "latent-consistency-distillation",
        "teacher": {"file": str(Path(pipeline).name), "sha256": cfg.teacher_sha256},
        "teacher_solver": "ddim",
        "teacher_guidance": [1 + cfg.w_min, 1 + cfg.w_max],
        "time_grid": [0, *grid.tolist()],
        "loss": "huber",
        "training": {**asdict(cfg), "steps_done": done, "seconds": round(seconds, 1),
                     "exported_weights": "ema"},
        "sampler": {"name": "lcm", "default_steps": 4},
    }


def save_student(folder: Path, pipe, unet, cfg: T2IDistillConfig, record: dict) -> Path:
    """The LatentConsistencyModelPipeline folder of student U-Net `unet`, written beside
    `folder` and renamed into place."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler.from_config(pipe.scheduler.config,
                                         original_inference_steps=cfg.num_ddim_timesteps)
    out = LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder,
                                         tokenizer=pipe.tokenizer, unet=unet.eval(),
                                         scheduler=scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    out.save_pretrained(str(tmp))
    (tmp / "distillation.json").write_text(json.dumps(record, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def export_snapshot(out_dir: Path, folder: Path, weights: str = "ema") -> Path:
    """The checkpoint's student (`weights`: ema, target or student) as a pipeline folder."""
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    cfg = T2IDistillConfig(**ck["config"])
    pipe, teacher = load_teacher(Path(ck["pipeline"]))
    student = make_student(teacher, cfg.cond_dim)
    student.load_state_dict(ck[weights])
    grid = skipping_grid(pipe.scheduler.config.num_train_timesteps, cfg.num_ddim_timesteps)
    record = distillation_record(cfg, Path(ck["pipeline"]), ck["step"], ck["elapsed_s"], grid)
    record["training"]["exported_weights"] = weights
    return save_student(folder, pipe, student, cfg, record)


def distill(out_dir: Path, pipeline: Path, cfg: T2IDistillConfig, checkpoint_every: int,
            time_budget_min: float | None, threads: int | None,
            data: tuple | None = None) -> Path:
    """Distill (or resume) into out_dir; `data` (images [N, 1, 28, 28] in [-1, 1], labels)
    replaces MNIST, for tests. Writes out_dir/pipeline when all steps are done."""
    if threads:
        torch.set_num_threads(threads)
    pipe, teacher = load_teacher(pipeline)
    cfg.teacher_sha256 = teacher_sha256(pipeline)
    sc = pipe.scheduler.config
    grid = skipping_grid(sc.num_train_timesteps, cfg.num_ddim_timesteps)
    abar = pipe.scheduler.alphas_cumprod.float()
    texts, empty, per_digit = caption_embeddings(pipe)
    mean, std, labels, scale = latents_of(pipe, data)

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "loss.csv"
    student = make_student(teacher, cfg.cond_dim)
    target = make_student(teacher, cfg.cond_dim)
    ema = make_student(teacher, cfg.cond_dim)
    for m in (target, ema):
        m.requires_grad_(False)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, elapsed = resume(ckpt_path, {"student": student, "target": target, "ema": ema}, opt,
                            "config", "settings or another teacher",
                            lambda ck: ck["config"] == asdict(cfg))
    print(f"student: the teacher's U-Net + timestep_cond ({cfg.cond_dim}); latent consistency "
          f"distillation of {pipeline} on {cfg.num_ddim_timesteps} grid times, guidance "
          f"{1 + cfg.w_min:g}..{1 + cfg.w_max:g}; steps {start}..{cfg.steps}")

    def checkpoint(step: int) -> None:
        save_atomic({"student": to_cpu(student.state_dict()), "target": to_cpu(target.state_dict()),
                     "ema": to_cpu(ema.state_dict()), "opt": to_cpu(opt.state_dict()),
                     "step": step, "elapsed_s": clock.elapsed, "config": asdict(cfg),
                     "pipeline": str(Path(pipeline).resolve())}, ckpt_path)

    reset_log(log_path, start)
    clock = Clock(elapsed, checkpoint_every, cfg.steps, time_budget_min)
    params = list(student.parameters())
    target_params, ema_params = list(target.parameters()), list(ema.parameters())
    shape = tuple(mean.shape[1:])
    bar = progress_bar(start, cfg.steps)
    done = start
    for step in bar:
        g = step_generator(cfg.seed, step)
        b = cfg.batch_size
        idx = torch.randint(0, len(mean), (b,), generator=g)
        tmpl = torch.randint(0, per_digit, (b,), generator=g)
        n = torch.randint(0, len(grid), (b,), generator=g)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn((b, *shape), generator=g)) * scale
        eps = torch.randn((b, *shape), generator=g)
        text = texts[labels[idx] * per_digit + tmpl]
        loss = lcm_loss(student, target, teacher, cfg, grid, abar, z0, eps, n, w, text, empty)
        done, over = consistency_update(opt, loss, params, target_params, ema_params, step, cfg,
                                        clock, start, log_path, bar, checkpoint)
        if over:
            break
    if done == cfg.steps and (start < done or not (out_dir / "pipeline").exists()):
        record = distillation_record(cfg, pipeline, done, clock.elapsed, grid)
        print(json.dumps({"pipeline": str(save_student(out_dir / "pipeline", pipe, ema, cfg, record))}))
    return ckpt_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-train distill-t2i",
                                description="a few-step student of a text-to-image pipeline "
                                            "(latent consistency distillation, LCM)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = T2IDistillConfig()
    p.add_argument("--pipeline", type=Path,
                   help="the teacher: a diffusers StableDiffusionPipeline folder (not needed "
                        "with --snapshot)")
    p.add_argument("--out-dir", type=Path, required=True,
                   help="checkpoint, loss log, and (when done) pipeline/")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps in all")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--lr-min", type=float, default=d.lr_min, help="end of the cosine decay")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--num-ddim-timesteps", type=int, default=d.num_ddim_timesteps,
                   help="grid times of the skipping grid (LCMScheduler's original_inference_steps)")
    p.add_argument("--w-min", type=float, default=d.w_min,
                   help="least guidance w trained (the pipeline's guidance scale is 1 + w)")
    p.add_argument("--w-max", type=float, default=d.w_max, help="largest guidance w trained")
    p.add_argument("--target-ema", type=float, default=d.target_ema,
                   help="EMA decay of the target network (LCM's)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="EMA decay of the exported student")
    p.add_argument("--huber-c", type=float, default=d.huber_c, help="pseudo-Huber c (LCM's)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every step's draws")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes of training in total")
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's)")
    p.add_argument("--snapshot", type=Path, default=None, metavar="FOLDER",
                   help="write the checkpoint in --out-dir as a pipeline folder and exit")
    p.add_argument("--weights", choices=("ema", "target", "student"), default="ema",
                   help="which weights --snapshot writes")
    a = p.parse_args(argv)
    if a.snapshot is not None:
        if not (a.out_dir / "checkpoint.pt").exists():
            p.error(f"--snapshot: {a.out_dir / 'checkpoint.pt'} does not exist; start the run first")
        print(json.dumps({"pipeline": str(export_snapshot(a.out_dir, a.snapshot, a.weights))}))
        return
    if a.pipeline is None:
        p.error("--pipeline is required (the teacher: a diffusers pipeline folder)")
    if not (a.pipeline / "model_index.json").is_file():
        print(f"edgediff-train distill-t2i: error: --pipeline {a.pipeline} has no "
              "model_index.json (a diffusers folder; edgediff-export recover-pipeline writes one "
              "from an edgediff text-to-image folder)", file=sys.stderr)
        raise SystemExit(4)
    if not a.w_min <= a.w_max or a.w_min < 0:
        p.error(f"--w-min {a.w_min} and --w-max {a.w_max}: need 0 <= w-min <= w-max")
    cfg = T2IDistillConfig(**{f.name: getattr(a, f.name) for f in fields(T2IDistillConfig)
                              if hasattr(a, f.name)})
    try:
        teacher_pipe = load_teacher(a.pipeline)[0]
        skipping_grid(teacher_pipe.scheduler.config.num_train_timesteps, cfg.num_ddim_timesteps)
    except ValueError as e:
        p.error(str(e))
    run_and_report("edgediff-train distill-t2i", lambda: distill(
        a.out_dir, a.pipeline, cfg, a.checkpoint_every, a.time_budget_min, a.threads))


if __name__ == "__main__":
    main()

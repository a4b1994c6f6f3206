"""`edgediff-train distill`: a few-step student of a trained edgediff model by consistency
distillation (Song et al. 2023, "Consistency Models", CD; the DDIM teacher step and skipped
timesteps of LCM, Luo et al. 2023), resumable and exact like `edgediff-train`.

Why CD and not progressive distillation (Salimans & Ho 2022): one CD run gives a student for
every step count (1, 2, 4, 8 from the same weights), where progressive distillation needs a
converged training run per halving (1000 -> 1 is ten rounds); and a CD step costs one teacher
call where a progressive step costs two. On a CPU budget of an hour or two that decides it.

The teacher is an edgediff ONNX file (a discrete-time, unconditional UNet), its weights recovered
by `onnx_weights.unet_from_onnx`; the student, the target network and the exported EMA all start
as copies of it.

Time grid: N segments of the teacher's T indices, t_0 = 0 (the clean end, alpha 1 and sigma 0)
and t_n = n k - 1 (k = T / N; N = 40 puts 999, 749, 499, 249 on the grid). Only segments up to
`t_max` (default 749) are trained, and sampling starts there from pure noise. Why: an eps model's
x0 = (x - sigma eps) / alpha multiplies its output error by sigma / alpha, 156 at t = 999 of the
linear schedule (the teacher's own x0 there is noise of RMS 0.7); trained in x0 space, those
times dominate the loss and every update makes them worse. At 749 the factor is 17 (Stable
Diffusion's at its last step: 15), and the teacher sampled from pure noise at 749 is as good as
from 999 (DDIM 50 steps, 300 samples: 89% vs 87% confident, domain FID 42.4 vs 40.2).

One training step: a data batch x0, n ~ U{0..top-1} per sample (t_top = t_max),
x = alpha(t_{n+1}) x0 + sigma(t_{n+1}) eps; one DDIM step of the teacher from t_{n+1} to t_n
gives x'; the loss is d(f_student(x, t_{n+1}), f_target(x', t_n)) with the target network an
EMA (decay mu) of the student and no gradient through it (Song et al.'s algorithm 2, lambda = 1).

Consistency function: f(x, t_0) = x (the boundary condition), and at every other grid time the
x0 the network's output implies: c_skip = [t = t_0], c_out = 1 - c_skip. LCM's c_skip(t) =
sigma_d^2 / ((10 t)^2 + sigma_d^2) (sigma_d = 0.5) is below 7e-6 at every grid time t >= 19 and
1 at 0, so the two agree to that at the times either is used. The gain: the student is an
ordinary model of the teacher's prediction type (no wrapper in the graph), and the runtime's x0
of it at a grid time is f itself.

Distance: pseudo-Huber sqrt(|a - b|^2 + c^2) - c over the whole image, c = 0.00054 sqrt(dim)
(Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models"; LPIPS, the
CD paper's choice, needs ImageNet weights and is not offline here), or plain L2 (mean square).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .data import load_dataset
from .export import export_unet, unet_metadata
from .network import build_network
from .objectives import Levels, noisy
from .onnx_weights import unet_from_onnx
from .schedules import LevelSampler
from .train import (Clock, append_log, lr_at, optimizer_step, progress_bar, reset_log, resume,
                    run_and_report, save_atomic, step_generator, to_cpu, update_ema)
from .unet import UNetConfig, count_parameters

LOSSES = ("huber", "l2")
# Prediction names in the metadata -> the trainer's (objectives.PREDICTIONS reversed).
TRAINER_PREDICTION = {"epsilon": "eps", "v": "v", "sample": "x0"}
WEIGHTS = ("ema", "target", "student")


@dataclass
class DistillConfig:
    teacher_sha256: str = ""
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-4
    lr_min: float = 1e-5
    warmup: int = 50
    num_scales: int = 40  # N: segments of the teacher's time axis
    t_max: int = 749  # the noisiest grid time trained (see the module docstring)
    target_ema: float = 0.95  # mu of the target network (LCM's)
    ema_decay: float = 0.995  # the exported student's EMA
    loss: str = "huber"
    huber_c: float | None = None  # None: 0.00054 sqrt(C H W)
    grad_clip: float = 1.0
    seed: int = 0
    dataset: str = "mnist"
    init_sha256: str = ""  # --init: the student file this run starts from ("": the teacher)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def time_grid(num_train_timesteps: int, num_scales: int) -> torch.Tensor:
    """[0, k - 1, 2k - 1, ..., T - 1] with k = T / N: N + 1 grid times, t_0 = 0 the boundary."""
    if num_scales < 1 or num_train_timesteps % num_scales:
        raise ValueError(f"--num-scales {num_scales} must divide the teacher's "
                         f"{num_train_timesteps} training timesteps (e.g. 40, 50, 20)")
    k = num_train_timesteps // num_scales
    return torch.tensor([0] + [n * k - 1 for n in range(1, num_scales + 1)])


def top_index(grid: torch.Tensor, t_max: int) -> int:
    """The grid index of t_max; only segments below it are trained."""
    times = grid.tolist()
    if t_max not in times[1:]:
        raise ValueError(f"--t-max {t_max} is not a time of the {len(times) - 1}-segment grid; "
                         f"use one of {', '.join(map(str, times[1:]))}")
    return times.index(t_max)


def student_timesteps(grid: torch.Tensor, top: int, steps: int) -> list[int]:
    """`steps` grid times evenly spaced in grid index from grid[top] down (the sampling grid
    recorded in the metadata; `--timesteps` takes it)."""
    return [int(grid[round(top - i * top / steps)]) for i in range(steps)]


def x0_and_eps(prediction: str, x: torch.Tensor, out: torch.Tensor,
               lv: Levels) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps that a network output of this prediction type implies at x (VP:
    alpha^2 + sigma^2 = 1, as every discrete schedule is)."""
    a, s = lv.expand(x)
    if prediction == "epsilon":
        return (x - s * out) / a, out
    if prediction == "v":
        return a * x - s * out, s * x + a * out
    if prediction == "sample":
        return out, (x - a * out) / s
    raise ValueError(f"cannot distill a {prediction!r}-prediction teacher; "
                     f"expected one of {', '.join(TRAINER_PREDICTION)}")


def ddim_step(prediction: str, x: torch.Tensor, out: torch.Tensor, lv: Levels,
              lv_next: Levels) -> torch.Tensor:
    """The deterministic DDIM step (Song et al. 2021 eq. 12, eta 0) from x at lv to lv_next."""
    x0, eps = x0_and_eps(prediction, x, out, lv)
    a, s = lv_next.expand(x)
    return a * x0 + s * eps


def consistency(net: nn.Module, prediction: str, x: torch.Tensor, t: torch.Tensor,
                lv: Levels) -> torch.Tensor:
    """f(x, t): x itself at the boundary t = 0, else the network's x0."""
    x0, _ = x0_and_eps(prediction, x, net(x, t.float()), lv)
    return torch.where((t == 0).reshape(-1, 1, 1, 1), x, x0)


def distance(a: torch.Tensor, b: torch.Tensor, loss: str, huber_c: float | None) -> torch.Tensor:
    """Per-sample distance [N]: pseudo-Huber over the whole sample, or the mean square."""
    diff = (a - b).flatten(1)
    if loss == "l2":
        return diff.pow(2).mean(1)
    if loss == "huber":
        c = huber_c if huber_c is not None else 0.00054 * diff.shape[1] ** 0.5
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")


def grid_levels(levels: LevelSampler, t: torch.Tensor) -> Levels:
    """Noise levels of grid times; t_0 = 0 stands for the clean end (alpha 1, sigma 0), where
    the runtime's samplers also end, rather than index 0's sigma = 0.01."""
    lv = levels.levels(t)
    clean = t == 0
    return Levels(torch.where(clean, 1.0, lv.alpha), torch.where(clean, 0.0, lv.sigma), lv.elbo)


def cd_loss(student: nn.Module, target: nn.Module, teacher: nn.Module, prediction: str,
            cfg: DistillConfig, levels: LevelSampler, grid: torch.Tensor, x0: torch.Tensor,
            eps: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The consistency-distillation loss of one batch (gradient flows into `student` only)."""
    t_hi, t_lo = grid[n + 1], grid[n]
    lv_hi, lv_lo = levels.levels(t_hi), grid_levels(levels, t_lo)
    x_hi = noisy(x0, eps, lv_hi)
    with torch.no_grad():
        x_lo = ddim_step(prediction, x_hi, teacher(x_hi, t_hi.float()), lv_hi, lv_lo)
        goal = consistency(target, prediction, x_lo, t_lo, lv_lo)
    f = consistency(student, prediction, x_hi, t_hi, lv_hi)
    return distance(f, goal, cfg.loss, cfg.huber_c).mean()


def load_teacher(path: Path) -> tuple[nn.Module, dict]:
    """The teacher network and its metadata; refuses models this distiller cannot handle."""
    teacher, meta = unet_from_onnx(path)
    if meta["time_input"] != "index":
        raise ValueError(f"{path} is a continuous-time model; distill works on discrete-time "
                         "(index) models only")
    if meta.get("conditioning") is not None:
        raise ValueError(f"{path} is conditional ({meta['conditioning'].get('type')}); distill "
                         "makes students of unconditional models only")
    if meta["prediction"] not in TRAINER_PREDICTION:
        raise ValueError(f"{path} predicts {meta['prediction']}; distill needs an epsilon, v "
                         "or sample model")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, meta


def parse_sampling(specs: list[str], grid: torch.Tensor, t_max: int) -> dict[int, list[int]]:
    """`K=T1,T2,...` (K steps at these times, most noisy first) -> {K: [T1, ...]}; every time
    must be one the student was trained at (a grid time up to t_max)."""
    trained = {t for t in grid.tolist()[1:] if t <= t_max}
    out = {}
    for spec in specs:
        steps, _, times = spec.partition("=")
        try:
            k, ts = int(steps), [int(t) for t in times.split(",")]
        except ValueError:
            raise ValueError(f"--sampling {spec!r}: expected STEPS=T1,T2,... (integers)") from None
        if len(ts) != k or ts != sorted(set(ts), reverse=True) or not set(ts) <= trained:
            raise ValueError(f"--sampling {spec!r}: give {k} distinct decreasing times from the "
                             f"trained grid ({', '.join(map(str, sorted(trained, reverse=True)))})")
        out[k] = ts
    return out


def distillation_record(cfg: DistillConfig, meta: dict, teacher_path: Path, done: int,
                        seconds: float, weights: str, grid: torch.Tensor,
                        grids: dict[str, list[int]]) -> dict:
    """The metadata's `distillation` entry: how the student was made and how to sample it
    (`grids`: the time steps of each step count, `student_grids`)."""
    top = top_index(grid, cfg.t_max)
    return {
        "method": "consistency-distillation",
        "teacher": {"name": meta.get("name", ""), "file": Path(teacher_path).name,
                    "sha256": cfg.teacher_sha256},
        "teacher_solver": "ddim",
        "time_grid": grid[:top + 1].tolist(),
        "loss": cfg.loss,
        "training": {**asdict(cfg), "steps_done": done, "seconds": round(seconds, 1),
                     "exported_weights": weights},
        # Multistep consistency sampling (Song et al.'s algorithm 1: x0, then fresh noise to the
        # next grid time) is the runtime's `lcm`; `ddim --eta 1` at the same times is close.
        "sampler": {"name": "lcm", "default_steps": 4, "timesteps": grids},
    }


def student_grids(grid: torch.Tensor, top: int,
                  chosen: dict[int, list[int]] | None = None) -> dict[str, list[int]]:
    """The sampling grid of each step count the student is made for (1, 2, 4, 8, and those of
    `chosen`): `chosen`'s times where given (measured better ones, `--sampling`), else evenly
    spaced in grid index."""
    grids = {k: student_timesteps(grid, top, k) for k in (1, 2, 4, 8)} | (chosen or {})
    return {str(k): v for k, v in sorted(grids.items())}


def sampling_record(grids: dict[str, list[int]]) -> dict:
    """The metadata's `sampling` entry: what `edgediff sample --model STUDENT` runs with no
    sampler, steps or spacing given (lcm at 4 steps, each step count on its grid)."""
    return {"sampler": "lcm", "steps": 4, "timesteps": grids}


def export_student(ckpt_path: Path, out: Path, weights: str = "ema", name: str = "",
                   sampling: list[str] | None = None) -> dict:
    """Write the checkpoint's student (`weights`: ema, target or student) as an edgediff ONNX
    model with a `distillation` metadata record (`sampling`: `K=T1,...` specs of its time
    steps, see `parse_sampling`); returns a summary."""
    ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    cfg, meta = DistillConfig(**ck["config"]), ck["teacher_meta"]
    ucfg = UNetConfig.from_dict(meta["extra"]["unet"])
    model = build_network(ucfg, meta["schedule"], TRAINER_PREDICTION[meta["prediction"]])
    model.load_state_dict(ck[weights])
    grid = time_grid(meta["schedule"]["num_train_timesteps"], cfg.num_scales)
    name = name or f"{meta.get('name') or 'model'}-cd"
    out_meta = unet_metadata(ucfg, meta["schedule"], name,
                             f"consistency-distilled student of {meta.get('name', '')} "
                             f"({ck['step']} steps)", prediction=meta["prediction"])
    grids = student_grids(grid, top_index(grid, cfg.t_max),
                          parse_sampling(sampling or [], grid, cfg.t_max))
    out_meta["distillation"] = distillation_record(cfg, meta, ck["teacher_path"], ck["step"],
                                                   ck["elapsed_s"], weights, grid, grids)
    if ck.get("init_record") is not None:
        # A continued run: what it started from, so steps and time add up on the card.
        prior = ck["init_record"]["training"]
        out_meta["distillation"]["continued_from"] = {
            "sha256": cfg.init_sha256, "steps_done": prior.get("steps_done"),
            "seconds": prior.get("seconds"), "continued_from": ck["init_record"].get("continued_from")}
    out_meta["sampling"] = sampling_record(grids)
    err = export_unet(model, out_meta, out, timestep_dtype="float32")
    return {"out": str(out), "step": ck["step"], "weights": weights, "max_rel_err": err}


def load_init(path: Path, teacher_meta: dict, teacher_sha256: str) -> tuple[dict, dict]:
    """The weights and `distillation` record of a student of this teacher (`--init`: a run
    continued from a shipped student, whose checkpoint is gone)."""
    student, meta = unet_from_onnx(path)
    record = meta.get("distillation")
    if record is None:
        raise ValueError(f"--init {path} has no distillation record; pass a student "
                         "edgediff-train distill exported")
    if record.get("teacher", {}).get("sha256") != teacher_sha256:
        raise ValueError(f"--init {path} is a student of another teacher "
                         f"({record.get('teacher', {}).get('file')})")
    if meta["extra"]["unet"] != teacher_meta["extra"]["unet"]:
        raise ValueError(f"--init {path} has another network than the teacher")
    return student.state_dict(), record


def consistency_update(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list,
                       target_params: list, ema_params: list, step: int, cfg, clock: Clock,
                       start: int, log_path: Path, bar, checkpoint) -> tuple[int, bool]:
    """One optimiser step of a consistency-distillation run (`cfg`: lr, warmup, steps,
    lr_min, grad_clip, target_ema, ema_decay, batch_size) and its bookkeeping: the target
    network's EMA, the exported EMA, the log line, a checkpoint when due. Returns (steps done,
    whether the time budget is spent)."""
    lr = lr_at(step, cfg)
    optimizer_step(opt, loss, params, lr, cfg.grad_clip)
    with torch.no_grad():
        torch._foreach_lerp_(target_params, params, 1 - cfg.target_ema)
    update_ema(ema_params, params, step, cfg.ema_decay)
    done = step + 1
    save, over = clock.tick(done)
    rate = clock.rate(done - start, cfg.batch_size)
    append_log(log_path, step, loss.item(), lr, rate, clock.elapsed)
    bar.set_postfix(loss=f"{loss.item():.5f}", samples_s=f"{rate:.0f}")
    if save:
        checkpoint(done)
    if over:
        print(f"time budget reached at step {done}; rerun the same command to resume")
    return done, over


def distill(out_dir: Path, teacher_path: Path, cfg: DistillConfig, checkpoint_every: int,
            time_budget_min: float | None, threads: int | None,
            data: torch.Tensor | None = None, init: Path | None = None) -> Path:
    """Distill (or resume) into out_dir; `data` (images [N, C, H, W] in [-1, 1]) replaces the
    named dataset, for tests. `init`: start student, target and EMA from this student file
    instead of the teacher (its optimizer state is not in it, so the run is a continuation in
    weights only). Writes out_dir/student.onnx when all steps are done."""
    if threads:
        torch.set_num_threads(threads)
    teacher, meta = load_teacher(teacher_path)
    cfg.teacher_sha256 = file_sha256(teacher_path)
    prediction = meta["prediction"]
    schedule = meta["schedule"]
    grid = time_grid(schedule["num_train_timesteps"], cfg.num_scales)
    top = top_index(grid, cfg.t_max)
    levels = LevelSampler(schedule)
    if data is None:
        data = torch.from_numpy(load_dataset(cfg.dataset, "trainval")[0])
    shape = tuple(meta["sample_shape"])
    if tuple(data.shape[1:]) != shape:
        raise ValueError(f"the data's images are {tuple(data.shape[1:])}, "
                         f"the teacher takes {shape}")

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "loss.csv"
    student = build_network(UNetConfig.from_dict(meta["extra"]["unet"]), schedule,
                            TRAINER_PREDICTION[prediction])
    start_weights, init_record = teacher.state_dict(), None
    if init is not None:
        start_weights, init_record = load_init(init, meta, cfg.teacher_sha256)
        cfg.init_sha256 = file_sha256(init)
    student.load_state_dict(start_weights)
    target = build_network(student.cfg, schedule, TRAINER_PREDICTION[prediction])
    ema = build_network(student.cfg, schedule, TRAINER_PREDICTION[prediction])
    target.load_state_dict(start_weights)
    ema.load_state_dict(start_weights)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, elapsed = resume(ckpt_path, {"student": student, "target": target, "ema": ema}, opt,
                            "config", "settings or another teacher",
                            lambda ck: ck["config"] == asdict(cfg))
    print(f"student: {count_parameters(student):,} parameters; consistency distillation of "
          f"{teacher_path} over {cfg.num_scales} segments up to t = {cfg.t_max}, {cfg.loss} "
          f"loss; steps {start}..{cfg.steps}")

    def checkpoint(step: int) -> None:
        save_atomic({"student": to_cpu(student.state_dict()), "target": to_cpu(target.state_dict()),
                     "ema": to_cpu(ema.state_dict()), "opt": to_cpu(opt.state_dict()),
                     "step": step, "elapsed_s": clock.elapsed, "config": asdict(cfg),
                     "teacher_meta": meta, "teacher_path": str(teacher_path),
                     "init_record": init_record}, ckpt_path)

    reset_log(log_path, start)
    clock = Clock(elapsed, checkpoint_every, cfg.steps, time_budget_min)
    student.train()
    params = list(student.parameters())
    target_params, ema_params = list(target.parameters()), list(ema.parameters())
    bar = progress_bar(start, cfg.steps)
    done = start
    for step in bar:
        g = step_generator(cfg.seed, step)
        x0 = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=g)]
        n = torch.randint(0, top, (cfg.batch_size,), generator=g)
        eps = torch.randn((cfg.batch_size, *shape), generator=g)
        loss = cd_loss(student, target, teacher, prediction, cfg, levels, grid, x0, eps, n)
        done, over = consistency_update(opt, loss, params, target_params, ema_params, step, cfg,
                                        clock, start, log_path, bar, checkpoint)
        if over:
            break
    if done == cfg.steps and (start < done or not (out_dir / "student.onnx").exists()):
        print(json.dumps(export_student(ckpt_path, out_dir / "student.onnx")))
    return ckpt_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-train distill",
                                description="a few-step student of a trained edgediff model "
                                            "(consistency distillation)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DistillConfig()
    p.add_argument("--teacher", type=Path,
                   help="the teacher: an edgediff ONNX model (not needed with --snapshot)")
    p.add_argument("--out-dir", type=Path, required=True, help="checkpoint, loss log, student.onnx")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps in all")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--lr-min", type=float, default=d.lr_min, help="end of the cosine decay")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--num-scales", type=int, default=d.num_scales,
                   help="segments N of the teacher's time axis; must divide its T")
    p.add_argument("--t-max", type=int, default=d.t_max,
                   help="noisiest grid time trained (sampling starts there)")
    p.add_argument("--target-ema", type=float, default=d.target_ema,
                   help="EMA decay mu of the target network (LCM's)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="EMA decay of the exported student")
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help="distance in x0 space")
    p.add_argument("--huber-c", type=float, default=None,
                   help="pseudo-Huber c (None: 0.00054 sqrt(C*H*W), iCT's)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every step's draws")
    p.add_argument("--dataset", default=d.dataset, choices=["mnist", "fashion-mnist"],
                   help="the data the trajectories start from")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes of training in total")
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's)")
    p.add_argument("--init", type=Path, default=None, metavar="STUDENT.onnx",
                   help="start from this student of the same teacher instead of the teacher "
                        "(weights only: continue a run whose checkpoint is gone)")
    p.add_argument("--snapshot", type=Path, default=None, metavar="OUT.onnx",
                   help="export the checkpoint in --out-dir as it stands and exit (no training)")
    p.add_argument("--weights", choices=WEIGHTS, default="ema",
                   help="which weights --snapshot exports")
    p.add_argument("--sampling", action="append", default=[], metavar="K=T1,T2,...",
                   help="--snapshot: record these K time steps for K-step sampling (repeat per "
                        "K; default: K grid times evenly spaced in index from --t-max)")
    p.add_argument("--name", default="", help="model name in the snapshot's metadata "
                                              "(empty: the teacher's name + '-cd')")
    a = p.parse_args(argv)
    if a.snapshot is not None:
        ckpt = a.out_dir / "checkpoint.pt"
        if not ckpt.exists():
            p.error(f"--snapshot: {ckpt} does not exist; start the run first")
        try:
            print(json.dumps(export_student(ckpt, a.snapshot, a.weights, a.name, a.sampling)))
        except ValueError as e:
            p.error(str(e))
        return
    if a.teacher is None:
        p.error("--teacher is required (an edgediff ONNX model to distill)")
    cfg = DistillConfig(**{f.name: getattr(a, f.name) for f in fields(DistillConfig)
                           if hasattr(a, f.name)})
    if not a.teacher.is_file():
        print(f"edgediff-train distill: error: --teacher {a.teacher} does not exist",
              file=sys.stderr)
        raise SystemExit(4)
    try:
        meta = load_teacher(a.teacher)[1]
        top_index(time_grid(meta["schedule"]["num_train_timesteps"], cfg.num_scales), cfg.t_max)
    except ValueError as e:
        p.error(str(e))  # exit 2: a teacher or option this distiller cannot use
    except Exception as e:  # noqa: BLE001 - onnx's parse errors have no common type
        p.error(f"--teacher {a.teacher} is not a readable ONNX model ({type(e).__name__}: {e})")
    if a.init is not None:
        try:
            load_init(a.init, meta, file_sha256(a.teacher))
        except ValueError as e:
            p.error(str(e))
        except FileNotFoundError:
            p.error(f"--init {a.init} does not exist")
    run_and_report("edgediff-train distill", lambda: distill(
        a.out_dir, a.teacher, cfg, a.checkpoint_every, a.time_budget_min, a.threads,
        init=a.init))


if __name__ == "__main__":
    main()

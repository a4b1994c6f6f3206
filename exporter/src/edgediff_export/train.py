"""`edgediff-train`: train a diffusion U-Net on MNIST or Fashion-MNIST with exact resume.

Objectives (weightings), prediction targets and schedules are in `objectives.py` and
`schedules.py`: eps/v/x0/score targets, simple/vlb/sgm/snr/min-snr/elbo/dsm weightings, discrete
(linear, cosine, quadratic, sigmoid) or continuous (vp, ve) schedules. The checkpoint records
them, so `edgediff-export checkpoint` writes the metadata the runtime needs to sample the model.

Every random draw of step k comes from a generator seeded by (seed, k), so a run stopped at any
checkpoint and resumed is bit-for-bit the run that never stopped (same batches, same t, same
noise), given the same torch build and thread count.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import load_dataset
from .network import build_network
from .objectives import OBJECTIVES, PREDICTIONS, Levels, check_combination, noisy, per_sample_loss
from .schedules import CONTINUOUS_KINDS, KINDS, LevelSampler, schedule_metadata
from .unet import UNetConfig, count_parameters

LOG_FIELDS = ["step", "loss", "lr", "samples_per_s", "seconds"]


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    lr_min: float = 1e-5
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    dataset: str = "mnist"
    objective: str = "simple"
    prediction: str = "eps"
    gamma: float | None = None  # None: objectives.DEFAULT_GAMMA

    def schedule_record(self) -> dict:
        return schedule_metadata(self.schedule, self.num_train_timesteps, self.beta_start,
                                 self.beta_end)

    def same_run(self, stored: dict) -> bool:
        """Whether a checkpoint's config is this one; fields added since it was written take
        their defaults (which reproduce the older behaviour)."""
        return {**TrainConfig().__dict__, **stored} == self.__dict__


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * min(frac, 1.0)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, lr: float,
                   grad_clip: float) -> None:
    """One update at learning rate `lr`, the gradient norm of `params` clipped to `grad_clip`."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def train_step_loss(model: nn.Module, cfg: TrainConfig, x0: torch.Tensor, eps: torch.Tensor,
                    t: torch.Tensor, lv: Levels, sampler: LevelSampler,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """The objective's batch loss: the mean of the per-sample weighted losses."""
    out = model(noisy(x0, eps, lv), sampler.net_time(t), labels)
    return per_sample_loss(cfg.objective, cfg.prediction, x0, eps, lv, out, cfg.gamma).mean()


def progress_bar(start: int, total: int):
    """Steps start..total with a bar on stderr, shown only on a terminal: logs of batch runs
    stay readable."""
    from tqdm import tqdm
    return tqdm(range(start, total), initial=start, total=total, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def update_ema(ema_params: list, params: list, step: int, decay: float) -> None:
    """EMA after `step`, its decay warmed up as min(decay, (1 + step) / (10 + step)) so the
    first steps' weights do not linger."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - d)


class Clock:
    """Training time counted across resumptions, the checkpoint schedule and the time budget."""

    def __init__(self, elapsed: float, checkpoint_every: int, total: int,
                 budget_min: float | None) -> None:
        self.elapsed, self.run_start = elapsed, elapsed
        self.t0 = time.time() - elapsed
        self.every, self.total, self.budget_min = checkpoint_every, total, budget_min

    def tick(self, done: int) -> tuple[bool, bool]:
        """After `done` steps: (checkpoint now, stop now: the budget is spent)."""
        self.elapsed = time.time() - self.t0
        over = self.budget_min is not None and self.elapsed > self.budget_min * 60
        return done % self.every == 0 or done == self.total or over, over

    def rate(self, steps_this_run: int, batch_size: int) -> float:
        """Samples per second since this process started."""
        return steps_this_run * batch_size / max(1e-9, self.elapsed - self.run_start)


def resume(ckpt_path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
           config_key: str, what: str, same_run: Callable[[dict], bool],
           device: torch.device | str = "cpu") -> tuple[int, float]:
    """Load a run's checkpoint if there is one: each module of `modules` (checkpoint key ->
    module) and `opt` take their stored state; returns (steps done, seconds trained), (0, 0.0)
    without a checkpoint. A checkpoint `same_run` refuses stops the program, naming the stored
    settings (`ck[config_key]`)."""
    if not ckpt_path.exists():
        return 0, 0.0
    ck = torch.load(ckpt_path, weights_only=False, map_location=device)
    if not same_run(ck):
        raise SystemExit(f"{ckpt_path} was made with other {what}; use another --out-dir or the "
                         f"same settings (stored: {ck[config_key]})")
    for key, module in modules.items():
        module.load_state_dict(ck[key])
    opt.load_state_dict(ck["opt"])
    print(f"resuming from step {ck['step']} ({ck['elapsed_s'] / 60:.1f} min trained)")
    return ck["step"], ck["elapsed_s"]


def to_cpu(state: dict) -> dict:
    """A (nested) state dict with CPU tensors: checkpoints always hold them, so a GPU run
    resumes (and exports) on any machine."""
    return {k: (to_cpu(v) if isinstance(v, dict) else v.cpu() if torch.is_tensor(v) else v)
            for k, v in state.items()}


def reset_log(log_path: Path, start: int) -> None:
    """Keep the loss log consistent with the checkpoint at `start`: rows written after it are
    dropped (those steps are trained again)."""
    rows = _log_rows(log_path, start)
    with log_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def append_log(log_path: Path, step: int, loss: float, lr: float, rate: float,
               seconds: float) -> None:
    with log_path.open("a", newline="") as f:
        f.write(f"{step},{loss:.6f},{lr:.3e},{rate:.1f},{seconds:.1f}\n")


def _log_rows(log_path: Path, start: int) -> list[dict]:
    """Rows of an earlier run's log before `start` (the checkpoint), in today's columns."""
    if not log_path.exists():
        return []
    with log_path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) < start]
    for r in rows:  # older logs: elapsed_s (now seconds) and no samples_per_s
        if "elapsed_s" in r:
            r["seconds"] = r.pop("elapsed_s")
        r.setdefault("samples_per_s", "")
    return rows


def train(out_dir: Path, cfg: TrainConfig, ucfg: UNetConfig, checkpoint_every: int,
          time_budget_min: float | None, threads: int | None, device: str = "cpu",
          data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Train (or resume) into out_dir; `data` (images [N, C, H, W] in [-1, 1], labels [N])
    replaces the named dataset, for tests on tiny data."""
    check_combination(cfg.objective, cfg.prediction, cfg.schedule)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    log_path = out_dir / "loss.csv"

    if data is None:
        x_np, y_np = load_dataset(cfg.dataset, "trainval")
        data = torch.from_numpy(x_np), torch.from_numpy(y_np)
    x_all, y_all = data[0].to(dev), data[1].to(dev)
    if tuple(x_all.shape[1:]) != (ucfg.in_channels, ucfg.image_size, ucfg.image_size):
        raise ValueError(f"the data's images are {tuple(x_all.shape[1:])}, the U-Net expects "
                         f"{(ucfg.in_channels, ucfg.image_size, ucfg.image_size)}")
    schedule = cfg.schedule_record()
    sampler = LevelSampler(schedule, dev)

    torch.manual_seed(cfg.seed)
    model = build_network(ucfg, schedule, cfg.prediction).to(dev)
    ema = build_network(ucfg, schedule, cfg.prediction).to(dev)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, elapsed = resume(
        ckpt_path, {"model": model, "ema": ema}, opt, "train_config", "settings",
        lambda ck: (UNetConfig.from_dict(ck["unet_config"]).to_dict() == ucfg.to_dict()
                    and cfg.same_run(ck["train_config"])), dev)
    print(f"U-Net: {count_parameters(model):,} parameters; {cfg.objective} objective, "
          f"{cfg.prediction} target, {cfg.schedule} schedule; training steps {start}..{cfg.steps}")

    def checkpoint(step: int) -> None:
        save_atomic({"model": to_cpu(model.state_dict()), "ema": to_cpu(ema.state_dict()),
                     "opt": to_cpu(opt.state_dict()), "step": step, "elapsed_s": elapsed,
                     "unet_config": ucfg.to_dict(), "train_config": cfg.__dict__,
                     "schedule": schedule, "prediction": PREDICTIONS[cfg.prediction],
                     "time_input": "continuous" if sampler.continuous else "index"}, ckpt_path)

    reset_log(log_path, start)
    bar = progress_bar(start, cfg.steps)
    clock = Clock(elapsed, checkpoint_every, cfg.steps, time_budget_min)
    loss_ema = None
    model.train()
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    for step in bar:
        # Draws come from a CPU generator on every device, so a step's batch, t and noise do
        # not depend on where training runs.
        g = step_generator(cfg.seed, step)
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=g)
        t = sampler.draw(cfg.batch_size, g)
        eps = torch.randn((cfg.batch_size, *x_all.shape[1:]), generator=g).to(dev)
        x0 = x_all[idx.to(dev)]
        t = t.to(dev)
        labels = None
        if ucfg.num_classes is not None:
            labels = y_all[idx.to(dev)].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
            labels[drop.to(dev)] = ucfg.num_classes
        loss = train_step_loss(model, cfg, x0, eps, t, sampler.levels(t), sampler, labels)
        lr = lr_at(step, cfg)
        optimizer_step(opt, loss, model_params, lr, cfg.grad_clip)
        update_ema(ema_params, model_params, step, cfg.ema_decay)
        done = step + 1
        save, over_budget = clock.tick(done)
        elapsed = clock.elapsed
        value = loss.item()
        rate = clock.rate(done - start, cfg.batch_size)
        append_log(log_path, step, value, lr, rate, elapsed)
        loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.1e}", samples_s=f"{rate:.0f}")
        if save:
            checkpoint(done)
        if over_budget:
            print(f"time budget reached at step {done}; rerun the same command to resume")
            break
    return ckpt_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["distill"]:
        from .distill import main as distill_main
        return distill_main(argv[1:])
    if argv[:1] == ["distill-t2i"]:
        from .distill_t2i import main as distill_t2i_main
        return distill_t2i_main(argv[1:])
    p = argparse.ArgumentParser(prog="edgediff-train", description=__doc__.splitlines()[0],
                                epilog="edgediff-train distill --help: few-step students of "
                                       "a trained model (consistency distillation); edgediff-train distill-t2i "
                                       "--help: of a text-to-image pipeline (LCM)")
    p.add_argument("--out-dir", type=Path, required=True, help="checkpoint and loss log folder")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="linear", choices=[*KINDS, *CONTINUOUS_KINDS],
                   help="discrete (index time input) or continuous vp/ve (t in [0, 1])")
    p.add_argument("--objective", default="simple", choices=list(OBJECTIVES),
                   help="loss weighting (see edgediff_export/objectives.py)")
    p.add_argument("--prediction", default="eps", choices=list(PREDICTIONS),
                   help="what the network predicts: eps, v, x0 or score (score: vp/ve only)")
    p.add_argument("--gamma", type=float, default=None,
                   help="exponent of the snr weighting (default 1) / cap of min-snr (default 5)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,4")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--attention-resolutions", default="7")
    p.add_argument("--num-classes", type=int, default=None,
                   help="train class-conditionally with label dropout (classifier-free guidance)")
    p.add_argument("--label-dropout", type=float, default=TrainConfig.label_dropout)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes of training in total")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1)")
    a = p.parse_args(argv)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                      ema_decay=a.ema_decay, seed=a.seed, schedule=a.schedule,
                      label_dropout=a.label_dropout, dataset=a.dataset, objective=a.objective,
                      prediction=a.prediction, gamma=a.gamma)
    ucfg = UNetConfig(base_channels=a.base_channels,
                      channel_mult=tuple(int(c) for c in a.channel_mult.split(",")),
                      num_res_blocks=a.num_res_blocks,
                      attention_resolutions=tuple(int(r) for r in a.attention_resolutions.split(",") if r),
                      num_classes=a.num_classes)
    try:
        check_combination(cfg.objective, cfg.prediction, cfg.schedule)
    except ValueError as e:
        p.error(str(e))  # exit 2, as for any invalid argument
    run_and_report("edgediff-train", lambda: train(a.out_dir, cfg, ucfg, a.checkpoint_every,
                                                    a.time_budget_min, a.threads, a.device))


def run_and_report(prog: str, run: Callable[[], Path]) -> None:
    """Run a training job and print its checkpoint's path as JSON."""
    try:
        path = run()
    except FileNotFoundError as e:
        # Missing data is an I/O error (exit 4, the runtime's code for it), not a usage error.
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(4) from None
    print(json.dumps({"checkpoint": str(path)}))


if __name__ == "__main__":
    main()

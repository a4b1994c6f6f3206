#!/usr/bin/env python3
"""The headline check of `edgediff elbo`: the runtime's Monte Carlo ELBO of the first N MNIST
test images under the shipped default model against an independent PyTorch computation of the
same quantity (edgediff_export.elbo, with eps from models/mnist-ddpm.onnx through onnxruntime's
Python API; its own stratified timestep draws and noise). Prints both with their standard
errors for these images and fails when they differ by more than 1%.

    PYTHONPATH=exporter/src .venv/bin/python tools/check_elbo.py [N] [K] [SEED]
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgediff_export.data import load_mnist
from edgediff_export.elbo import Schedule, onnx_eps, prior_term, stratified_kl, terms
from edgediff_export.metadata import read_metadata
from edgediff_export.schedules import betas_for

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist-ddpm.onnx"


def runtime_elbo(data: Path, k: int, seed: int) -> dict:
    binary = ROOT / "target" / "release" / "edgediff"
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    out = subprocess.run([str(binary), "elbo", "--data", str(data), "--timesteps-per-image", str(k),
                          "--seed", str(seed), "--json", "-q"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def torch_elbo(x: np.ndarray, strata: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    sc = read_metadata(MODEL)["schedule"]
    s = Schedule(betas_for(sc["kind"], sc["num_train_timesteps"], sc["beta_start"], sc["beta_end"]))
    eps = onnx_eps(MODEL)
    x0 = torch.from_numpy(x).double()
    levels = torch.round((x0 + 1.0) * 128.0).long()        # mnist.pkl stores pixel/256
    half = 1.0 / 256.0
    prior = prior_term(x0, s).numpy()
    # L_0 over 4 draws of x_1 per image, as the runtime's default.
    gen = torch.Generator().manual_seed(seed + 1)
    l0_draws = np.stack([terms(eps, x0, torch.zeros(len(x0), dtype=torch.long),
                               torch.randn(x0.shape, generator=gen, dtype=torch.float64), s, half, levels).numpy()
                         for _ in range(4)])
    l0, l0_var = l0_draws.mean(0), l0_draws.var(0, ddof=1) / 4
    kl, kl_var = stratified_kl(eps, x0, s, half, levels, strata, seed)
    return (prior + kl.numpy() + l0, kl_var.numpy() + l0_var,
            {"prior": prior, "kl": kl.numpy(), "l0": l0})


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    x = load_mnist("test")[0][:n]
    to_bpd = 1.0 / (x[0].size * math.log(2.0))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.npy"
        np.save(data, x)
        t0 = time.time()
        rt = runtime_elbo(data, k, seed)
        rt_s = time.time() - t0
    t0 = time.time()
    total, kl_var, parts = torch_elbo(x, k // 2, seed)
    pt_s = time.time() - t0
    pt = float(total.mean() * to_bpd)
    pt_se = float(math.sqrt(kl_var.sum()) / n * to_bpd)
    rel = abs(rt["bits_per_dim"] - pt) / pt
    print(f"{n} MNIST test images, default model, seed {seed}")
    print(f"runtime  {rt['bits_per_dim']:.4f} bits/dim  (draws' SE {rt['mc_standard_error']:.4f}, "
          f"SE over images {rt['standard_error']:.4f}; {k} importance-sampled timesteps/image; "
          f"L_T {rt['prior_bits_per_dim']:.2e}, KL {rt['kl_bits_per_dim']:.4f}, "
          f"L_0 {rt['reconstruction_bits_per_dim']:.4f}; {rt_s:.0f}s)")
    print(f"pytorch  {pt:.4f} bits/dim  (draws' SE {pt_se:.4f}; {k // 2} strata x 2 draws/image; "
          f"L_T {parts['prior'].mean() * to_bpd:.2e}, KL {parts['kl'].mean() * to_bpd:.4f}, "
          f"L_0 {parts['l0'].mean() * to_bpd:.4f}; {pt_s:.0f}s)")
    print(f"relative difference {100 * rel:.2f}% (limit 1%); "
          f"in combined standard errors: {abs(rt['bits_per_dim'] - pt) / math.hypot(rt['mc_standard_error'], pt_se):.1f}")
    sys.exit(0 if rel < 0.01 else 1)


if __name__ == "__main__":
    main()

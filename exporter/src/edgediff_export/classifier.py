"""`edgediff-train-classifier`: a small MNIST CNN, exported to ONNX, used to judge samples.

Input `image` float32 [N, 1, 28, 28] in [-1, 1] (the diffusion models' data range); outputs
`logits` [N, 10] and `features` [N, 128] (penultimate layer, for a domain FID).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from .data import load_mnist


class DigitCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        feats = F.relu(self.fc1(h.flatten(1)))
        return self.fc2(self.drop(feats)), feats


def evaluate(model: DigitCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000])[0].argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def train_classifier(epochs: int, seed: int, threads: int | None) -> tuple[DigitCNN, float, float]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xtr, ytr = (torch.from_numpy(a) for a in load_mnist("train"))
    xte, yte = (torch.from_numpy(a) for a in load_mnist("test"))
    model = DigitCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * (len(xtr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            # Small random shifts make the judge robust to slightly off-centre samples.
            xb = torch.roll(xtr[idx], shifts=tuple(int(s) for s in torch.randint(-2, 3, (2,), generator=g)), dims=(2, 3))
            loss = F.cross_entropy(model(xb)[0], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: test accuracy {evaluate(model, xte, yte):.4f}", flush=True)
    return model, evaluate(model, xte, yte), time.time() - t0


def export_classifier(model: DigitCNN, out: Path, accuracy: float) -> None:
    model.eval()
    tmp = out.with_suffix(".onnx.tmp")
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(tmp), input_names=["image"],
                      output_names=["logits", "features"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key = "edgediff_classifier"
    entry.value = json.dumps({"task": "mnist-digits", "input_range": [-1, 1],
                              "test_accuracy": accuracy})
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-train-classifier", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    model, acc, secs = train_classifier(a.epochs, a.seed, a.threads)
    export_classifier(model, a.out, acc)
    print(json.dumps({"out": str(a.out), "test_accuracy": acc, "train_seconds": round(secs, 1)}))


if __name__ == "__main__":
    main()

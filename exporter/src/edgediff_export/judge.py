"""`edgediff-judge`: score digit samples with the project's MNIST classifier.

Reports the share of samples the classifier labels with confidence >= 0.9 and the share of
samples per predicted class (all samples, confident or not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def judge(samples: np.ndarray, classifier: Path, threshold: float = 0.9) -> dict:
    import onnxruntime as ort

    if samples.ndim != 4 or samples.shape[1:] != (1, 28, 28):
        raise ValueError(f"samples must be [N, 1, 28, 28], got {samples.shape}")
    sess = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"image": samples[i:i + 256].astype(np.float32)})[0]
                             for i in range(0, len(samples), 256)])
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    conf, label = probs.max(axis=1), probs.argmax(axis=1)
    shares = np.bincount(label, minlength=10) / len(label)
    return {
        "n": int(len(samples)),
        "confident_share": float((conf >= threshold).mean()),
        "threshold": threshold,
        "class_shares": [round(float(s), 4) for s in shares],
        "min_class_share": float(shares.min()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-judge", description=__doc__.splitlines()[0])
    p.add_argument("samples", type=Path, help="float32 .npy [N, 1, 28, 28] in [-1, 1]")
    p.add_argument("--classifier", type=Path, default=Path("models/mnist-classifier.onnx"))
    p.add_argument("--threshold", type=float, default=0.9)
    a = p.parse_args(argv)
    print(json.dumps(judge(np.load(a.samples), a.classifier, a.threshold)))


if __name__ == "__main__":
    main()

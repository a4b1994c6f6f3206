"""`edgediff-judge`: score digit samples with the project's MNIST classifier.

Reports the share of samples the classifier labels with confidence >= 0.9 and the share of
samples per predicted class (all samples, confident or not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def center_crop(samples: np.ndarray, size: int = 28) -> np.ndarray:
    """The central size x size pixels: the text-to-image model makes 32x32 digits, MNIST's
    28x28 padded by 2 pixels of background on every side, the classifier reads 28x28."""
    h, w = samples.shape[-2:]
    if h < size or w < size or (h - size) % 2 or (w - size) % 2:
        raise ValueError(f"cannot center-crop {h}x{w} images to {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return samples[..., top:top + size, left:left + size]


def judge(samples: np.ndarray, classifier: Path, threshold: float = 0.9, crop: bool = False) -> dict:
    import onnxruntime as ort

    if crop and samples.ndim == 4:
        samples = center_crop(samples)
    if samples.ndim != 4 or samples.shape[1:] != (1, 28, 28):
        raise ValueError(f"samples must be [N, 1, 28, 28] (larger ones with --crop), got {samples.shape}")
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
        "labels": label.tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgediff-judge", description=__doc__.splitlines()[0])
    p.add_argument("samples", type=Path, help="float32 .npy [N, 1, 28, 28] in [-1, 1]")
    p.add_argument("--classifier", type=Path, default=Path("models/mnist-classifier.onnx"))
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--crop", action="store_true",
                   help="center-crop larger images (the text-to-image model's 32x32) to 28x28")
    p.add_argument("--labels", action="store_true", help="also print every sample's predicted label")
    a = p.parse_args(argv)
    result = judge(np.load(a.samples), a.classifier, a.threshold, a.crop)
    if not a.labels:
        del result["labels"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

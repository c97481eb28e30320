"""A real data set that ships with scikit-learn: the 1,797 handwritten digits (8x8, 10 classes),
upscaled to 64x64 PNGs. Builds twice with the same seed: plain onnxruntime PTQ only
(`[quantize] escalate = false`) and with the profile's escalation, and prints both results.

    python benchmarks/digits.py [--image-size 128] [--backbone mobilenet_v2] [--target cpu|PROFILE.toml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = (img / 16.0 * 255).round().astype(np.uint8)
        Image.fromarray(arr, "L").resize((64, 64), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def write_hard_digits(root: Path, train_per_class: int = 30, val_per_class: int = 8, size: int = 64,
                      seed: int = 0, noise: float = 28.0) -> Path:
    """The hard real case: scikit-learn's digits cut to few training images per class, degraded the way
    cheap cameras degrade (low contrast, sensor noise, a random shift and a tinted background), as a
    pre-split folder: train/ 30, val/ 8 images a class; test/ the rest (about 1,400 images). Float top-1
    lands well under the built-in data's: low margins, few images, a tiny val split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == label))
        splits = {"train": idx[:train_per_class], "val": idx[train_per_class:train_per_class + val_per_class],
                  "test": idx[train_per_class + val_per_class:]}
        for split, ids in splits.items():
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                glyph = Image.fromarray((d.images[i] / 16.0 * 255).round().astype(np.uint8), "L")
                glyph = np.asarray(glyph.resize((size * 3 // 4,) * 2, Image.Resampling.BILINEAR), np.float32) / 255
                canvas = np.zeros((size, size), np.float32)
                dy, dx = rng.integers(0, size - glyph.shape[0] + 1, 2)
                canvas[dy:dy + glyph.shape[0], dx:dx + glyph.shape[1]] = glyph
                tint = rng.uniform(60, 160, 3)
                ink = tint + rng.uniform(40, 70) * np.sign(rng.uniform(-1, 1))
                rgb = tint * (1 - canvas[..., None]) + ink * canvas[..., None] + rng.normal(0, noise, (size, size, 3))
                Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def build(data: Path, out: Path, escalate: bool, extra: list[str]) -> dict:
    recipe = out.parent / f"recipe-{escalate}.toml"
    recipe.write_text(f"[quantize]\nescalate = {str(escalate).lower()}\n")
    cmd = [sys.executable, "-m", "edgetl.cli", "build", str(recipe), "--data", str(data), "--out", str(out),
           "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", default="128")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--target", default="cpu", help="built-in target or profile .toml")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits")
        for escalate in (False, True):
            r = build(data, Path(tmp) / f"out-{escalate}", escalate,
                      ["--image-size", a.image_size, "--backbone", a.backbone, "--target", a.target])
            t = r["targets"][0]
            m = t["metrics"]
            lo, hi = m["accuracy_drop_ci95_pp"]
            print(f"escalate={escalate}: float {m['reference_accuracy']:.4f} int8 {m['accuracy']:.4f} "
                  f"drop {m['accuracy_drop_pp']:+.2f} pp [95% CI {lo:+.2f}, {hi:+.2f}] agreement "
                  f"{m['top1_agreement']:.4f} n_test {m['n_test']} quantizer {t['quantization']['chosen']} "
                  f"float layers {len(t['quantization']['float_nodes'])} published {t['published']} "
                  f"({r['timings']['total']:.0f} s)")
            for att in t["quantization"]["attempts"]:
                print(f"    tried {att['quantizer']}: " + (att.get("error") or
                      f"val drop {att['val_accuracy_drop_pp']:+.2f} pp, val agreement {att['val_top1_agreement']:.4f}"))


if __name__ == "__main__":
    main()

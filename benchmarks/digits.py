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

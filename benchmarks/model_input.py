"""Raw-pixel models vs float-input models (issue 18): the same build twice, once with the built-in
cpu and openvino profiles as shipped (`model_input = "uint8-nhwc"`) and once with copies that say
`float32-nchw`; then the gate's figures side by side, the build's speed evidence (vs FP32, interleaved)
and `edgetl bench` of each pair of bundles (interleaved in one process, the same random pixels
through each bundle's own contract).

    python benchmarks/model_input.py [--data builtin|digits] [--image-size 224] [--targets cpu,openvino]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = Path(__file__).resolve().parents[1] / "edgetl" / "targets"


def _profile(name: str, model_input: str, folder: Path) -> Path:
    """The built-in profile `name` with model_input replaced (same name: same bundle folder name)."""
    text = (TARGETS / f"{name}.toml").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("model_input")]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("precisions"))
    lines.insert(at + 1, f'model_input = "{model_input}"')
    path = folder / f"{name}-{model_input}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _build(data: list[str], targets: list[Path], out: Path, size: str, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "edgetl.cli", "build", *data, "--out", str(out), "--image-size", size, "--seed",
           "0", "--json", "-q", *[arg for t in targets for arg in ("--target", str(t))]]
    env = {**os.environ, "EDGETL_CACHE": str(cache), "SOURCE_DATE_EPOCH": "1767225600"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 1):
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="builtin", choices=["builtin", "digits"])
    ap.add_argument("--image-size", default="224")
    ap.add_argument("--targets", default="cpu,openvino")
    ap.add_argument("--runs", default="200")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgetl-model-input-"))
    data: list[str] = []
    if a.data == "digits":
        sys.path.insert(0, str(HERE))
        from digits import write_digits

        data = ["--data", str(write_digits(tmp / "digits"))]
    names = a.targets.split(",")
    results = {}
    for variant in ("uint8-nhwc", "float32-nchw"):
        profiles = [_profile(n, variant, tmp) for n in names]
        results[variant] = _build(data, profiles, tmp / variant, a.image_size, tmp / "cache")
    print(f"data {a.data}, {a.image_size} px; gate on the test split; speed: vs the FP32 model, interleaved\n")
    print("| target | input | chosen | accuracy | drop (pp) | agreement | speed b1 | speed b8 | latency b1 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for variant, r in results.items():
            t = next(t for t in r["targets"] if t["target"] == name)
            m = t["models"][0]
            met, sp = m["metrics"], m["speed"]
            b = next(k for k in sp if k.startswith("batch_") and k != "batch_1")
            print(f"| {name} | {variant} | {t['quantization']['chosen']} | {met['accuracy']:.4f} | "
                  f"{met['accuracy_drop_pp']:+.2f} | {met['top1_agreement']:.4f} | {sp['batch_1']['ratio']:.2f}x | "
                  f"{sp[b]['ratio']:.2f}x | {m['latency_ms']:.2f} |")
    print("\n`edgetl bench`, each pair interleaved in one process (same pixels through each contract):\n")
    print("| target | input | p50 b1 (ms) | p90 b1 (ms) | img/s at b8 |")
    print("|---|---|---|---|---|")
    for name in names:
        pair = [str(tmp / v / name) for v in results]
        if not all(Path(b, "manifest.json").is_file() for b in pair):
            print(f"| {name} | (not published: the gate failed; see the table above) | | | |")
            continue
        proc = subprocess.run([sys.executable, "-m", "edgetl.cli", "bench", *pair, "--runs", a.runs, "--rounds", "5",
                               "--json"], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        for path, v in json.loads(proc.stdout)["bundles"].items():
            variant = Path(path).parent.name
            print(f"| {name} | {variant} | {v['batch1_p50_ms']:.3f} | {v['batch1_p90_ms']:.3f} | "
                  f"{v['throughput_ips']:.1f} |")
    print(f"\n(builds in {tmp})")


if __name__ == "__main__":
    main()

"""Runtime speed, in one process on this machine: PyTorch eager FP32, onnxruntime FP32, and each
bundle of an edgetl build (through the bundle's own runtime), the build's backbone at its size.

    python benchmarks/speed.py                    # builds --target cpu/openvino/gpu into a temp dir first
    python benchmarks/speed.py --out edgetl-out   # or measures an existing build's bundles

Batch-1 latency and batch-N throughput are measured interleaved (every runner in turn, several
rounds; edgetl.bench.interleaved), so machine drift hits all alike. Ratios are against
onnxruntime FP32 (default session options, CPU provider). The FP32 baselines use the same
architecture and input shape as the bundles' models (the backbone named in the bundle's manifest
with an N-class head; latency does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TARGETS = ("cpu", "openvino", "gpu")


def fp32_baselines(workdir: Path, n_classes: int, size: int, backbone: str = "mobilenet_v2") -> dict:
    import torch

    from edgetl import backbones
    from edgetl.export import export_module
    from edgetl.runtime.engine_ort import Engine
    from edgetl.runtime.predict import Predictor

    spec = backbones.get(backbone)
    model = backbones.load_pretrained(spec, backbones.resolve_weights(spec, None), size)
    model.classifier[-1] = torch.nn.Linear(model.classifier[-1].in_features, n_classes)
    model.eval()
    onnx_path = workdir / "fp32.onnx"
    export_module(model, onnx_path, (size, size), 17)

    contract = spec.contract(size)  # the float tensor the FP32 models take

    class Eager:
        executed_by = f"torch {torch.__version__} eager"

        def logits(self, x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

    Eager.contract = contract
    ort = Predictor(Engine(onnx_path, {"providers": ["CPUExecutionProvider"]}), contract, [])
    return {"PyTorch eager FP32": Eager(), "onnxruntime FP32": ort}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="an existing build folder (default: build one now)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.batch < 2:
        ap.error("--batch: the throughput batch must be 2 or more (batch 1 is always measured)")

    from edgetl.bundle import load_predictor
    from edgetl.machine import machine_info
    from edgetl.runtime.preprocess import sample_crops
    from edgetl.speed import inputs, interleaved

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out
        if out is None:
            out = Path(tmp) / "out"
            cmd = [sys.executable, "-m", "edgetl.cli", "build", "-q", "--out", str(out)]
            for t in TARGETS:
                cmd += ["--target", t]
            subprocess.run(cmd, check=True)
        bundles = [out / t for t in TARGETS if (out / t / "manifest.json").is_file()]
        contract = json.loads((bundles[0] / "preprocess.json").read_text())
        labels = (bundles[0] / "labels.txt").read_text().splitlines()
        size = contract["input_size"][0]
        backbone = json.loads((bundles[0] / "manifest.json").read_text())["backbone"]["name"]
        runners = fp32_baselines(Path(tmp), len(labels), size, backbone)
        for b in bundles:
            runtime = json.loads((b / "runtime.json").read_text())
            for precision in runtime["models"]:
                runners[f"{b.name} bundle {precision}"] = load_predictor(b, precision)
        results = {}
        for batch, runs in ((1, args.runs), (args.batch, max(args.rounds, args.runs // 6))):
            # the same random pixels for every model, each through its own contract (float or uint8 in)
            x = inputs(runners, sample_crops(batch, contract), batch)
            times = interleaved(runners, x, runs=runs, warmup=5, rounds=args.rounds)
            for name, t in times.items():
                results.setdefault(name, {"runs_on": runners[name].executed_by})[f"batch{batch}_p50_ms"] = \
                    round(float(np.median(t)) * 1e3, 3)
                results[name][f"batch{batch}_p90_ms"] = round(float(np.percentile(t, 90)) * 1e3, 3)
    base = results["onnxruntime FP32"]
    b = args.batch
    m = machine_info()
    print(f"{backbone}, {size} px, {m['cpu']} ({m['cores']} cores); ratios = onnxruntime FP32 time / time\n")
    print(f"| model | runs on | batch 1 p50 (ms) | batch 1 p90 (ms) | vs ORT FP32, batch 1 | batch {b} (ms) "
          f"| vs ORT FP32, batch {b} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["speedup_batch1"] = round(base["batch1_p50_ms"] / r["batch1_p50_ms"], 2)
        r[f"speedup_batch{b}"] = round(base[f"batch{b}_p50_ms"] / r[f"batch{b}_p50_ms"], 2)
        print(f"| {name} | {r['runs_on']} | {r['batch1_p50_ms']:.2f} | {r['batch1_p90_ms']:.2f} | "
              f"{r['speedup_batch1']:.2f}x | {r[f'batch{b}_p50_ms']:.2f} | {r[f'speedup_batch{b}']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

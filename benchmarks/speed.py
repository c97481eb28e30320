"""Runtime speed, in one process on this machine: PyTorch eager FP32, onnxruntime FP32, and each
bundle of an edgetl build (through the bundle's own runtime), the build's backbone at its size.

    python benchmarks/speed.py                    # builds --target cpu/openvino/gpu into a temp dir first
    python benchmarks/speed.py --out edgetl-out   # or measures an existing build's bundles
    python benchmarks/speed.py --pixel-input [--size 224]   # the cpu target's INT8 model fed pixels vs
                                                  # floats, the pixel graph before/after issue 23 (no build)

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


def _old_pixel_graph(src: Path, contract: dict, out: Path) -> Path:
    """The pixel-input graph as it was before issue 23 (for the before/after figures only): Cast, then
    mean/std Expand-ed to the pixels' shape (Shape + 2x Expand per run), /255, -mean, /std, Transpose;
    the INT8 model's calibrated input quantizer after it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgetl.export import INPUT

    model = onnx.load(str(src))
    g = model.graph
    old = next(i for i in g.input if i.name == INPUT)
    dims = old.type.tensor_type.shape.dim
    for node in g.node:
        node.input[:] = ["input_normalised" if n == INPUT else n for n in node.input]
    consts = {"pixel_scale": np.float32(255.0), "pixel_mean": np.asarray(contract["mean"], np.float32),
              "pixel_std": np.asarray(contract["std"], np.float32)}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    ops = [helper.make_node("Cast", [INPUT], ["pf"], to=TensorProto.FLOAT),
           helper.make_node("Shape", ["pf"], ["ps"]),
           helper.make_node("Expand", ["pixel_mean", "ps"], ["pm"]),
           helper.make_node("Expand", ["pixel_std", "ps"], ["pstd"]),
           helper.make_node("Div", ["pf", "pixel_scale"], ["pu"]), helper.make_node("Sub", ["pu", "pm"], ["pc"]),
           helper.make_node("Div", ["pc", "pstd"], ["pn"]),
           helper.make_node("Transpose", ["pn"], ["input_normalised"], perm=[0, 3, 1, 2])]
    for i, node in enumerate(ops):
        g.node.insert(i, node)
    g.input.remove(old)
    g.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [dims[0].dim_param, dims[2].dim_value,
                                                                               dims[3].dim_value, 3]))
    onnx.save(model, str(out))
    return out


def pixel_input(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="pixel-speed-") as tmp:
        return _pixel_input(args, Path(tmp))


def _pixel_input(args, tmp: Path) -> dict:
    """The cpu target's INT8 model (NNCF PTQ of the backbone at --size, random-pixel calibration:
    speed does not depend on the ranges) as onnxruntime runs it in a bundle: float input, pixel input
    before issue 23, pixel input now (first convolution reads the pixels); the FP32 model beside it."""
    import torch

    from edgetl import backbones, export, first_layer, model_input
    from edgetl.artifact import Artifact
    from edgetl.backends import QuantInputs, runner
    from edgetl.backends.onnxruntime import OnnxRuntimeBackend
    from edgetl.profiles import load_profile
    from edgetl.runtime.preprocess import sample_crops, to_tensor
    from edgetl.speed import inputs

    spec = backbones.get(args.backbone)
    net = backbones.load_pretrained(spec, backbones.resolve_weights(spec, None), args.size)
    net.classifier[-1] = torch.nn.Linear(net.classifier[-1].in_features, 10)
    contract = spec.contract(args.size)
    fp32 = export.to_onnx(net.eval(), tmp / "fp32.onnx", contract=contract, labels=list("0123456789"))
    profile, backend = load_profile("cpu"), OnnxRuntimeBackend()
    calib = to_tensor(sample_crops(32, contract, seed=1), contract)
    int8 = backend.quantizers["nncf_ptq"](fp32, QuantInputs(calib, calib[:4], np.zeros(4), np.zeros((4, 10)), 1.0,
                                                            0.97, 0), profile, tmp)
    raw = model_input.contract_for(model_input.RAW, contract)
    models = {"onnxruntime FP32 (float in)": (fp32, contract),
              "FP32 pixels in (now)": (backend.with_raw_input(fp32, contract, tmp, "fp32"), raw),
              "INT8 float in": (int8, contract),
              "INT8 pixels in, before (Shape/Expand, calibrated)":
                  (Artifact.of(_old_pixel_graph(int8.path, contract, tmp / "old.onnx"), "onnx-int8"), raw)}
    first_layer.FIRST_LAYER = first_layer.CALIBRATED
    models["INT8 pixels in, calibrated range, constants"] = (backend.with_raw_input(int8, contract, tmp, "cal"), raw)
    first_layer.FIRST_LAYER = first_layer.FOLD
    models["INT8 pixels in, now (fold)"] = (backend.with_raw_input(int8, contract, tmp, "fold"), raw)
    runners = {name: runner(backend, art, c, [], profile, threads=args.threads, timing=True)
               for name, (art, c) in models.items()}
    results = {}
    for batch, runs in ((1, args.runs), (args.batch, max(args.rounds, args.runs // 6))):
        x = inputs(runners, sample_crops(batch, contract), batch)
        wall, cpu = _interleaved_cpu(runners, x, runs=runs, warmup=5, rounds=args.rounds)
        for name in runners:
            r = results.setdefault(name, {"runs_on": f"{runners[name].executed_by}, {args.threads or 'all'} threads"})
            r[f"batch{batch}_p50_ms"] = round(float(np.median(wall[name])) * 1e3, 3)
            r[f"batch{batch}_p90_ms"] = round(float(np.percentile(wall[name], 90)) * 1e3, 3)
            r[f"batch{batch}_cpu_ms"] = round(float(np.median(cpu[name])) * 1e3, 3)
    return results


def _interleaved_cpu(runners: dict, x: dict, *, runs: int, warmup: int, rounds: int):
    """Like edgetl.speed.interleaved, and also this process's CPU time per call: with one engine
    thread, a figure that other jobs on the machine hardly move (wall-clock time they do)."""
    import time

    wall, cpu = {k: [] for k in runners}, {k: [] for k in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            for _ in range(warmup):
                r.logits(x[name])
            for _ in range(max(1, runs // rounds)):
                c0, t0 = time.process_time(), time.perf_counter()
                r.logits(x[name])
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="an existing build folder (default: build one now)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--pixel-input", action="store_true", help="only: pixel vs float input of the cpu INT8 model")
    ap.add_argument("--size", type=int, default=224, help="--pixel-input: the input size")
    ap.add_argument("--backbone", default="mobilenet_v2", help="--pixel-input: the backbone")
    ap.add_argument("--threads", type=int, default=0, help="--pixel-input: engine threads (0: all; 1: CPU time "
                    "per call is then a figure other jobs on the machine hardly move)")
    args = ap.parse_args()
    if args.batch < 2:
        ap.error("--batch: the throughput batch must be 2 or more (batch 1 is always measured)")
    if args.pixel_input:
        return report(pixel_input(args), "onnxruntime FP32 (float in)", args, f"{args.backbone}, {args.size} px")

    from edgetl.bundle import load_predictor
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
    return report(results, "onnxruntime FP32", args, f"{backbone}, {size} px")


def report(results: dict, baseline: str, args, what: str) -> int:
    from edgetl.machine import machine_info

    base = results[baseline]
    b = args.batch
    m = machine_info()
    print(f"{what}, {m['cpu']} ({m['cores']} cores); ratios = {baseline} time / time\n")
    print(f"| model | runs on | batch 1 p50 (ms) | batch 1 p90 (ms) | vs ORT FP32, batch 1 | batch {b} (ms) "
          f"| vs ORT FP32, batch {b} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["speedup_batch1"] = round(base["batch1_p50_ms"] / r["batch1_p50_ms"], 2)
        r[f"speedup_batch{b}"] = round(base[f"batch{b}_p50_ms"] / r[f"batch{b}_p50_ms"], 2)
        print(f"| {name} | {r['runs_on']} | {r['batch1_p50_ms']:.2f} | {r['batch1_p90_ms']:.2f} | "
              f"{r['speedup_batch1']:.2f}x | {r[f'batch{b}_p50_ms']:.2f} | {r[f'speedup_batch{b}']:.2f}x |")
    if "batch1_cpu_ms" in base:
        print(f"\nCPU time per call (process time, median; ratio = {baseline}'s / the model's)\n")
        print(f"| model | batch 1 CPU ms | vs ORT FP32 | batch {b} CPU ms | vs ORT FP32 |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            r["cpu_speedup_batch1"] = round(base["batch1_cpu_ms"] / r["batch1_cpu_ms"], 2)
            r[f"cpu_speedup_batch{b}"] = round(base[f"batch{b}_cpu_ms"] / r[f"batch{b}_cpu_ms"], 2)
            print(f"| {name} | {r['batch1_cpu_ms']:.2f} | {r['cpu_speedup_batch1']:.2f}x | "
                  f"{r[f'batch{b}_cpu_ms']:.2f} | "
                  f"{r[f'cpu_speedup_batch{b}']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

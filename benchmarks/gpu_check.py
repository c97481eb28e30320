"""The GPU check: what no CPU machine can show, in one run of a few minutes on a machine with NVIDIA GPUs.

    bash benchmarks/gpu_check.sh [OUT_DIR]        # writes OUT_DIR/gpu_check.json and gpu_check.md

Needs the project's environment plus `onnxruntime-gpu` (same version as onnxruntime) for the CUDA
and TensorRT execution providers. Records, each step on its own (a failing step is recorded, the
others still run):
1. fine-tune on CUDA with 1 process and, when the machine has 2+ GPUs, 2 NCCL processes: the parity
   numbers of the two (they must match); on a 1-GPU machine `--nproc 2` must be refused (exit 2);
2. a gpu-int8 build; its FP16 and INT8 models (each with its runtime.json model_settings) through
   TensorRT -> CUDA -> CPU and CUDA -> CPU: which provider ran each node type (onnxruntime's
   profiler), batch-1 latency, and the bundle's golden self-test with each provider list
   (strict_providers on). The JSON is rewritten after each step, so a timeout keeps what ran;
3. feature extraction (the frozen trunk over the training views) on CUDA vs the CPU: rows per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

PY = sys.executable
FLAGS = ["--image-size", "96", "--seed", "0", "--json", "-q"]
PROVIDER_SETS = {"tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def edgetl(*args: str, timeout: int = 600) -> tuple[int, dict | None, str]:
    proc = subprocess.run([PY, "-m", "edgetl.cli", *args], capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        out = None
    return proc.returncode, out, proc.stderr[-2000:]


def step(record: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        record[name] = {"ok": True, **fn()}
    except Exception as e:  # recorded; the next step still runs
        record[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    record[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(record[name])[:400]}", file=sys.stderr, flush=True)


def ranks(tmp: Path) -> dict:
    import torch

    n = torch.cuda.device_count()
    base = ["build", "--strategy", "fine-tune", "--epochs", "3", "--target", "cpu", "--device", "cuda", *FLAGS]
    code1, one, err1 = edgetl(*base, "--out", str(tmp / "r1"))
    out = {"gpus": n, "one_process": {"exit": code1, "metrics": _parity(one), "stderr": err1 if code1 else ""}}
    code2, two, err2 = edgetl(*base, "--nproc", "2", "--out", str(tmp / "r2"))
    out["two_processes"] = {"exit": code2, "metrics": _parity(two), "stderr": err2[-400:]}
    if n >= 2:
        out["same_parity"] = out["one_process"]["metrics"] == out["two_processes"]["metrics"]
    else:
        out["refused_on_one_gpu"] = code2 == 2 and "NCCL takes one per process" in (two or {}).get("error", "")
    return out


def _parity(result: dict | None) -> dict | None:
    if not result or not result.get("targets"):
        return None
    m = result["targets"][0]["metrics"]
    return {k: m.get(k) for k in ("reference_accuracy", "accuracy", "top1_agreement", "n_test")}


def providers(tmp: Path) -> dict:
    import onnxruntime as ort

    code, res, err = edgetl("build", "--target", "gpu-int8", "--device", "cuda", "--out", str(tmp / "g"), *FLAGS)
    if code != 0:
        raise RuntimeError(f"gpu-int8 build exit {code}: {err[-600:]}")
    bundle = tmp / "g" / "gpu-int8"
    runtime = json.loads((bundle / "runtime.json").read_text())
    size = json.loads((bundle / "preprocess.json").read_text())["input_size"]
    x = np.random.default_rng(0).normal(size=(1, 3, *size)).astype(np.float32)
    out: dict = {"available": ort.get_available_providers(), "models": {}}
    for precision, file in runtime["models"].items():
        settings = {**runtime["settings"], **runtime.get("model_settings", {}).get(precision, {})}
        for name, provs in PROVIDER_SETS.items():
            out["models"][f"{precision}/{name}"] = _session_report(bundle / file, provs, settings, x)
        for name, provs in PROVIDER_SETS.items():
            st = subprocess.run([PY, str(bundle / "predict.py"), "--selftest", "--json", "--model", precision,
                                 "--set", f"providers={','.join(provs)}", "--set", "strict_providers=true"],
                                capture_output=True, text=True, timeout=300)
            out["models"][f"{precision}/{name}"]["selftest"] = {
                "exit": st.returncode, "result": st.stdout.strip()[:600], "stderr": st.stderr[-400:]}
    return out


def _session_report(path: Path, provs: list[str], settings: dict, x: np.ndarray) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix("")) + "-profile"
    options = [dict(settings.get("provider_options", {}).get(p, {})) for p in provs]
    for o in options:
        if "trt_engine_cache_path" in o:
            o["trt_engine_cache_path"] = str(path.parent.parent / "trt-cache")
            Path(o["trt_engine_cache_path"]).mkdir(exist_ok=True)
    sess = ort.InferenceSession(str(path), opts, providers=provs,
                                provider_options=[{k: str(v) for k, v in o.items()} for o in options])
    name = sess.get_inputs()[0].name
    for _ in range(10):
        sess.run(None, {name: x})
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    events = json.loads(Path(sess.end_profiling()).read_text())
    ran = Counter((e["args"].get("op_name"), e["args"].get("provider")) for e in events
                  if e.get("cat") == "Node" and "provider" in e.get("args", {}))
    return {"providers": sess.get_providers(), "batch1_p50_ms": round(float(np.median(times)) * 1e3, 3),
            "node_types_by_provider": {f"{op}@{p}": n for (op, p), n in sorted(ran.items())}}


def features(tmp: Path) -> dict:
    out = {}
    for device in ("cuda", "cpu"):
        code, res, err = edgetl("build", "--target", "gpu", "--device", device, "--no-cache", "--epochs", "1",
                                "--out", str(tmp / f"f-{device}"), *FLAGS)
        if code != 0 or not res:
            out[device] = {"exit": code, "stderr": err[-400:]}
            continue
        tr = res["training"]
        rows = (tr.get("feature_cache") or {}).get("rows")
        out[device] = {"feature_seconds": tr.get("feature_seconds"), "rows": rows,
                       "rows_per_s": round(rows / tr["feature_seconds"], 1) if rows and tr.get("feature_seconds")
                       else None, "device_info": tr.get("device_info")}
    return out


def markdown(record: dict) -> str:
    lines = ["| check | result |", "|---|---|"]
    for name, r in record.items():
        if isinstance(r, dict):
            lines.append(f"| {name} | {'ok' if r.get('ok') else 'FAILED'} ({r.get('seconds')} s): "
                         f"{json.dumps({k: v for k, v in r.items() if k not in ('ok', 'seconds')})[:300]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "gpu-check"))
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    record: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in (("providers", providers), ("ranks", ranks), ("feature_extraction", features)):
            step(record, name, lambda fn=fn: fn(tmp))
            (out_dir / "gpu_check.json").write_text(json.dumps(record, indent=1))  # each step kept as it ends
            (out_dir / "gpu_check.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()

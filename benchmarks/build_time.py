"""Time `edgetl build` end to end and report stage times and peak memory.

    python benchmarks/build_time.py [--backbone NAME] [--repeat N] [-- extra edgetl build flags]

Each run is a fresh `edgetl build --json` process (imports and all), so the wall time is what a
user waits. Peak RSS is the child's maximum resident set size (getrusage). The built-in data set
is rendered once beforehand so that its one-off rendering is not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "edgetl.cli", "build", "--json", "-q", "--out", str(Path(tmp) / "out"), *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode not in (0, 1):
            sys.exit(f"edgetl build failed ({proc.returncode}): {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout)
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024, "exit": proc.returncode, "result": result}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("extra", nargs="*", help="more `edgetl build` flags (after --)")
    a = ap.parse_args()
    from edgetl.synthetic import ensure_shapes

    ensure_shapes()
    from edgetl.machine import machine_info

    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}")
    for i in range(a.repeat):
        r = run_once(["--backbone", a.backbone, *a.extra])
        res = r["result"]
        print(f"run {i + 1}: wall {r['wall_s']:.1f} s (in-process total {res['timings']['total']:.1f} s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, exit {r['exit']}")
        print("  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items() if k != "total"))
        print("  peak RSS after stage (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_rss_mb"].items()))
        for t in res["targets"]:
            m = t["metrics"]
            lo, hi = m["accuracy_drop_ci95_pp"]
            print(f"  {t['target']}: float {m['reference_accuracy']:.4f} int8 {m['accuracy']:.4f} drop "
                  f"{m['accuracy_drop_pp']:+.2f} pp [95% CI {lo:+.2f}, {hi:+.2f}] agreement {m['top1_agreement']:.4f} "
                  f"n_test {m['n_test']} size {t['sizes']['ratio']:.3f}x quantizer {t['quantization']['chosen']} "
                  f"float layers {len(t['quantization']['float_nodes'])}")
            for att in t["quantization"]["attempts"]:
                print(f"    tried {att['quantizer']}: " + (att.get("error") or
                      f"val drop {att['val_accuracy_drop_pp']:+.2f} pp, val agreement {att['val_top1_agreement']:.4f}, "
                      f"{att['seconds']:.1f} s"))


if __name__ == "__main__":
    main()

"""CPU time, peak memory and val agreement of QAT (edgetl/refine/qat.py) inside a real build.

    python benchmarks/qat_cost.py [--data DIR] [--cache-dir DIR] [-- extra edgetl build flags]

Builds the cpu target with one candidate only, `qat+head_refit` (a copy of the cpu profile), in
this process, and reports for the QAT step: process CPU time (user + sys of every thread), wall
time, the process's peak RSS before and after it (getrusage: QAT is the build's largest step, so
the peak after it is QAT's), the checkpoints' val agreement and logit error, and the val figures
of the candidate as the search judged it. The float reference and the training features come
from the feature cache when it is warm. Nothing here reads the test split's numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("extra", nargs="*", help="more `edgetl build` flags (after --)")
    a = ap.parse_args()
    from click.testing import CliRunner

    from edgetl import cli
    from edgetl.refine import qat as qat_module
    from edgetl.synthetic import ensure_shapes

    if a.data is None:
        ensure_shapes()
    spent: list[dict] = []
    original = qat_module.qat

    def timed(*args, **kwargs):
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        c0, w0 = time.process_time(), time.perf_counter()
        out = original(*args, **kwargs)
        spent.append({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0, "peak_rss_before_mb": rss0,
                      "peak_rss_after_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "info": out.meta.get("qat", {})})
        return out

    for attr in ("from_float", "expensive", "record_key", "requires"):
        setattr(timed, attr, getattr(original, attr))
    qat_module.qat = timed
    with tempfile.TemporaryDirectory() as tmp:
        text = (Path(cli.__file__).parent / "targets" / "cpu.toml").read_text()
        text = re.sub(r'(?m)^name = "cpu"', 'name = "cpu-qat"', text)
        text = re.sub(r"(?m)^quantizers = \[.*\]", 'quantizers = ["qat+head_refit"]', text)
        profile = Path(tmp) / "cpu-qat.toml"
        profile.write_text(text)
        args = ["build", "--json", "-q", "--out", str(Path(tmp) / "out"), "--target", str(profile),
                "--effort", "low", *(["--data", a.data] if a.data else []),
                *(["--cache-dir", a.cache_dir] if a.cache_dir else []), *a.extra]
        res = CliRunner().invoke(cli.cli, args, catch_exceptions=False)
    result = json.loads(res.stdout[res.stdout.index("{"):])
    for s in spent:
        info = s.pop("info")
        print("qat: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()))
        print(f"  steps {info.get('steps')}, chosen step {info.get('chosen_step')}, views {info.get('n_views')}, "
              f"trained {info.get('trained', 'all')}")
        for h in info.get("history", []):
            print(f"  step {h['step']}: val agreement {h['val_agreement']:.4f}, val logit MSE {h['val_mse']:.5f}")
    for att in result["targets"][0]["quantization"]["attempts"]:
        print(f"candidate {att['quantizer']}: " + (att.get("error") or
              f"val agreement {att['val_top1_agreement']:.4f}, val drop {att['val_accuracy_drop_pp']:+.2f} pp"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"build exit {res.exit_code}, process peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()

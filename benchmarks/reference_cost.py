"""CPU time of the float reference stage (edgetl/reference.py) inside a real build.

    python benchmarks/reference_cost.py [--torch] [--stop] [--cache-dir DIR] [-- extra edgetl build flags]

Runs one `edgetl build` in this process (built-in data unless `--data` is among the flags) and
reports the process CPU time (user + sys of every thread, time.process_time) and the wall time
of the float reference stage alone, and of the whole build. `--torch` computes the reference the
way edgetl did before issue 22 (eager PyTorch, batches of 8) for comparison. CPU time is what to
compare on a shared machine: wall time there depends on the other jobs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch", action="store_true", help="eager PyTorch, as before issue 22")
    ap.add_argument("--cache-dir", default=None, help="feature cache folder (default: edgetl's)")
    ap.add_argument("--stop", action="store_true", help="end the build after the float reference")
    ap.add_argument("extra", nargs="*", help="more `edgetl build` flags (after --)")
    a = ap.parse_args()
    from click.testing import CliRunner

    from edgetl import cli, pipeline, reference, train
    from edgetl.synthetic import ensure_shapes

    ensure_shapes()
    spent: list[tuple[float, float]] = []
    original = reference.float_logits

    def timed(net, splits, p, work, device="cpu", progress=None, cache_dir=None):
        c0, w0 = time.process_time(), time.perf_counter()
        if a.torch:
            out = {s: train.forward_batches(net, x, 8, progress, s, device).numpy() for s, x in splits.items()}
        else:
            out = original(net, splits, p, work, device, progress, cache_dir)
        spent.append((time.process_time() - c0, time.perf_counter() - w0))
        if a.stop:
            raise _Stop
        return out

    pipeline.float_logits = timed
    with tempfile.TemporaryDirectory() as tmp:
        args = ["build", "-q", "--out", str(Path(tmp) / "out"), *(["--cache-dir", a.cache_dir] if a.cache_dir else []),
                *(a.extra or ["--target", "cpu"])]
        c0, w0 = time.process_time(), time.perf_counter()
        res = CliRunner().invoke(cli.cli, args, catch_exceptions=True)
        total = (time.process_time() - c0, time.perf_counter() - w0)
    rows = "torch eager" if a.torch else "onnxruntime FP32 (reference.py)"
    for cpu, wall in spent:
        print(f"float reference ({rows}): CPU {cpu:.1f} s, wall {wall:.1f} s")
    if not isinstance(res.exception, _Stop):
        print(f"build (exit {res.exit_code}): CPU {total[0]:.1f} s, wall {total[1]:.1f} s")


if __name__ == "__main__":
    main()

"""A build on a shared machine: quiet, beside a busy process, and on one CPU; the same bytes each time?

    python benchmarks/under_load.py [--repeat N] [--cold] [-- extra edgetl build flags]

Runs `edgetl build --target cpu` (built-in data unless the flags say otherwise) as a fresh process,
three ways: quiet; while another process keeps one core busy (`python -c 'while True: pass'`);
and restricted to one CPU (its affinity mask, as `taskset -c 0`). Prints each build's wall time,
its own CPU time (user + system: threads that spin while they wait show up here), the stage times,
the ratios to the quiet build, and whether every bundle's files and manifest are byte-identical
to the quiet build's. A first, unmeasured build fills the feature cache, so every measured build
reads it (as a rebuild does); `--cold` gives each build a cache of its own instead.
`OMP_WAIT_POLICY=ACTIVE python benchmarks/under_load.py` shows what spinning waits cost.
Timings depend on what else runs on the machine: measure alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def build(out: Path, cache: Path, extra: list[str], way: str) -> dict:
    """One `edgetl build` process: wall and CPU seconds, stage times, the bundles' bytes."""
    cmd = [sys.executable, "-m", "edgetl.cli", "build", "--json", "-q", "--out", str(out), "--cache-dir", str(cache),
           *(extra or ["--target", "cpu"])]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if way == "busy core" else None
    try:
        cpu0, t0 = _cpu_s(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_one_cpu if way == "one CPU" else None)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0  # the spinner is not reaped yet: not counted
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    if proc.returncode not in (0, 1):
        sys.exit(f"edgetl build ({way}) failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    bundles = {t["target"]: _digests(Path(t["bundle"])) for t in result["targets"] if t.get("bundle")}
    return {"way": way, "wall_s": wall, "cpu_s": cpu, "timings": result["timings"], "bundles": bundles}


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the three builds")
    ap.add_argument("--cold", action="store_true", help="every build with an empty feature cache")
    ap.add_argument("extra", nargs="*", help="`edgetl build` flags (after --); default: --target cpu")
    a = ap.parse_args()
    from edgetl.machine import machine_info
    from edgetl.synthetic import ensure_shapes

    ensure_shapes()  # the built-in data rendered once, not inside a measured build
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['cpus_allowed']} allowed), python {m['python']}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(edgetl default: PASSIVE)')}")
    with tempfile.TemporaryDirectory(prefix="edgetl-under-load-") as tmp:
        root = Path(tmp)
        if not a.cold:
            build(root / "warm-up", root / "cache", a.extra, "quiet")
        runs = []
        for i in range(a.repeat):
            for way in ("quiet", "busy core", "one CPU"):
                cache = root / (f"cache-{i}-{way}" if a.cold else "cache")
                runs.append(build(root / f"{i}-{way}".replace(" ", "-"), cache, a.extra, way))
    quiet = runs[0]
    for r in runs:
        same = r["bundles"] == quiet["bundles"]
        print(f"{r['way']:10s} wall {r['wall_s']:7.1f} s ({r['wall_s'] / quiet['wall_s']:.2f}x quiet)  "
              f"CPU {r['cpu_s']:7.1f} s ({r['cpu_s'] / quiet['cpu_s']:.2f}x)  bundles byte-identical to quiet: "
              f"{'yes' if same else 'NO'}")
        print("           stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items() if k != "total"))
        if not same:
            for target, files in r["bundles"].items():
                differ = sorted(f for f in files if files[f] != quiet["bundles"].get(target, {}).get(f))
                print(f"           {target}: differs in {', '.join(differ) or 'its file list'}")


if __name__ == "__main__":
    main()

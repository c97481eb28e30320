"""What a latency-budget search costs, cold and with a warm cache (docs/budget.md).

Runs budget.search (every configuration of [search] trained feature-extract, its latency model made
and timed through each target's runtime) twice over the same data with one fresh cache folder: the
first search computes every feature row, latency model and measurement; the second reads them.
Prints CPU seconds (user + sys of this process) and wall seconds of each, and their ratio (the issue
asks <= 0.3).

    python benchmarks/budget_search.py [--data DIR] [--backbones a,b] [--image-sizes 96,128,160,224]
                                       [--target cpu] [--runs 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="image folder (default: the built-in data)")
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--image-sizes", default="96,128,160,224")
    ap.add_argument("--target", action="append", default=None)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetl-budget-bench-") as tmp:
        if "EDGETL_CACHE" not in os.environ:  # the built-in data is generated into the cache folder: keep that
            os.environ["EDGETL_CACHE"] = str(Path(tmp) / "edgetl-cache")
        from edgetl import budget, prepare
        from edgetl.progress import NullProgress
        from edgetl.recipe import load_recipe
        from edgetl.threads import fix_numerics

        fix_numerics()
        cache = Path(tmp) / "cache"  # fresh: the first search is cold
        recipe = load_recipe(None, {
            "targets": args.target or ["cpu"], "out": str(Path(tmp) / "out"), "search.latency_ms": 1e9,
            "search.backbones": args.backbones.split(","), "search.runs": args.runs,
            "search.image_sizes": [int(s) for s in args.image_sizes.split(",")],
            **({"data.path": str(args.data)} if args.data else {})})
        build = prepare.scan(recipe, prepare.check(recipe, budget.space(recipe.search)))
        runs = []
        for name in ("cold", "warm"):
            c0, t0 = _cpu(), time.perf_counter()
            _, record = budget.search(build, NullProgress(), 0, cache, "cpu", Path(tmp))
            runs.append({"search": name, "cpu_s": round(_cpu() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1),
                         "chosen": record.chosen.name})
        out = {"configurations": len(record.configurations), "images": sum(len(build.dataset.split(s))
                                                                            for s in ("train", "val", "test")),
               "runs": runs, "cpu_ratio": round(runs[1]["cpu_s"] / runs[0]["cpu_s"], 3),
               "wall_ratio": round(runs[1]["wall_s"] / runs[0]["wall_s"], 3),
               "table": [{"configuration": t.name, "val_accuracy": round(t.val_accuracy, 4),
                          "latency_ms": t.latency_ms} for t in record.configurations]}
    if args.json:
        print(json.dumps(out))
    else:
        for r in runs:
            print(f"{r['search']:5s} search: {r['cpu_s']:7.1f} CPU s, {r['wall_s']:7.1f} wall s, chose {r['chosen']}")
        print(f"warm / cold: {out['cpu_ratio']:.3f} (CPU), {out['wall_ratio']:.3f} (wall); "
              f"{out['configurations']} configurations, {out['images']} images")
        for t in out["table"]:
            print(f"  {t['configuration']:24s} val {t['val_accuracy']:.4f}  {t['latency_ms']:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

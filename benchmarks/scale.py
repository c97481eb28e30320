"""Scale: peak memory and wall time from 1k to 20k photo-size images, the feature cache, --nproc,
--workers.

    python benchmarks/scale.py [--sizes 1000 5000 20000] [--root DIR] [--no-extras] [-- build flags]

Data: generated photo-size JPEGs (320 px, 10 classes: the built-in shapes, upscaled, in two colour
families), written once under --root. Each build is a fresh `edgetl build --json` process with the
default recipe and the cpu target; peak RSS is the build process's own (getrusage after every
stage), wall time what a user waits. Per size:

- cold: an empty feature cache; warm: the same build again (the feature stage reads the cache);
- on the smallest size also: `--workers 0` vs the default (the bundle's files must be identical)
  and `--nproc 2` vs 1 (gloo; parity numbers must be identical; the speed-up is reported).

Prints one line per build and a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
PHOTO = 320


def make_photos(root: Path, n: int) -> Path:
    from edgetl.synthetic import CLASSES as SHAPES
    from edgetl.synthetic import render

    folder = root / f"photos-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(n)
    for c in range(CLASSES):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        img = render(c % len(SHAPES), i // CLASSES, seed=7).resize((PHOTO, PHOTO), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)
        if c >= len(SHAPES):  # the second colour family: channels rotated
            arr = arr[..., ::-1]
        arr += rng.normal(0, 6, arr.shape)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"class{c:02d}" / f"{i:06d}.jpg",
                                                                quality=90)
    done.touch()
    return folder


def build(data: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "edgetl.cli", "build", "--json", "-q", "--data", str(data), "--out", str(out),
           "--target", "cpu", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"edgetl build failed ({proc.returncode}): {proc.stderr[-3000:]}")
    res = json.loads(proc.stdout)
    t = res["targets"][0]
    cache = res["training"].get("feature_cache") or {}
    # The build process's own peak (getrusage in the build, after every stage); decoding workers are
    # processes of their own and hold a few images each.
    row = {"wall_s": round(wall, 1), "peak_rss_mb": round(max(res["peak_rss_mb"].values())),
           "rss_by_stage": res["peak_rss_mb"], "timings": res["timings"], "exit": proc.returncode,
           "feature_s": round(res["training"]["feature_seconds"], 2), "cache_hits": cache.get("hits"),
           "cache_rows": cache.get("rows"), "agreement": t["metrics"].get("top1_agreement"),
           "drop_pp": t["metrics"].get("accuracy_drop_pp"), "accuracy": t["metrics"].get("accuracy"),
           "chosen": t["quantization"].get("chosen"), "n_test": t["metrics"].get("n_test")}
    print(f"    {out.name}: wall {row['wall_s']} s, peak RSS {row['peak_rss_mb']} MB, "
          f"feature stage {row['feature_s']} s "
          f"(cache {row['cache_hits']}/{row['cache_rows']} rows), stages {res['timings']}, "
          f"agreement {row['agreement']}, drop {row['drop_pp']} pp, {row['chosen']}, exit {row['exit']}", flush=True)
    if t.get("bundle"):
        files = json.loads((Path(t["bundle"]) / "manifest.json").read_text())["files"]
        row["files"] = {f: sha for f, sha in files.items() if f.startswith(("model", "golden/expected"))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "edgetl-scale")
    ap.add_argument("--no-extras", action="store_true", help="only the cold and warm builds")
    ap.add_argument("extra", nargs="*", help="more `edgetl build` flags (after --)")
    a = ap.parse_args()
    from edgetl.machine import machine_info

    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}", flush=True)
    rows = []
    for n in a.sizes:
        t0 = time.perf_counter()
        data = make_photos(a.root, n)
        print(f"{n} images at {data} ({time.perf_counter() - t0:.0f} s to make)", flush=True)
        with tempfile.TemporaryDirectory(prefix="edgetl-scale-") as tmp:
            cache = ["--cache-dir", str(Path(tmp) / "cache")]
            runs = {"cold": build(data, Path(tmp) / "cold", *cache, *a.extra),
                    "warm": build(data, Path(tmp) / "warm", *cache, *a.extra)}
            if n == min(a.sizes) and not a.no_extras:
                runs["workers0"] = build(data, Path(tmp) / "w0", "--workers", "0", *cache, *a.extra)
                runs["nproc1"] = build(data, Path(tmp) / "p1", "--no-cache", *a.extra)
                runs["nproc2"] = build(data, Path(tmp) / "p2", "--no-cache", "--nproc", "2", *a.extra)
        for name, r in runs.items():
            print(f"  {name}: wall {r['wall_s']} s, peak RSS {r['peak_rss_mb']} MB, feature stage {r['feature_s']} s "
                  f"(cache {r['cache_hits']}/{r['cache_rows']} rows), train {r['timings'].get('train')} s, "
                  f"agreement {r['agreement']}, drop {r['drop_pp']} pp, {r['chosen']}, exit {r['exit']}", flush=True)
        if "workers0" in runs:
            same = runs["workers0"].get("files") == runs["cold"].get("files")
            print(f"  --workers 0 vs default: bundle files identical: {same}")
        if "nproc2" in runs:
            keys = ("agreement", "drop_pp", "accuracy")
            same = all(runs["nproc1"][k] == runs["nproc2"][k] for k in keys)
            print(f"  --nproc 2 vs 1: parity identical: {same}; train stage {runs['nproc1']['timings']['train']} s "
                  f"-> {runs['nproc2']['timings']['train']} s")
        rows.append((n, runs))
    print("\n| images | cold wall | peak RSS | feature stage cold -> warm | warm wall | agreement | drop |")
    print("|---|---|---|---|---|---|---|")
    for n, runs in rows:
        c, w = runs["cold"], runs["warm"]
        print(f"| {n} | {c['wall_s']} s | {c['peak_rss_mb']} MB | {c['feature_s']} s -> {w['feature_s']} s "
              f"({c['feature_s'] / max(w['feature_s'], 1e-3):.0f}x) | {w['wall_s']} s | {c['agreement']} | "
              f"{c['drop_pp']:+.2f} pp |")


if __name__ == "__main__":
    main()

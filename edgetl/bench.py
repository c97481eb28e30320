"""`edgetl bench`: several bundles (or any Predictor-like runners) timed in one process, in turn,
through their own runtimes, so machine drift hits all of them alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .machine import current_rss_mb, machine_info
from .speed import inputs, interleaved


def _ms(v: np.ndarray, q: float) -> float:
    return round(float(np.percentile(v, q)) * 1e3, 3)


def standalone_peak_rss_mb(bundle: Path, batch: int, model: str | None = None) -> float | None:
    """Peak RSS of the bundle's own `predict.py --bench` in a fresh process (what a device would see)."""
    cmd = [sys.executable, str(Path(bundle) / "predict.py"), "--bench", "--json", "--batch", str(batch)]
    try:
        res = subprocess.run(cmd + (["--model", model] if model else []), capture_output=True, text=True,
                             timeout=600, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError):
        return None


def bench_bundles(loaders: dict[str, Callable], *, batch: int = 8, runs: int = 100, warmup: int = 10,
                  rounds: int = 3, seed: int = 0, standalone_memory: bool = True, model: str | None = None) -> dict:
    """Time bundles in turn in one process (see the module docstring): latency, throughput, cold load,
    memory. Bundles of one input size get the same random pixels, each through its own contract."""
    from .runtime.preprocess import sample_crops, to_tensor

    runners, out = {}, {}
    for name, load in loaders.items():
        before = current_rss_mb()
        t0 = time.perf_counter()
        runner = load()
        runner.logits(to_tensor(sample_crops(1, runner.contract, seed), runner.contract))
        cold = time.perf_counter() - t0
        runners[name] = runner
        out[name] = {"executed_by": runner.executed_by, "cold_load_ms": round(cold * 1e3, 1),
                     "rss_delta_mb": round(current_rss_mb() - before, 1)}
    by_size: dict[tuple, list[str]] = {}
    for name, r in runners.items():
        by_size.setdefault(tuple(r.contract["input_size"]), []).append(name)
    for names in by_size.values():
        group = {n: runners[n] for n in names}
        crops = sample_crops(batch, group[names[0]].contract, seed)
        lat = interleaved(group, inputs(group, crops, 1), runs=runs, warmup=warmup, rounds=rounds)
        lat_b = interleaved(group, inputs(group, crops, batch), runs=max(rounds, runs // 4),
                            warmup=max(1, warmup // 4), rounds=rounds)
        for n in names:
            out[n].update(batch1_p50_ms=_ms(lat[n], 50), batch1_p90_ms=_ms(lat[n], 90), batch=batch,
                          batch_p50_ms=_ms(lat_b[n], 50), throughput_ips=round(batch / np.median(lat_b[n]), 1))
    for name in runners:
        out[name]["rss_delta_mb"] = max(out[name]["rss_delta_mb"], 0.0)
        if standalone_memory and Path(name, "predict.py").is_file():
            out[name]["standalone_peak_rss_mb"] = standalone_peak_rss_mb(Path(name), batch, model)
    return {"bundles": out, "machine": machine_info(), "runs": runs, "warmup": warmup, "rounds": rounds,
            "method": "batch-1 latency: p50/p90 over all timed runs; bundles measured in turn each round; "
                      "cold load = load + first inference (runtime library already imported); "
                      "standalone_peak_rss_mb = peak RSS of the bundle's own predict.py --bench in a fresh process"}


def take_profile(target: str, backbone_names: list[str], sizes: list[int], *, n_classes: int = 10, runs: int = 60,
                 graphs_dir: Path | None = None, cache_dir: Path | None = None, progress=None) -> dict:
    """`edgetl bench --profile`: a device profile of this machine for `target` over backbones x sizes
    (device_profile.py), measured now (never read from a cache); with `graphs_dir`, the graphs too,
    for a device without torch to time with a bundle's `predict.py --profile`."""
    from . import backends, budget, device_profile, latency
    from .interrupt import temporary_folder
    from .prepare import check_profiles
    from .profiles import load_profile
    from .recipe import BuildRecipe, SearchSection

    check_profiles(BuildRecipe(targets=[target]))  # its runtime and quantizer are importable
    profile = load_profile(target)
    backend = backends.get(profile)
    pairs = budget.space(SearchSection(backbones=backbone_names, image_sizes=sizes))
    with temporary_folder("edgetl-profile-") as tmp:
        folder = (cache_dir / "budget" / "graphs") if cache_dir else Path(tmp)
        graphs = {}
        for b, s in pairs:
            if progress is not None:
                progress.stage(f"{profile.name}: latency model {b} at {s} px ({profile.precisions[0]})")
            g = latency.graph(b, s, n_classes, profile, backend, folder)
            graphs[device_profile.entry_name(b, s, g.precision)] = g
        measured = latency.measure(graphs, backend, profile, runs, cache=None, progress=progress)
        if graphs_dir is not None:
            device_profile.write_graphs(list(graphs.values()), backend, profile, graphs_dir)
        return device_profile.make(list(graphs.values()), measured, backend, profile)


def parse_space(backbones: str, image_sizes: str) -> tuple[list[str], list[int]]:
    """`--backbones a,b --image-sizes 96,128`, validated as the recipe's [search] is (UsageError)."""
    from pydantic import ValidationError

    from .errors import UsageError
    from .recipe import SearchSection, format_validation_error

    try:
        sizes = [int(s) for s in image_sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--image-sizes {image_sizes}: not comma-separated integers; fix: e.g. 96,128") from None
    try:
        s = SearchSection(backbones=[b.strip() for b in backbones.split(",") if b.strip()], image_sizes=sizes)
    except ValidationError as e:
        raise UsageError(format_validation_error(e, "--backbones / --image-sizes")) from None
    return s.backbones, s.image_sizes

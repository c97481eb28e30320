"""Every timing loop of the build and of `edgetl bench` (one: `interleaved`), and the build's speed
evidence: a model against the FP32 model through the same runtime, measured interleaved.

Each round times one call of the model and one of the baseline, in turn, so that the machine's
drift (frequency, other processes) falls on both alike; the ratio of the medians is reported. A
quick figure taken during the build, for the report and the manifest: `edgetl bench` and
benchmarks/speed.py measure carefully.
"""

from __future__ import annotations

import time

import numpy as np

RUNS = {1: 40}  # timed rounds per batch size (others: DEFAULT_RUNS)
DEFAULT_RUNS = 12
WARMUP = 3


def _batch(x, n: int) -> np.ndarray:
    """n uint8 crops of x (a loader.Split, or an array of crops), repeated when x has fewer."""
    first = np.asarray(x.crops(slice(0, n)) if hasattr(x, "crops") else x[:n])
    reps = -(-n // len(first))
    return np.ascontiguousarray(np.concatenate([first] * reps)[:n])


def inputs(runners: dict[str, object], x, n: int) -> dict[str, np.ndarray]:
    """name -> n images of x (a loader.Split or uint8 crops) as that runner's model takes them: every
    runner gets the same pixels through its own contract (float NCHW, or raw uint8 NHWC)."""
    from .runtime.preprocess import to_tensor

    crops = _batch(x, n)
    return {k: to_tensor(crops, r.contract) for k, r in runners.items()}


def interleaved(runners: dict[str, object], x, *, runs: int, warmup: int, rounds: int) -> dict:
    """name -> per-call seconds: every runner gets `warmup` calls then runs/rounds timed calls, in turn,
    for `rounds` rounds. `x`: one input for all, or name -> that runner's input."""
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            xr = x[name] if isinstance(x, dict) else x
            for _ in range(warmup):
                r.logits(xr)
            for _ in range(per_round):
                t0 = time.perf_counter()
                r.logits(xr)
                times[name].append(time.perf_counter() - t0)
    return {k: np.asarray(v) for k, v in times.items()}


def latency_ms(runner, x, warmup: int = 5, runs: int = 30) -> float:
    """Median batch-1 latency through the runner, as built (a quick figure for the report;
    `edgetl bench` measures carefully)."""
    one = {"model": runner}
    times = interleaved(one, inputs(one, x, 1), runs=runs, warmup=warmup, rounds=1)["model"]
    return round(float(np.median(times)) * 1e3, 3)


def versus(runner, baseline, x, batches=(1, 8)) -> dict:
    """{"batch_<n>": {"ms": median, "fp32_ms": baseline median, "ratio": fp32_ms / ms}, "baseline": what ran}."""
    pair = {"model": runner, "fp32": baseline}
    out: dict = {"baseline": f"fp32 via {baseline.executed_by}", "method": "interleaved medians"}
    for n in dict.fromkeys(batches):
        xb = inputs(pair, x, n)
        rounds = RUNS.get(n, DEFAULT_RUNS)
        interleaved(pair, xb, runs=WARMUP, warmup=0, rounds=WARMUP)  # warm-up, discarded
        times = interleaved(pair, xb, runs=rounds, warmup=0, rounds=rounds)  # one call each, in turn
        ms, fp32_ms = (float(np.median(times[k])) * 1e3 for k in ("model", "fp32"))
        out[f"batch_{n}"] = {"ms": round(ms, 3), "fp32_ms": round(fp32_ms, 3), "ratio": round(fp32_ms / ms, 3),
                             "runs": rounds}
    return out

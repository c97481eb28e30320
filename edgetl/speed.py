"""Speed evidence: a model against the FP32 model through the same runtime, measured interleaved.

Each round times one call of the model and one of the baseline, in turn, so that the machine's
drift (frequency, other processes) falls on both alike; the ratio of the medians is reported. A
quick figure taken during the build, for the report and the manifest: `edgetl bench` and
benchmarks/speed.py measure carefully.
"""

from __future__ import annotations

import numpy as np

RUNS = {1: 40}  # timed rounds per batch size (others: DEFAULT_RUNS)
DEFAULT_RUNS = 12
WARMUP = 3


def _batch(x, n: int) -> np.ndarray:
    """n images of x (an array or a loader.Split), repeated when x has fewer."""
    first = np.asarray(x[:n])
    reps = -(-n // len(first))
    return np.ascontiguousarray(np.concatenate([first] * reps)[:n])


def versus(runner, baseline, x, batches=(1, 8)) -> dict:
    """{"batch_<n>": {"ms": median, "fp32_ms": baseline median, "ratio": fp32_ms / ms}, "baseline": what ran}."""
    from .bench import interleaved

    pair = {"model": runner, "fp32": baseline}
    out: dict = {"baseline": f"fp32 via {baseline.executed_by}", "method": "interleaved medians"}
    for n in dict.fromkeys(batches):
        xb = _batch(x, n)
        rounds = RUNS.get(n, DEFAULT_RUNS)
        interleaved(pair, xb, runs=WARMUP, warmup=0, rounds=WARMUP)  # warm-up, discarded
        times = interleaved(pair, xb, runs=rounds, warmup=0, rounds=rounds)  # one call each, in turn
        ms, fp32_ms = (float(np.median(times[k])) * 1e3 for k in ("model", "fp32"))
        out[f"batch_{n}"] = {"ms": round(ms, 3), "fp32_ms": round(fp32_ms, 3), "ratio": round(fp32_ms / ms, 3),
                             "runs": rounds}
    return out

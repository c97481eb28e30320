"""The float reference: the trained float model's logits on the val, val-view evidence and test rows.

Every agreement and drop of the build is measured against these logits: the search's evidence
(val and its augmented views) and the gate (test). (The head refit's and QAT's teacher on the
*training* views, `view_logits`, is still the head on the feature cache's float16 training rows.)
One function computes all of them, the same way, so that the parity evidence never mixes two float references.

On the CPU the float model runs in onnxruntime as its FP32 ONNX twin (the exporter of
`edgetl/export.py`, checked against torch on real rows), not in eager PyTorch: the same function
for a fraction of the CPU time (docs/measurements.md, "Issue 22: build cost"). The float accuracy
the gate reports is therefore onnxruntime FP32's, the model a float bundle ships and the one the
INT8 models are made from; it differs from torch's by rounding only (the export check bounds it:
`export_atol`). onnxruntime's CPU kernels split work by outputs, never a sum into parts, so the
logits are the same bytes with any thread count (threads.py).

Feature-extract (the trunk is frozen): logits = the head on the trunk's FP32 rows, the rows from
the same onnxruntime twin of the trunk as the training features, kept in the feature cache as
float32 rows (a namespace of their own: `FeatureCache(dtype=float32)`), so a rebuild on the same
data computes no trunk row at all; a cold build computes them once. Cached or computed, the rows
are the same bytes, and so are the logits. Fine-tune: the whole model's twin, every build.

On CUDA the model stays in torch, in full float32 (no TF32), as the training ran it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import features
from .progress import NullProgress, Progress
from .views import EvidenceCrops

if TYPE_CHECKING:
    from .prepare import Prepared

BATCH = 32  # rows per onnxruntime run (a row's numbers do not depend on it)
ROWS = "float reference trunk rows"  # in the cache namespace: these rows are float32, not the training's float16


def float_logits(net, splits: dict, p: Prepared, work: Path, device: str = "cpu",
                 progress: Progress = NullProgress(), cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """{split name: float32 logits} for every split (loader.Split or ndarray of preprocessed rows; the
    names "val", "test", "evidence" as pipeline.py decodes them)."""
    if device.startswith("cuda"):
        from .train import forward_batches

        return {s: forward_batches(net, x, 8, progress, f"float reference ({s})", device).numpy()
                for s, x in splits.items()}
    frozen = p.recipe.train.strategy == "feature-extract"
    run = _twin(net[0] if frozen else net, p.contract, Path(work) / "float-reference")
    if not frozen:
        return {s: _batched(run, x, range(len(x)), progress, f"float reference ({s})", net[-1].out_features)
                for s, x in splits.items()}
    import torch

    from .train import Fit, feature_namespace, trunk_runtime

    cache = None
    if cache_dir is not None:
        namespace = {**feature_namespace(p.spec.name, p.weights.sha256, p.contract), "rows": ROWS,
                     "runtime": trunk_runtime(Fit())}
        cache = features.FeatureCache(cache_dir, namespace, dtype=np.float32)
    head = net[-1].eval()
    out = {}
    for name, x in splits.items():
        keys = row_keys(name, p, len(x))
        description = f"float reference ({name})"
        if not len(x):
            out[name] = np.zeros((0, head.out_features), dtype=np.float32)
            continue
        if keys is None:
            rows = _batched(run, x, range(len(x)), progress, description, None)
        else:
            def compute(order, x=x, description=description):
                for s in progress.track(range(0, len(order), BATCH), total=-(-len(order) // BATCH),
                                        description=description):
                    idx = list(order[s:s + BATCH])
                    yield idx, run(_rows_at(x, idx))

            rows = features.rows(keys, compute, cache, dtype=np.float32)
        with torch.inference_mode():
            out[name] = head(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))).numpy()
    return out


def row_keys(name: str, p: Prepared, n: int) -> list[str] | None:
    """A cache key part per row of split `name` (None: a split this module does not know)."""
    ds = p.dataset
    if name in ("val", "test"):
        keys = [f"{it.sha256}:clean" for it in ds.split(name)]
    elif name == "evidence":
        keys = EvidenceCrops(ds.split("val"), p.contract, p.evidence_views, p.recipe.seed).keys()
    else:
        return None
    return keys if len(keys) == n else None


def _twin(module, contract: dict, folder: Path):
    """batch -> float32 outputs of `module` by its onnxruntime twin (train.trunk_rows on the CPU), set up
    on the first call (a warm cache never needs it)."""
    runner: list = []

    def run(x: np.ndarray) -> np.ndarray:
        if not runner:
            from .train import Fit, trunk_rows

            folder.mkdir(parents=True, exist_ok=True)
            runner.append(trunk_rows(module.eval(), contract, Fit(), folder, check=x[:4]))
        return runner[0](x)

    return run


def _rows_at(x, idx: Sequence[int]) -> np.ndarray:
    """x's rows idx, float32 contiguous (one read when they follow each other)."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1:
        rows = x[idx[0]:idx[-1] + 1]
    else:
        rows = x[list(idx)]
    return np.ascontiguousarray(rows, dtype=np.float32)


def _batched(run, x, order: Sequence[int], progress: Progress, description: str, width: int | None) -> np.ndarray:
    starts = range(0, len(order), BATCH)
    parts = [run(_rows_at(x, order[s:s + BATCH])) for s in progress.track(starts, total=len(starts),
                                                                         description=description)]
    if parts:
        return np.concatenate(parts).astype(np.float32, copy=False)
    return np.zeros((0, width or 0), dtype=np.float32)

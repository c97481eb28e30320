"""Backends: a few classes under the target profiles. A profile names its backend by `backend = "..."`.

A backend knows how to quantize an exported FP32 ONNX model (a list of named quantizers the
profile picks from), how to run a model exactly as its bundle will, and which runtime files
go into a bundle. Adding a target is a profile TOML; adding a runtime is one class here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..artifact import Artifact
from ..errors import UsageError
from ..profiles import TargetProfile


@dataclass
class QuantInputs:
    """What a quantizer may look at: calibration images (train split) and the validation split.
    Never the test split: that is for the gate only."""

    calibration: np.ndarray  # preprocessed calibration tensors, NCHW float32
    val_x: np.ndarray
    val_y: np.ndarray
    val_reference_logits: np.ndarray  # float model's logits on val_x
    max_drop_pp: float
    target_agreement: float  # what the quantizer search aims for on val (>= the gate's floor)
    seed: int


class Runner(Protocol):
    def logits(self, batch: np.ndarray) -> np.ndarray: ...


Quantizer = Callable[[Artifact, QuantInputs, TargetProfile, Path], Artifact]


class Backend(Protocol):
    name: str
    quantizers: dict[str, Quantizer]
    requires: dict[str, tuple[str, str]]  # quantizer -> (module, pip extra)

    def runner(self, model: Path, contract: dict, labels: list[str], profile: TargetProfile) -> Runner: ...

    def bundle_files(self, artifact: Artifact) -> dict[str, Path]: ...

    def runtime_config(self, profile: TargetProfile) -> dict: ...

    def versions(self) -> dict[str, str]: ...

    def float_nodes(self, artifact: Artifact) -> list[str]: ...


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register(name: str):
    def deco(factory):
        _BACKENDS[name] = factory
        return factory

    return deco


def get(profile: TargetProfile) -> Backend:
    from . import onnxruntime as _ort  # noqa: F401  (registers itself)

    if profile.backend not in _BACKENDS:
        raise UsageError(f"{profile.source}: backend '{profile.backend}' is unknown; "
                         f"fix: use one of {', '.join(sorted(_BACKENDS))}")
    backend = _BACKENDS[profile.backend]()
    unknown = [q for q in profile.quantization.quantizers if q not in backend.quantizers]
    if unknown:
        raise UsageError(f"{profile.source}: quantizer(s) {unknown} not offered by backend '{profile.backend}'; "
                         f"fix: use {', '.join(backend.quantizers)}")
    return backend

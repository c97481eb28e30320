"""Backends: a few classes under the target profiles. A profile names its backend by `backend = "..."`.

A backend knows how to make a target's models from the exported FP32 ONNX (named INT8 quantizers
the profile picks from, plus float conversions), which engine runs them (a torch-free file in
edgetl/runtime/ that goes into the bundle and that the parity gate uses too), which settings that
engine gets, and which files a model is. Adding a target is a profile TOML; adding a runtime is
one backend class here and one engine file.
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
    # Seeded augmented views of the val images (loader.Split, image-major: rows k*i .. k*i + k - 1 are
    # image i's) and the float model's logits on them: agreement evidence that needs no labels.
    evidence_x: object = None
    evidence_reference_logits: np.ndarray | None = None
    evidence_views: int = 0  # augmented views per val image (0: val alone)


Quantizer = Callable[[Artifact, QuantInputs, TargetProfile, Path], Artifact]


def weight_limit(q: np.ndarray) -> int:
    """The symmetric grid existing INT8 weights `q` are on: 63 (7-bit, profiles.py: overflow_fix; what a
    7-bit quantizer writes has |q| <= 64) or 127. A rewritten layer keeps its quantizer's grid."""
    return 63 if np.abs(np.asarray(q).astype(np.int16)).max() <= 64 else 127


def symmetric_int8_rows(w: np.ndarray, per_tensor: bool = False, limit: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 (zero point 0, -limit..limit; 63 for 7-bit weights) per row of `w`, or with one
    scale for all rows: (int8 values, float32 scales — one per row, or one)."""
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / limit
    if per_tensor:
        scale = np.full_like(scale, scale.max())
    q = np.clip(np.round(w / scale[:, None]), -limit, limit).astype(np.int8)
    return q, (scale[:1] if per_tensor else scale).astype(np.float32)


class Backend(Protocol):
    name: str
    engine: str  # runtime/engine_<engine>.py runs this backend's models
    requires: dict[str, tuple[str, str]]  # quantizer -> (module, pip extra); "*" -> needed for anything
    quantizers: dict[str, Quantizer]
    runtime_requires: list[str]  # pip packages a device needs to run the bundle
    cpp: str | None  # runtime/cpp/<cpp>/: the C++ consumer (CMakeLists.txt, main.cpp) a bundle carries

    def check(self, profile: TargetProfile) -> None:
        """Reject settings this backend cannot honour (UsageError), before any work starts."""
        ...

    def convert(self, fp32: Artifact, precision: str, profile: TargetProfile, workdir: Path) -> Artifact:
        """A float model (fp32/fp16) in this backend's format."""
        ...

    def model_files(self, artifact: Artifact, stem: str) -> dict[str, Path]:
        """Bundle-relative names (first = the file the engine loads) -> source files."""
        ...

    def settings(self, profile: TargetProfile, validating: bool = False) -> dict:
        """Engine settings: what the bundle's runtime.json carries, or (validating=True) what the
        build's parity gate runs with."""
        ...

    def model_settings(self, profile: TargetProfile, precision: str) -> dict:
        """Settings one model needs on top of the bundle's (runtime.json "model_settings")."""
        ...

    def versions(self) -> dict[str, str]: ...

    def limit_threads(self, settings: dict, threads: int, spinning: bool = True) -> dict:
        """Engine settings with intra-op threads capped at `threads`; spinning=False: idle engine
        threads sleep at once (the build's own runs, on a machine it may share)."""
        ...

    def float_nodes(self, artifact: Artifact, convolutions_only: bool = False) -> list[str]:
        """Compute layers (or only convolutions) whose weights are not INT8: they run in float."""
        ...

    def head_features(self, artifact: Artifact, profile: TargetProfile) -> Callable:
        """batch -> (the features the classifier head receives, logits), through this backend."""
        ...

    def with_head(self, artifact: Artifact, weight: np.ndarray, bias: np.ndarray, workdir: Path,
                  stem: str) -> Artifact:
        """A copy of the model with the head's weight and bias replaced, quantized as the head was."""
        ...

    def from_qdq_onnx(self, qdq: Path, fp32: Artifact, profile: TargetProfile, workdir: Path, name: str) -> Artifact:
        """This backend's INT8 model from an ONNX QDQ model made elsewhere (QAT)."""
        ...

    def with_raw_input(self, artifact: Artifact, contract: dict, workdir: Path, stem: str) -> Artifact:
        """A copy of the model that takes uint8 RGB NHWC pixels, the contract's normalisation inside
        (model_input.py); its outputs are the model's on the preprocessed pixels."""
        ...


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register(name: str):
    """Decorator: registers a backend factory under `name` (a profile's `backend`)."""
    def deco(factory):
        _BACKENDS[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    from . import onnxruntime as _ort  # noqa: F401  (each module registers itself)
    from . import openvino as _ov  # noqa: F401


def names() -> list[str]:
    """Registered backend names, sorted."""
    _load_builtin()
    return sorted(_BACKENDS)


def get(profile: TargetProfile) -> Backend:
    """The profile's backend; UsageError naming the registered ones otherwise."""
    _load_builtin()
    if profile.backend not in _BACKENDS:
        raise UsageError(f"{profile.source}: backend '{profile.backend}' is unknown; "
                         f"fix: use one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[profile.backend]()


def runner(backend: Backend, artifact: Artifact, contract: dict, labels: list[str], profile: TargetProfile,
           validating: bool = True, threads: int = 0, timing: bool = False):
    """A Predictor running `artifact` through the backend's bundle engine (what the device runs),
    with `threads` intra-op threads (a target built beside others gets its share; 0: the CPUs this
    process may use, threads.py). Its idle threads sleep, except for `timing` (the speed evidence
    measures the engine as the device runs it)."""
    from ..runtime.predict import Predictor, load_engine
    from ..threads import engine as engine_threads

    settings = backend.limit_threads(backend.settings(profile, validating), threads or engine_threads(),
                                     spinning=timing)
    engine = load_engine(backend.engine).Engine(artifact.path, settings)
    return Predictor(engine, contract, labels)

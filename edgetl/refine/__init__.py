"""Parity recovery after quantization: one small module per method.

A refiner takes a quantized model and returns a better one: `(artifact, RefineInputs, backend,
profile, workdir) -> Artifact`. It sees the training views, the float model's outputs on them and
the validation split — never the test split, which RefineInputs does not carry. The quantizer
search (edgetl/search.py) treats "nncf_ptq+head_refit" like any other candidate: built, then
judged on the validation split.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..backends import QuantInputs
from ..views import TrainViews

# Work that targets share (the teacher logits, a QAT model) is computed once, under this lock, also
# when targets are built side by side (--jobs).
SHARED = threading.RLock()


@dataclass
class RefineInputs:
    """Training and validation evidence for a refiner. By construction it holds no test data."""

    data: QuantInputs  # calibration + validation split + the float model's val logits
    views: TrainViews  # the clean + augmented training views the head was trained on
    head: tuple[np.ndarray, np.ndarray]  # the float model's head: weight (classes x features), bias
    model: object = None  # the float torch model (refiners that train: QAT)
    teacher: Callable[[], np.ndarray] | None = None  # computes the float logits on the training views
    shared: dict = field(default_factory=dict)  # work every target of the build shares (under SHARED)

    def teacher_logits(self) -> np.ndarray:
        """The float model's logits on every training view (computed once, shared by all targets)."""
        with SHARED:
            if "teacher" not in self.shared:
                self.shared["teacher"] = np.asarray(self.teacher(), dtype=np.float32)
            return self.shared["teacher"]


Refiner = Callable[[Artifact, RefineInputs, object, object, Path], Artifact]


def onnx_teacher(fp32: Artifact, views: TrainViews, batch: int = 16) -> Callable[[], np.ndarray]:
    """The float logits on the training views through onnxruntime's FP32 session (same function as
    the float model; checked against torch at export)."""

    def run() -> np.ndarray:
        import onnxruntime as ort

        from ..export import INPUT
        from ..threads import ort_options

        sess = ort.InferenceSession(str(fp32.path), ort_options(), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {INPUT: x})[0] for x in views.batches(batch)])

    return run


def refiners() -> dict[str, Refiner]:
    """name -> refiner. A refiner with `from_float = True` may start a chain (it takes the float model)."""
    from .head_refit import head_refit
    from .qat import qat

    return {"head_refit": head_refit, "qat": qat}

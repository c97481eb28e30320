"""The two bodies of evidence a target is built and judged from, kept apart by construction.

`SearchEvidence` is what the INT8 search and the refiners may see: the calibration images (train
split), the val split with the float model's logits and seeded augmented views of it, the training
views, the float head and model, and the float logits on the training views (the teacher).
`GateEvidence` is what only the gate sees: the test split, its labels, the float logits on it and
its files. The search receives a `SearchEvidence` alone, so "never tuned on test" holds because
the test split is not there, not because a test poisons it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .artifact import Artifact
from .backends import QuantInputs
from .refine import RefineInputs, onnx_teacher
from .views import TrainViews


@dataclass
class SearchEvidence:
    calibration: np.ndarray  # preprocessed, class-balanced training images
    val_x: object  # loader.Split: the val images, preprocessed (read in batches)
    val_y: np.ndarray
    val_reference: np.ndarray  # float logits on val_x
    views: TrainViews  # the clean + augmented training views (the head was trained on them)
    head: tuple[np.ndarray, np.ndarray]  # the float model's classifier: weight, bias
    model: object  # the float torch model (refiners that train: QAT)
    view_logits: np.ndarray | None = None  # float logits on the training views, when training made them
    evidence_x: object = None  # loader.Split: seeded augmented views of the val images, image-major
    evidence_reference: np.ndarray | None = None  # float logits on evidence_x
    shared: dict = field(default_factory=dict)  # work the targets share (teacher logits, QAT models)

    @property
    def evidence_views(self) -> int:
        return len(self.evidence_x) // len(self.val_y) if self.evidence_x is not None and len(self.val_y) else 0

    def quant_inputs(self, max_drop_pp: float, target_agreement: float, seed: int) -> QuantInputs:
        return QuantInputs(self.calibration, self.val_x, self.val_y, self.val_reference, max_drop_pp,
                           target_agreement, seed, self.evidence_x, self.evidence_reference, self.evidence_views)

    def refine_inputs(self, qins: QuantInputs, fp32: Artifact) -> RefineInputs:
        known = self.view_logits
        teacher: Callable[[], np.ndarray] = (lambda: known) if known is not None else onnx_teacher(fp32, self.views)
        return RefineInputs(qins, self.views, self.head, self.model, teacher, self.shared)


@dataclass
class GateEvidence:
    x: object  # loader.Split: the test images, preprocessed
    y: np.ndarray
    reference: np.ndarray  # float logits on x
    files: list[str]  # every test image's file, relative to the data folder, in order (changed ones are shown)

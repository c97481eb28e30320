"""NNCF calls shared by the onnxruntime and OpenVINO backends: one place decides preset, bias
correction, activation scheme and the accuracy-control metric; each backend passes its own model
and a way to run it."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable

import numpy as np

from .. import interrupt
from ..errors import BudgetExceeded, require
from ..export import INPUT
from ..profiles import TargetProfile
from . import QuantInputs

log = logging.getLogger(__name__)
RANKING_SUBSET = 32  # validation images NNCF ranks layer sensitivity on (bounds the work, not the clock)
MAX_RESTORE_STEPS = 6  # accuracy control's restore iterations, at most


def import_nncf():
    """NNCF logs and draws progress bars on stdout; edgetl keeps stdout for results (--json). Its
    import loads torch's cpp_extension, which warns about CUDA_HOME on a machine without a CUDA
    runtime: noise in a release pipeline's log, so that one logger is kept to errors."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    nncf = require("nncf", "nncf")
    nncf_log = logging.getLogger("nncf")
    for handler in nncf_log.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    if not logging.getLogger("edgetl").isEnabledFor(logging.INFO):
        nncf.set_log_level(logging.WARNING)
    return nncf


def _singles(x: np.ndarray) -> list[np.ndarray]:
    return [x[i:i + 1] for i in range(len(x))]  # NNCF statistics want batch 1


def activation_range(name: str):
    """NNCF's range estimator for activations (profiles.py: activation_range); None = NNCF's default."""
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as R

    return {"mean_minmax": None, "mean_quantile": R.MEAN_QUANTILE, "histogram": R.HISTOGRAM,
            "minmax": R.MINMAX}[name]


def quantize_kwargs(nncf, data: QuantInputs, profile: TargetProfile) -> dict:
    """Keyword arguments of nncf.quantize from the profile (also used by accuracy control)."""
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationMode,
        QuantizationParameters,
    )

    q = profile.quantization
    preset = q.preset or ("performance" if q.symmetric_activations else "mixed")
    mode = QuantizationMode.SYMMETRIC if q.symmetric_activations else QuantizationMode.ASYMMETRIC
    fix = {"enable": OverflowFix.ENABLE, "first_layer": OverflowFix.FIRST_LAYER, "disable": OverflowFix.DISABLE}
    # Per-tensor activations: onnxruntime's fused INT8 kernels and TensorRT take one scale each.
    adv = AdvancedQuantizationParameters(overflow_fix=fix[q.overflow_fix],
                                         activations_quantization_params=QuantizationParameters(
                                             per_channel=False, mode=mode),
                                         activations_range_estimator_params=activation_range(q.activation_range))
    kw = dict(preset={"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[
        preset], subset_size=len(data.calibration), fast_bias_correction=q.bias_correction == "fast",
        advanced_parameters=adv)
    if q.float_op_types:
        kw["ignored_scope"] = nncf.IgnoredScope(types=q.float_op_types)
    return kw


class _Pairs:
    """(image as a batch of one, float model's class) per val image, read when NNCF asks for it."""

    def __init__(self, x, classes: list[int]):
        self.x, self.classes = x, classes

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.x[i:i + 1], self.classes[i]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def calibration(nncf, data: QuantInputs):
    """The calibration images (train split) as an nncf.Dataset of single images."""
    return nncf.Dataset(_singles(data.calibration), lambda b: {INPUT: b})


def ptq(model, data: QuantInputs, profile: TargetProfile):
    """nncf.quantize on the calibration images (train split)."""
    nncf = import_nncf()
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, calibration(nncf, data), **quantize_kwargs(nncf, data, profile))


def accuracy_control(model, data: QuantInputs, profile: TargetProfile, compile_fn: Callable):
    """nncf.quantize_with_accuracy_control on the validation split: reverts the most harmful layers.

    The metric is per-image top-1 *agreement with the float model* with max drop
    1 - target_agreement: exactly what the search asks for, and it sees damage even when the INT8
    model's accuracy happens to hold (errors that cancel out). `compile_fn(model)` returns a
    callable batch -> logits; NNCF calls the metric once per image with the same model, so the
    compiled model is cached per model object."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    kw = quantize_kwargs(nncf, data, profile)
    pairs = _Pairs(data.val_x, data.val_reference_logits.argmax(1).tolist())
    val = nncf.Dataset(pairs, lambda item: {INPUT: item[0]})
    cache: dict = {}
    budget, t0 = profile.quantization.mixed_precision_budget_s, time.perf_counter()

    def validate(candidate, items) -> tuple[float, list[float]]:
        interrupt.check()  # NNCF's loop, in a target's thread under --jobs, stops at an interrupt
        if budget is not None and time.perf_counter() - t0 > budget:
            raise BudgetExceeded(f"mixed_precision passed its {budget:g} s limit "
                                 "(quantization.mixed_precision_budget_s); the whole candidate is dropped")
        if cache.get("model") is not candidate:
            cache.update(model=candidate, run=compile_fn(candidate))
        same = [float(cache["run"](x).argmax() == k) for x, k in items]
        return float(np.mean(same)) if same else 0.0, same

    # Ranking layers by sensitivity is the slow part: rank on a subset of the validation split.
    # NNCF re-ranks every remaining layer after each step that does not help; bound the steps.
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=min(len(pairs), RANKING_SUBSET),
                                                  max_num_iterations=MAX_RESTORE_STEPS)
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize_with_accuracy_control(
            model, calibration(nncf, data), val, validate, max_drop=max(0.0, 1.0 - data.target_agreement),
            drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer,
            advanced_quantization_parameters=kw.pop("advanced_parameters"), **kw)

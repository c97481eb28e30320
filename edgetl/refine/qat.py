"""Quantization-aware training with distillation (NNCF's torch backend), bounded in steps.

The float model is the teacher: the student (a copy, BatchNorm folded into the convolutions, so
its statistics are frozen by construction) is quantized by `nncf.quantize` on the calibration
images (per-channel symmetric weights, per-tensor activations, as the PTQ path), then trained for
at most `qat_max_steps` steps (`qat_epochs` epochs over the training views when fewer) to
reproduce the teacher's logits (MSE, the refit's objective; optionally plus a KL term on softened
logits) — every weight and every quantizer scale trains. The checkpoint is chosen on the
validation split by its logit error against the float model (a continuous score: agreement on a
hundred images moves in steps of one image); "no training" is one of the choices. Nothing here
reads a clock except an optional limit that drops the whole candidate. The result is exported as
ONNX QDQ and handed to the backend, which makes its own model
of it (onnxruntime: the same uint8 re-encoding as PTQ so every Conv fuses; OpenVINO: convert_model).

Pitfalls handled here (NNCF 3.4 / torch 2.14): the top-level module must not be nn.Sequential
(NNCF adds a hook-storage child that Sequential.forward would call); NNCF JIT-compiles its
fake-quantize op on first use (~70 s, longer than its default load timeout); `nncf.strip` needs
torchao, so each quantizer is switched to NNCF's own Q/DQ export mode instead; the export carries
scales as Constant nodes and float weights behind QuantizeLinear, folded here into INT8
initializers (what the PTQ path produces) before any re-encoding.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import numpy as np

from .. import interrupt
from ..artifact import Artifact
from ..errors import EdgetlError
from ..export import drop_unused_initializers
from . import SHARED, RefineInputs

log = logging.getLogger(__name__)
BATCH = 16
# A step's 16 images go forward and backward MICRO at a time, their gradients summed (the loss is a
# mean, each part weighted by its share): the same step as one batch of 16 up to summation order,
# with a quarter of the activations held for the backward pass (peak memory: docs/measurements.md).
MICRO = 4
CALIB_BATCH = 16


def _torch_modules():
    """The student wrapper, defined lazily (torch is imported only when QAT runs)."""
    from torch import nn

    class Student(nn.Module):
        def __init__(self, trunk, head):
            super().__init__()
            self.trunk, self.head = trunk, head

        def forward(self, x):
            return self.head(self.trunk(x))

    return Student


def fold_batchnorm(model):
    """Fold every Conv2d -> BatchNorm2d pair (running statistics) into the convolution, in place."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for parent in model.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    return model


def _torch_native_fake_quantize() -> None:
    """NNCF's torch fake-quantize ops on the CPU come from a C++ extension it compiles on first use
    (about 2.5 min on 2 cores; a C++ compiler needed), else from reference ops it wraps in
    torch.compile (Inductor: another C++ build, about 25 s per process here; eager where that fails).
    The eager reference ops give the same outputs and input gradients (the scale gradient differs in
    summation order, ~1e-5): edgetl always runs them, so QAT compiles nothing and trains alike on every
    machine, compiler or not."""
    from nncf.torch.quantization import extensions, reference
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # if the patch below misses: no 60 s limit
    namespace = extensions.QuantizedFunctionsCPU
    applied = getattr(namespace, "_loaded_namespace", "absent") in (None, ReferenceQuantizedFunctions)
    if applied:
        namespace._loaded_namespace = ReferenceQuantizedFunctions
    for wrapper in (getattr(reference, "torch_forward", None), getattr(reference, "torch_backward", None)):
        func = getattr(wrapper, "_func", None)
        if func is not None and getattr(wrapper, "_compiled_func", "absent") in (None, func):
            wrapper._compiled_func = func  # eager: the wrapper's own fallback when compiling fails
        else:
            applied = False
    if not applied:
        log.warning("QAT: this NNCF version's fake-quantize ops could not be set to its eager reference ops; "
                    "NNCF may compile its CPU extension (minutes, a C++ compiler needed) and QAT results may "
                    "differ between machines with and without a compiler")


def _quantize(student, inp: RefineInputs, profile):
    import torch

    from ..backends.nncf_common import activation_range, import_nncf

    nncf = import_nncf()
    _torch_native_fake_quantize()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationMode,
        QuantizationParameters,
    )

    q = profile.quantization
    calib = torch.from_numpy(inp.data.calibration)
    items = [calib[i:i + CALIB_BATCH] for i in range(0, len(calib), CALIB_BATCH)]
    mode = QuantizationMode.SYMMETRIC if q.symmetric_activations else QuantizationMode.ASYMMETRIC
    preset = q.preset or ("performance" if q.symmetric_activations else "mixed")
    adv = AdvancedQuantizationParameters(
        # 7-bit weights where the profile asks for them everywhere (the exported model then computes in
        # onnxruntime what the fake-quantized torch model computed); the first layer is refolded anyway.
        overflow_fix=OverflowFix.ENABLE if q.overflow_fix == "enable" else OverflowFix.DISABLE,
        activations_quantization_params=QuantizationParameters(per_channel=False, mode=mode),
        activations_range_estimator_params=activation_range(q.activation_range),
        weights_quantization_params=QuantizationParameters(per_channel=q.per_channel, mode=QuantizationMode.SYMMETRIC))
    return nncf.quantize(student, nncf.Dataset(items), subset_size=len(items), advanced_parameters=adv,
                         preset={"mixed": nncf.QuantizationPreset.MIXED,
                                 "performance": nncf.QuantizationPreset.PERFORMANCE}[preset])


def _val_score(qm, inp: RefineInputs) -> tuple[float, float]:
    import torch

    x, ref = inp.data.val_x, inp.data.val_reference_logits
    with torch.no_grad():
        out = np.concatenate([qm(torch.from_numpy(x[s:s + 32])).numpy() for s in range(0, len(x), 32)])
    return float((out.argmax(1) == ref.argmax(1)).mean()), float(((out - ref) ** 2).mean())


def plan(n_views: int, epochs: int, max_steps: int, checkpoints: int) -> tuple[int, list[int]]:
    """(total steps, the steps after which the val score is taken): a function of the data's size
    and the profile alone."""
    per_epoch = -(-n_views // BATCH)
    total = max(1, min(epochs * per_epoch, max_steps))
    marks = sorted({max(1, round(total * (j + 1) / checkpoints)) for j in range(checkpoints)})
    return total, marks


def _loss(student, teacher, q):
    from torch.nn import functional as F

    loss = F.mse_loss(student, teacher)
    if q.qat_loss == "mse+kl":
        t = q.qat_temperature
        loss = loss + t * t * F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                                       log_target=True, reduction="batchmean")
    return loss


def _train(qm, inp: RefineInputs, profile, deadline: float | None) -> dict:
    """Distillation steps; returns the history and leaves the val-best checkpoint loaded. The model
    stays in eval mode while it trains: no BatchNorm is left to update, and dropout would only add
    noise to a deterministic teacher (gradients flow through the fake quantizers either way)."""
    import torch

    from ..errors import BudgetExceeded

    q = profile.quantization
    torch.manual_seed(inp.data.seed)
    qm.eval()
    teacher = torch.from_numpy(inp.teacher_logits())
    opt = torch.optim.AdamW(qm.parameters(), lr=q.qat_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(inp.data.seed)
    total, marks = plan(len(inp.views), q.qat_epochs, q.qat_max_steps, q.qat_checkpoints)
    agree, mse = _val_score(qm, inp)
    history = [{"step": 0, "val_agreement": agree, "val_mse": round(mse, 6)}]
    best, best_state = (-mse, 0), copy.deepcopy(qm.state_dict())
    step = 0
    while step < total:
        order = torch.randperm(len(inp.views), generator=gen).tolist()
        for s, x in zip(range(0, len(order), BATCH), inp.views.batches(BATCH, order=order), strict=True):
            idx = torch.as_tensor(order[s:s + BATCH])
            if len(idx) < 2:
                continue
            opt.zero_grad()
            for m in range(0, len(idx), MICRO):  # the step's gradient, a few images at a time (memory)
                part = idx[m:m + MICRO]
                loss = _loss(qm(torch.from_numpy(x[m:m + MICRO])), teacher[part], q) * (len(part) / len(idx))
                loss.backward()
            opt.step()
            step += 1
            interrupt.check()  # in a target's thread under --jobs
            if deadline is not None and time.perf_counter() > deadline:
                raise BudgetExceeded(f"qat passed its {q.qat_budget_s:g} s limit at step {step} of {total} "
                                     "(quantization.qat_budget_s); the whole candidate is dropped")
            if step in marks:
                agree, mse = _val_score(qm, inp)
                history.append({"step": step, "val_agreement": agree, "val_mse": round(mse, 6)})
                if (-mse, -step) > best:
                    best, best_state = (-mse, -step), copy.deepcopy(qm.state_dict())
            if step >= total:
                break
    qm.load_state_dict(best_state)
    qm.eval()
    return {"history": history, "steps": total, "chosen_step": abs(best[1]),
            "val_agreement": next(h["val_agreement"] for h in history if h["step"] == abs(best[1])),
            "loss": q.qat_loss}


def export_qdq(qm, input_size, path: Path, opset: int = 17) -> Path:
    """The QAT model as ONNX QDQ with INT8 weight initializers (NNCF's own Q/DQ export mode)."""
    import warnings

    import onnx
    import torch
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    from ..export import INPUT, OUTPUT, fold_pads_into_convs

    for _, m in get_hook_storage(qm).named_hooks():
        if isinstance(m, BaseQuantizer):
            m.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(qm, (torch.zeros(1, 3, *input_size),), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    model = onnx.load(str(path))
    _constants_to_initializers(model.graph)
    _fold_weight_quantizers(model.graph)
    onnx.save(model, str(path))
    fold_pads_into_convs(path)  # TF-"same" padding: a Pad between DQ and Conv would stop the fusion
    return path


def _constants_to_initializers(g) -> None:
    import onnx

    for n in [n for n in g.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]:
        t = onnx.TensorProto()
        t.CopyFrom(n.attribute[0].t)
        t.name = n.output[0]
        g.initializer.append(t)
        g.node.remove(n)


def _fold_weight_quantizers(g) -> int:
    """QuantizeLinear(float initializer) -> the quantized initializer itself (weights stored as INT8)."""
    from onnx import numpy_helper as nh

    inits = {i.name: i for i in g.initializer}
    folded = 0
    for n in [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]:
        w, s, zp = (nh.to_array(inits[k]) for k in n.input[:3])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if s.ndim:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.round(w / s.reshape(shape)) + zp.reshape(shape if zp.ndim else []).astype(np.int32)
        g.initializer.append(nh.from_array(np.clip(q, info.min, info.max).astype(zp.dtype), n.output[0]))
        g.node.remove(n)
        folded += 1
    drop_unused_initializers(g)
    return folded


def qat_key(profile) -> tuple:
    """What makes two targets' QAT the same work (shared under SHARED). The time limit is part of it: a
    budgeted target must not reuse an unbudgeted target's model (or the reverse), since the limit
    decides whether the candidate exists at all."""
    q = profile.quantization
    preset = q.preset or ("performance" if q.symmetric_activations else "mixed")
    return ("qat", q.qat_epochs, q.qat_max_steps, q.qat_checkpoints, q.qat_lr, q.qat_loss, q.qat_temperature,
            q.symmetric_activations, preset, q.per_channel, q.overflow_fix == "enable", q.activation_range,
            profile.opset, q.qat_budget_s)


def qat(art: Artifact, inp: RefineInputs, backend, profile, workdir: Path) -> Artifact:
    """`art` is the float model (QAT starts from it); returns the backend's INT8 model. Targets
    whose quantization scheme is the same share one trained model (onnxruntime and OpenVINO get
    their models from the same QDQ export)."""
    q = profile.quantization
    if q.float_op_types:
        raise EdgetlError(f"{profile.source}: qat does not support quantization.float_op_types "
                          f"{q.float_op_types}; the candidate is skipped")
    key = qat_key(profile)
    with SHARED:
        if key not in inp.shared:
            t0 = time.perf_counter()
            Student = _torch_modules()  # noqa: N806
            trunk, head = copy.deepcopy(inp.model[0]), copy.deepcopy(inp.model[1])
            student = Student(fold_batchnorm(trunk), head).eval().requires_grad_(True)
            qm = _quantize(student, inp, profile)
            info = _train(qm, inp, profile, deadline=None if q.qat_budget_s is None else t0 + q.qat_budget_s)
            qdq = export_qdq(qm, inp.views.contract["input_size"], workdir / "qat.qdq.onnx", profile.opset)
            info.update(seconds=round(time.perf_counter() - t0, 2), n_views=len(inp.views), lr=q.qat_lr)
            inp.shared[key] = (qdq, info)
    qdq, info = inp.shared[key]
    out = backend.from_qdq_onnx(qdq, art, profile, workdir, "qat")
    log.info("qat: step %d of %d chosen (val agreement %.4f)", info["chosen_step"], info["steps"],
             info["val_agreement"])
    return Artifact(out.path, out.kind, out.sha256, {**out.meta, "qat": {"refiner": "qat", **info}})


qat.from_float = True
qat.expensive = True  # minutes of training: the search runs it only where it can pay (quantize.effort)
qat.record_key = "qat"
qat.requires = ("nncf", "nncf")  # (module, pip extra), checked before a build starts

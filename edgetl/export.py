"""Stage 4: torch -> ONNX with labels and the preprocessing contract in metadata_props, checked
with onnx.checker and against torch on real inputs."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .errors import ExportError

log = logging.getLogger(__name__)
INPUT, OUTPUT = "input", "logits"


def to_onnx(model, path: Path, *, contract: dict, labels: list[str], opset: int = 17,
            extra_metadata: dict | None = None) -> Artifact:
    import onnx

    path = Path(path)
    _export(model, path, contract["input_size"], opset)
    proto = onnx.load(str(path))
    meta = {"edgetl.labels": json.dumps(labels), "edgetl.preprocess": json.dumps(contract)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()})
    set_metadata(proto, meta)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {e}") from None
    onnx.save(proto, str(path))
    return Artifact.of(path, "onnx-fp32", opset=opset)


def _export(module, path: Path, input_size, opset: int) -> None:
    """NCHW float input with a dynamic batch axis. The TorchScript exporter: exact opset control and
    sub-second exports for these convnets (the dynamo exporter takes ~7 s and picks its own opset)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, *input_size),), str(path), dynamo=False,
                          opset_version=opset, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def set_metadata(proto, meta: dict) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v


def check_against_torch(model, artifact: Artifact, inputs: np.ndarray, atol: float) -> float:
    """Run both on real inputs; raise ExportError with the numbers when max |diff| > atol."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: inputs.astype(np.float32)})[0]
    with torch.inference_mode():
        want = model.eval()(torch.from_numpy(inputs)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise ExportError(f"{artifact.path}: onnxruntime and torch logits differ by {diff:.3g} "
                          f"(max abs) on {len(inputs)} real inputs; tolerance {atol:g}")
    log.info("export check: max |torch - onnxruntime| = %.3g over %d inputs", diff, len(inputs))
    return diff


def onnxruntime_twin(module, input_size, workdir: Path, *, check: np.ndarray | None = None, atol: float = 1e-3):
    """Export a (frozen) torch module and return an onnxruntime session computing the same function.

    Used to compute frozen-backbone features: onnxruntime runs these convnets several times faster
    than eager PyTorch on CPU. `check` inputs guard the equivalence (ExportError beyond atol).
    """
    import onnxruntime as ort
    import torch

    path = Path(workdir) / "twin.onnx"
    _export(module, path, input_size, 17)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if check is not None:
        got = sess.run(None, {INPUT: check})[0]
        with torch.inference_mode():
            want = module(torch.from_numpy(check)).numpy()
        scale = max(1.0, float(np.abs(want).max()))
        diff = float(np.abs(got - want).max())
        if diff > atol * scale:
            raise ExportError(f"onnxruntime twin of the backbone differs from torch by {diff:.3g} (tolerance "
                              f"{atol * scale:.3g})")
    return sess

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
from .threads import ort_options

log = logging.getLogger(__name__)
INPUT, OUTPUT = "input", "logits"


def to_onnx(model, path: Path, *, contract: dict, labels: list[str], opset: int = 17,
            extra_metadata: dict | None = None) -> Artifact:
    """The model as FP32 ONNX with the contract and labels in its metadata, onnx.checker-checked."""
    import onnx

    path = Path(path)
    export_module(model, path, contract["input_size"], opset)
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


def export_module(module, path: Path, input_size, opset: int) -> None:
    """NCHW float input with a dynamic batch axis. The TorchScript exporter: exact opset control and
    sub-second exports for these convnets (the dynamo exporter takes ~7 s and picks its own opset)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, *input_size),), str(path), dynamo=False,
                          opset_version=opset, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    fold_pads_into_convs(path)


def fold_pads_into_convs(path: Path) -> int:
    """Merge zero-padding Pad nodes into the Conv they feed (ONNX Conv takes asymmetric pads).

    TF-"same" padding (EfficientNet-Lite) exports as Pad -> Conv with the pad amounts computed by
    shape arithmetic. In a quantized model the Pad sits between DequantizeLinear and Conv, which
    stops onnxruntime from fusing QLinearConv: those convolutions ran in float between Q/DQ pairs
    and the INT8 model was *slower* than FP32. Models with a Pad are first rewritten by
    onnxruntime's basic-level (portable) optimizer — constant folding of the shape arithmetic, plus
    its other basic fusions; the export is checked against torch afterwards — then each foldable
    Pad left is removed. Returns the Pads folded here."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper as nh

    if not any(n.op_type == "Pad" for n in onnx.load(str(path), load_external_data=False).graph.node):
        return 0
    opts = ort_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    folded = 0
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        users = consumers.get(pad.output[0], [])
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        if len(users) != 1 or users[0].op_type != "Conv" or mode != "constant" or pad.input[1] not in inits:
            continue
        value = pad.input[2] if len(pad.input) > 2 else ""
        if value and (value not in inits or nh.to_array(inits[value]).any()):
            continue
        if len(pad.input) > 3 and pad.input[3]:  # opset 18 `axes`: amounts not in [n, c, h, w] order
            continue
        amounts = nh.to_array(inits[pad.input[1]]).tolist()  # [n, c, h, w] begins, then ends
        conv = users[0]
        if len(amounts) != 8 or any(amounts[i] for i in (0, 1, 4, 5)) or min(amounts) < 0:
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((a for a in conv.attribute if a.name == "pads"), None)
        base = list(old.ints) if old is not None else [0, 0, 0, 0]
        new = [base[0] + amounts[2], base[1] + amounts[3], base[2] + amounts[6], base[3] + amounts[7]]
        if old is not None:
            conv.attribute.remove(old)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        g.node.remove(pad)
        folded += 1
    drop_unused_initializers(g)
    onnx.save(model, str(path))
    return folded


def drop_unused_initializers(graph, among=None) -> None:
    """Remove the graph's initializers that no node reads (only those named in `among`, if given)."""
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used and (among is None or i.name in among)]:
        graph.initializer.remove(init)


def set_metadata(proto, meta: dict) -> None:
    """Set (or replace) string metadata_props on an ONNX model."""
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

    sess = ort.InferenceSession(str(artifact.path), ort_options(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: inputs.astype(np.float32)})[0]
    with torch.inference_mode():
        want = model.eval()(torch.from_numpy(inputs)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise ExportError(f"{artifact.path}: onnxruntime and torch logits differ by {diff:.3g} "
                          f"(max abs) on {len(inputs)} real inputs; tolerance {atol:g}")
    log.info("export check: max |torch - onnxruntime| = %.3g over %d inputs", diff, len(inputs))
    return diff


def onnxruntime_twin(module, input_size, workdir: Path, *, check: np.ndarray | None = None, atol: float = 1e-3,
                     threads: int | None = None):
    """Export a (frozen) torch module and return an onnxruntime session computing the same function.

    Used to compute frozen-backbone features: onnxruntime runs these convnets several times faster
    than eager PyTorch on CPU. `check` inputs guard the equivalence (ExportError beyond atol).
    """
    import onnxruntime as ort
    import torch

    path = Path(workdir) / "twin.onnx"
    export_module(module, path, input_size, 17)
    # onnxruntime's kernels split work by outputs: the rows are the same with any thread count
    sess = ort.InferenceSession(str(path), ort_options(threads), providers=["CPUExecutionProvider"])
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

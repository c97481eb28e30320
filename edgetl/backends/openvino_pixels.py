"""OpenVINO models that take uint8 NHWC pixels (model_input.py), the first layer as first_layer.py says.

"fold": the INT8 IR's first convolution reads the pixels itself (Transpose and a per-channel Pad with
the mean pixel on uint8, then a FakeQuantize over [0, 255] with 256 levels, which is exact on
integers), the normalisation folded into its weights and bias. Otherwise OpenVINO's
PrePostProcessor puts the conversion to f32, /255, -mean, /std and the layout change into the model
(constants per channel: nothing rebuilt per run), after "full_range" widened the input FakeQuantize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import first_layer
from ..artifact import Artifact
from ..model_input import RAW

SIMPLE = {"Convert", "Subtract", "Multiply", "FakeQuantize", "Constant"}


def with_raw_input(art: Artifact, contract: dict, out: Path, ov, save) -> Artifact:
    """The IR with uint8 NHWC pixels in (its first layer per first_layer.FIRST_LAYER)."""
    model = ov.Core().read_model(str(art.path))
    choice = first_layer.FIRST_LAYER
    meta = {k: v for k, v in art.meta.items() if k != "companions"}
    if choice == first_layer.FOLD and _fold(model, contract):
        return save(model, out, art.kind, **{**meta, "model_input": RAW})
    if choice == first_layer.FULL_RANGE:
        _widen(model, contract)
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0).mean(
        [float(v) for v in contract["mean"]]).scale([float(v) for v in contract["std"]])
    return save(ppp.build(), out, art.kind, **{**meta, "model_input": RAW})


def _input_fq(model):
    """The FakeQuantize that reads the model's input and the convolutions that read it, or None."""
    param = model.get_parameters()[0]
    users = [t.get_node() for t in param.output(0).get_target_inputs()]
    if len(users) != 1 or users[0].get_type_name() != "FakeQuantize" or users[0].get_attributes()["levels"] != 256:
        return None, param, []
    fq = users[0]
    convs = [t.get_node() for t in fq.output(0).get_target_inputs()]
    if not all(c.get_type_name() == "Convolution" and c.input_value(0).get_node() is fq for c in convs):
        return None, param, []
    if not all(fq.input_value(i).get_node().get_type_name() == "Constant" for i in range(1, 5)):
        return None, param, []
    return fq, param, convs


def _widen(model, contract: dict) -> None:
    import openvino.opset13 as ops

    fq, _, _ = _input_fq(model)
    if fq is None:
        return
    scale, zp = first_layer.affine(*first_layer.full_range(contract["mean"], contract["std"]), signed=False)
    lo, hi = -zp * scale, (255 - zp) * scale
    for i, v in ((1, lo), (2, hi), (3, lo), (4, hi)):
        fq.input(i).replace_source_output(ops.constant(np.float32(v)).output(0))


def _value(output) -> np.ndarray:
    """A constant subgraph's value (Constant, Convert, Subtract, Multiply, FakeQuantize)."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind not in SIMPLE:
        raise ValueError(f"{kind}: not a constant weight path")
    if kind == "Constant":
        return node.get_data().astype(np.float64)
    args = [_value(v) for v in node.input_values()]
    if kind == "Convert":
        return args[0]
    if kind == "Subtract":
        return args[0] - args[1]
    if kind == "Multiply":
        return args[0] * args[1]
    x, il, ih, ol, oh = args
    levels = node.get_attributes()["levels"]
    q = np.rint((np.clip(x, il, ih) - il) / (ih - il) * (levels - 1))
    return q / (levels - 1) * (oh - ol) + ol


def _fold(model, contract: dict) -> bool:
    import openvino as ov
    import openvino.opset13 as ops

    fq, param, convs = _input_fq(model)
    if fq is None or not convs:
        return False
    attrs = [c.get_attributes() for c in convs]
    if any(a["pads_begin"] != attrs[0]["pads_begin"] or a["pads_end"] != attrs[0]["pads_end"] for a in attrs):
        return False
    try:
        weights = [_value(c.input_value(1)) for c in convs]
    except ValueError:
        return False
    (t, left), (bottom, right) = attrs[0]["pads_begin"], attrs[0]["pads_end"]
    param.set_element_type(ov.Type.u8)
    shape = param.get_partial_shape()
    param.set_partial_shape(ov.PartialShape([shape[0], shape[2], shape[3], shape[1]]))
    param.set_layout(ov.Layout("NHWC"))
    param.validate_and_infer_types()
    # pixels u8 NHWC -> NCHW -> Pad with the mean pixel -> f32 -> FakeQuantize [0, 255] (exact)
    x = ops.transpose(param, ops.constant(np.array([0, 3, 1, 2], np.int64)))
    if t or left or bottom or right:
        parts = ops.split(x, ops.constant(np.int64(1)), 3)
        x = ops.concat([ops.pad(parts.output(c), ops.constant(np.array([0, 0, t, left], np.int64)),
                                ops.constant(np.array([0, 0, bottom, right], np.int64)), "constant",
                                ops.constant(np.uint8(v))) for c, v in enumerate(first_layer.pad_pixels(
                                    contract["mean"]))], 1)
    x = ops.convert(x, ov.Type.f32)
    lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(255.0))
    x = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    for conv, a, w in zip(convs, attrs, weights, strict=True):
        add = _bias_add(conv)
        b = None if add is None else _value(add.input_value(1)).reshape(-1)
        q, scale, bias = first_layer.fold(w, b, contract["mean"], contract["std"])
        new_w = ops.multiply(ops.convert(ops.constant(q), ov.Type.f32), ops.constant(scale.reshape(-1, 1, 1, 1)))
        new = ops.convolution(x, new_w, a["strides"], [0, 0], [0, 0], a["dilations"])
        new_b = ops.add(new, ops.constant(bias.reshape(1, -1, 1, 1)))
        target = add if add is not None else conv
        for t_in in list(target.output(0).get_target_inputs()):
            t_in.replace_source_output(new_b.output(0))
        new_b.set_friendly_name(target.get_friendly_name())
    model.validate_nodes_and_infer_types()
    return True


def _bias_add(conv):
    """The Add of a constant per-channel bias right after the convolution, or None."""
    users = [t.get_node() for t in conv.output(0).get_target_inputs()]
    if len(users) != 1 or users[0].get_type_name() != "Add":
        return None
    add = users[0]
    if add.input_value(0).get_node() is not conv:
        return None
    try:
        _value(add.input_value(1))
    except ValueError:
        return None
    return add

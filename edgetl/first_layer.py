"""The first layer of an INT8 model that takes raw uint8 pixels (model_input.py): no pixel clipped.

A quantizer calibrates the QuantizeLinear in front of the first convolution on calibration images,
so its range covers what they held: a real model got scale 0.0153, zero point 111, i.e.
[-1.695, 2.199] of the normalised range [-2.118, 2.640], and black and (24, 19, 6) gave the same
logits. Once the input is known to be uint8 pixels there is a better way, chosen by the parity
evidence (docs/measurements.md, "Pixel input: first-layer quantization and latency"):

- "fold" (what ships): x/255 and the mean/std are folded into the first convolution's weights and
  bias, and the convolution reads the pixels themselves, quantized with scale 1 and zero point 0
  (uint8; int8 activations: zero point -128) — every pixel exactly, nothing clipped, no rounding.
  Zero padding of the normalised tensor is padding with the mean pixel in pixel units: an explicit
  Pad before the DequantizeLinear puts round(255 * mean) per channel there (at most 0.47 of a
  level from the exact mean, in the padding ring only); the convolution's own pads become 0.
  Weights are requantized per output channel (symmetric, 7 bits: WEIGHT_MAX) from the weights the
  quantized model used; the bias is the interior-exact b - sum(W' * 255 * mean).
- "full_range": the input quantizer's range is set to the normalised range of every uint8 pixel
  (per tensor: the lowest (0 - mean)/std to the highest (1 - mean)/std of the channels); a step
  slightly coarser than one pixel level (0.0187 vs 0.0171-0.0175 at ImageNet's std).
- "calibrated": the calibrated range as the quantizer left it (the old behaviour; clips).

The fold applies where the model's input goes through one QuantizeLinear -> DequantizeLinear into
ungrouped convolutions only; anywhere else (a float model, a first convolution left in float by
mixed precision) the normalisation stays as operations inside the model. The numbers here are
backend-neutral; onnx_fold is the ONNX rewrite, backends/openvino_pixels.py the OpenVINO one.
"""

from __future__ import annotations

import numpy as np

FOLD, FULL_RANGE, CALIBRATED = "fold", "full_range", "calibrated"
CHOICES = (FOLD, FULL_RANGE, CALIBRATED)
# 7-bit weights: x86 CPUs without VNNI multiply u8 x s8 pairs into int16 with saturation
# (255 x 127 x 2 > 32767); 255 x 63 x 2 fits. NNCF's overflow fix does the same for first layers.
WEIGHT_MAX = 63
FIRST_LAYER = FOLD  # what ships (benchmarks/pixel_range.py measures the others by setting this)


def pad_pixels(mean) -> np.ndarray:
    """The uint8 pixel whose normalised value is closest to 0, per channel (the padding value)."""
    return np.clip(np.rint(255.0 * np.asarray(mean, np.float64)), 0, 255).astype(np.uint8)


def full_range(mean, std) -> tuple[float, float]:
    """The normalised range of every uint8 pixel, one range for all channels."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return float(np.min((0.0 - mean) / std)), float(np.max((1.0 - mean) / std))


def affine(lo: float, hi: float, signed: bool) -> tuple[float, int]:
    """Scale and zero point of an 8-bit quantizer covering [lo, hi] (0 inside)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    zp = int(np.rint((-128 if signed else 0) - lo / scale))
    return scale, zp


def fold(w: np.ndarray, b: np.ndarray | None, mean, std) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights w [O, C, kh, kw] (as the quantized model used them) and bias of a convolution that read
    (x/255 - mean)/std, refolded to read pixels x: (int8 weights, per-output-channel scale, bias).
    Interior outputs equal the normalised convolution's up to the weights' new rounding."""
    w = np.asarray(w, np.float64)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    w2 = w / (255.0 * std)[None, :, None, None]
    peak = np.abs(w2).reshape(len(w2), -1).max(1)
    scale = np.where(peak > 0, peak / WEIGHT_MAX, 1.0)
    q = np.clip(np.rint(w2 / scale[:, None, None, None]), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    used = q.astype(np.float64) * scale[:, None, None, None]
    b0 = np.zeros(len(w2)) if b is None else np.asarray(b, np.float64)
    bias = b0 - (used * (255.0 * mean)[None, :, None, None]).sum((1, 2, 3))
    return q, scale.astype(np.float32), bias.astype(np.float32)


def onnx_fold(model, input_name: str, contract: dict, choice: str = FIRST_LAYER) -> str | None:
    """Rewrite an INT8 QDQ ONNX model in place so that `input_name` is uint8 NCHW pixels read by the
    first convolution (choice "fold"), or widen its input quantizer ("full_range", also where the
    weights cannot be folded). What was done; None (the model untouched) when the input is not
    quantized in front of ungrouped convolutions, or for "calibrated"."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    first = consumers.get(input_name, [])
    if choice == CALIBRATED or len(first) != 1 or first[0].op_type != "QuantizeLinear":
        return None
    q = first[0]
    dqs = consumers.get(q.output[0], [])
    if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or q.input[1] not in inits:
        return None
    dq = dqs[0]
    convs = consumers.get(dq.output[0], [])
    if not convs or any(c.op_type != "Conv" or c.input[0] != dq.output[0] or _attr(c, "group", 1) != 1
                        or _attr(c, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for c in convs):
        return None
    producer = {o: n for n in g.node for o in n.output}
    zp_init = inits[q.input[2]] if len(q.input) > 2 and q.input[2] in inits else None
    signed = zp_init is not None and numpy_helper.to_array(zp_init).dtype == np.int8
    old_scale = float(numpy_helper.to_array(inits[q.input[1]]))
    mean, std = contract["mean"], contract["std"]
    zdt = np.int8 if signed else np.uint8

    def put(name, arr):
        g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    if choice == FOLD:
        try:
            weights = [(_value(c.input[1], producer, inits),
                       _value(c.input[2], producer, inits) if len(c.input) > 2 and c.input[2] else None)
                      for c in convs]
        except ValueError:  # weights not constant here: no pixel is clipped all the same
            choice, weights = FULL_RANGE, None
    if choice == FULL_RANGE:
        scale, zp = affine(*full_range(mean, std), signed)
        for node in (q, dq):
            node.input[1] = put(f"{node.name or node.output[0]}/full_scale", np.float32(scale))
            node.input[2] = put(f"{node.name or node.output[0]}/full_zp", zdt(zp))
        for conv in convs:
            _rescale_int32_bias(g, conv, producer, inits, old_scale, scale, put)
        _tidy(g, set())
        return FULL_RANGE

    # choice == FOLD: pixels (uint8 NCHW) -> [int8: shift by 128] -> Pad (mean pixel) -> DQ(1, zp)
    pads = [_attr(c, "pads", [0, 0, 0, 0]) for c in convs]
    if any(p != pads[0] for p in pads):
        return None  # before anything is added: the model stays untouched
    nodes, x, shift = [], input_name, -128 if signed else 0
    if signed:
        nodes += [helper.make_node("Cast", [x], ["pixels/float"], to=1, name="pixels/Cast"),
                  helper.make_node("QuantizeLinear", ["pixels/float", put("pixels/one", np.float32(1.0)),
                                                      put("pixels/shift", np.int8(-128))], ["pixels/int8"],
                                   name="pixels/ToInt8")]
        x = "pixels/int8"
    t, left, bottom, right = pads[0]
    if any(pads[0]):
        values = pad_pixels(mean).astype(np.int16) + shift
        amounts = put("pixels/pads", np.asarray([0, 0, t, left, 0, 0, bottom, right], np.int64))
        parts = [f"pixels/channel{c}" for c in range(3)]
        nodes.append(helper.make_node("Split", [x, put("pixels/split", np.ones(3, np.int64))], parts, axis=1,
                                      name="pixels/Split"))
        for c, part in enumerate(parts):
            nodes.append(helper.make_node("Pad", [part, amounts, put(f"pixels/pad{c}", zdt(values[c]))],
                                          [f"{part}/padded"], mode="constant", name=f"pixels/Pad{c}"))
        nodes.append(helper.make_node("Concat", [f"{p}/padded" for p in parts], ["pixels/padded"], axis=1,
                                      name="pixels/Concat"))
        x = "pixels/padded"
    new_dq = helper.make_node("DequantizeLinear", [x, put("pixels/scale", np.float32(1.0)),
                                                   put("pixels/zero_point", zdt(shift))], [dq.output[0]],
                              name="pixels/Dequantize")
    for conv, (w, b) in zip(convs, weights, strict=True):
        _fold_conv(g, conv, producer, inits, w, b, mean, std, put)
        for a in conv.attribute:
            if a.name == "pads":
                a.ints[:] = [0, 0, 0, 0]
    at = list(g.node).index(q)
    g.node.remove(q)
    g.node.remove(dq)
    for i, node in enumerate([*nodes, new_dq]):
        g.node.insert(at + i, node)
    _tidy(g, {dq.output[0]})
    return FOLD


def _tidy(g, reshaped: set) -> None:
    """Initializers no node reads any more go; so does the shape information of reshaped tensors."""
    from .export import drop_unused_initializers

    drop_unused_initializers(g)
    for vi in [v for v in g.value_info if v.name in reshaped]:
        g.value_info.remove(vi)


def _attr(node, name, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _value(name, producer, inits):
    """A constant tensor's value: an initializer or Constant, or a DequantizeLinear of those."""
    from onnx import helper, numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float64)
    node = producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
        return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0])).astype(np.float64)
    if node is None or node.op_type != "DequantizeLinear" or not node.input[0] or \
            (producer.get(node.input[0]) is not None and producer[node.input[0]].op_type != "Constant"):
        raise ValueError(f"{name}: not a constant")
    x, s = _value(node.input[0], producer, inits), _value(node.input[1], producer, inits)
    z = _value(node.input[2], producer, inits) if len(node.input) > 2 and node.input[2] else 0.0
    if np.ndim(s):
        shape = [1] * x.ndim
        shape[_attr(node, "axis", 1) % x.ndim] = -1
        s, z = s.reshape(shape), np.reshape(z, shape) if np.ndim(z) else z
    return (x - z) * s


def _fold_conv(g, conv, producer, inits, w, b, mean, std, put) -> None:
    from onnx import helper

    q, scale, bias = fold(w, b, mean, std)
    stem = conv.name or conv.output[0]
    w_out = f"{stem}/pixel_weight"
    g.node.insert(list(g.node).index(conv), helper.make_node(
        "DequantizeLinear", [put(f"{w_out}_quantized", q), put(f"{w_out}_scale", scale),
                             put(f"{w_out}_zero_point", np.zeros(len(q), np.int8))], [w_out], axis=0,
        name=f"{stem}/PixelWeight"))
    conv.input[1] = w_out
    old_bias = producer.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if old_bias is not None and old_bias.op_type == "DequantizeLinear":  # int32 bias at input x weight scale
        b_out = f"{stem}/pixel_bias"
        g.node.insert(list(g.node).index(conv), helper.make_node(
            "DequantizeLinear", [put(f"{b_out}_quantized", np.rint(bias / scale).astype(np.int32)),
                                 put(f"{b_out}_scale", scale), put(f"{b_out}_zero_point", np.zeros(len(q), np.int32))],
            [b_out], axis=0, name=f"{stem}/PixelBias"))
        conv.input[2] = b_out
    elif len(conv.input) > 2 and conv.input[2]:
        conv.input[2] = put(f"{stem}/pixel_bias", bias)
    else:
        conv.input.append(put(f"{stem}/pixel_bias", bias))


def _rescale_int32_bias(g, conv, producer, inits, old_scale: float, new_scale: float, put) -> None:
    """An int32 bias quantized at input scale x weight scale, requantized for the new input scale."""
    from onnx import helper

    node = producer.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if node is None or node.op_type != "DequantizeLinear":
        return
    from onnx import numpy_helper

    bias = _value(conv.input[2], producer, inits)
    b_scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64) * (new_scale / old_scale)
    stem = conv.name or conv.output[0]
    new = helper.make_node("DequantizeLinear", [put(f"{stem}/full_bias_q", np.rint(bias / b_scale).astype(np.int32)),
                                                put(f"{stem}/full_bias_scale", b_scale.astype(np.float32)),
                                                put(f"{stem}/full_bias_zp", np.zeros(np.shape(b_scale), np.int32))],
                           [node.output[0]], axis=_attr(node, "axis", 1), name=f"{stem}/FullBias")
    g.node.insert(list(g.node).index(node), new)
    g.node.remove(node)

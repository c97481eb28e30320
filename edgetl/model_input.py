"""What a target's models take as input: raw camera pixels or normalised float tensors.

A profile's `model_input`:
- "uint8-nhwc": the model takes uint8 RGB NHWC at its input size, exactly what a camera or an image
  decoder gives after resizing and cropping; the conversion to float, the x/255, the mean/std
  normalisation and the NHWC -> NCHW transpose are operations inside the model (ONNX: the nodes
  below; OpenVINO: its PrePostProcessor, in backends/openvino.py). An application feeds pixels and
  cannot get the normalisation wrong (channel order aside: RGB, as `preprocess.json` says).
- "float32-nchw": the model takes what `preprocess.to_tensor` makes (the float contract).

Resizing and cropping stay outside the model in both cases, described by `preprocess.json`.
The search and the refiners work on the float model; the input ops are added to the model they
chose (they compute what `to_tensor` computes, in the same order, so nothing after them changes),
and the gate then judges the model that ships, fed raw pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .errors import UsageError
from .export import INPUT, set_metadata

RAW = "uint8-nhwc"
FLOAT = "float32-nchw"
NORMALISED = "input_normalised"  # the float NCHW tensor the rest of the graph reads
PIXELS = "input_nchw"  # the pixels, uint8 NCHW


def contract_for(model_input: str, contract: dict) -> dict:
    """The preprocessing contract of a model taking `model_input` (the float contract unchanged, or
    the raw one: same resize and crop, then uint8 NHWC pixels; mean/std applied in the model)."""
    if model_input == FLOAT:
        return contract
    if contract.get("channel_order", "RGB") != "RGB":
        raise UsageError(f"model_input {RAW}: the backbone takes {contract['channel_order']}, and the input ops "
                         f"normalise RGB pixels; fix: set model_input = \"{FLOAT}\" in the profile")
    return {**contract, "dtype": "uint8", "layout": "NHWC", "normalised_in_model": True,
            "scale": f"inside the model: {contract['scale']}"}


def is_raw(contract: dict) -> bool:
    """Does a model with this contract take raw uint8 pixels?"""
    return contract.get("dtype") == "uint8"


def view(x, contract: dict):
    """Evaluation images (a loader.Split of uint8 crops) as a model with `contract` takes them."""
    if not is_raw(contract):
        return x
    if not hasattr(x, "with_contract"):
        raise TypeError("a raw-pixel model needs the crops (a loader.Split), not preprocessed tensors")
    return x.with_contract(contract)


def onnx_with_raw_input(art: Artifact, contract: dict, out: Path) -> Artifact:
    """A copy of the ONNX model whose input is uint8 NHWC pixels: either the INT8 model's first
    convolution reads them itself (transposed to NCHW, still uint8), the normalisation folded into its
    weights (first_layer.py: no pixel clipped), or Cast -> /255 -> -mean -> /std -> Transpose feed the
    float input the model had: the same float operations in the same order as preprocess.to_tensor,
    so a float model's logits are the float-input model's. Constants only (the spatial shape is
    static): nothing is rebuilt per run, the batch stays symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from . import first_layer

    model = onnx.load(str(art.path))
    g = model.graph
    old = next(i for i in g.input if i.name == INPUT)
    dims = old.type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ValueError(f"{art.path}: expected a float NCHW input with 3 channels, found {old.type}")
    batch = dims[0].dim_param or dims[0].dim_value
    h, w = dims[2].dim_value, dims[3].dim_value
    for node in g.node:
        node.input[:] = [NORMALISED if name == INPUT else name for name in node.input]
    done = first_layer.onnx_fold(model, NORMALISED, contract, first_layer.FIRST_LAYER)
    if done == first_layer.FOLD:
        ops = [helper.make_node("Transpose", [INPUT], [PIXELS], perm=[0, 3, 1, 2], name="input/ToNCHW")]
        for node in g.node:
            node.input[:] = [PIXELS if name == NORMALISED else name for name in node.input]
    else:
        # per-channel constants repeated along one row of pixels ([1, 1, W, 3]): onnxruntime broadcasts
        # a [3] constant over NHWC three numbers at a time (measured +1.6 ms at 224 px), a row at speed
        row = [1, 1, w, 1]
        consts = {"pixel_scale": np.float32(255.0),
                  "pixel_mean": np.tile(np.asarray(contract["mean"], np.float32).reshape(1, 1, 1, 3), row),
                  "pixel_std": np.tile(np.asarray(contract["std"], np.float32).reshape(1, 1, 1, 3), row)}
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        ops = [helper.make_node("Cast", [INPUT], ["pixels_float"], to=TensorProto.FLOAT, name="input/Cast"),
               helper.make_node("Div", ["pixels_float", "pixel_scale"], ["pixels_unit"], name="input/Div255"),
               helper.make_node("Sub", ["pixels_unit", "pixel_mean"], ["pixels_centred"], name="input/SubMean"),
               helper.make_node("Div", ["pixels_centred", "pixel_std"], ["pixels_nhwc"], name="input/DivStd"),
               helper.make_node("Transpose", ["pixels_nhwc"], [NORMALISED], perm=[0, 3, 1, 2], name="input/ToNCHW")]
    for i, node in enumerate(ops):
        g.node.insert(i, node)
    g.input.remove(old)
    g.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [batch, h, w, 3]))
    set_metadata(model, {"edgetl.preprocess": json.dumps(contract_for(RAW, contract))})
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return Artifact.of(out, art.kind, **{**art.meta, "model_input": RAW})

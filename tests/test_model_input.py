"""Raw-pixel models (model_input.py): the input ops compute what preprocess.to_tensor computes, so the
model fed uint8 NHWC pixels gives the float-input model's logits bit for bit — in onnxruntime (an FP32
and an INT8 QDQ model) and in OpenVINO (its PrePostProcessor) — and the contract feeds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgetl import export, model_input
from edgetl.backends.onnxruntime import OnnxRuntimeBackend
from edgetl.backends.openvino import OpenVinoBackend
from edgetl.profiles import load_profile
from edgetl.runtime.engine_openvino import Engine as OvEngine
from edgetl.runtime.engine_ort import Engine as OrtEngine
from edgetl.runtime.predict import Predictor
from edgetl.runtime.preprocess import sample_crops, to_tensor

CONTRACT = {"input_size": [24, 20], "resize_size": 28, "crop": "center", "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": "x/255 then (x-mean)/std",
            "channel_order": "RGB", "layout": "NCHW"}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return export.to_onnx(net, tmp_path_factory.mktemp("m") / "m.onnx", contract=CONTRACT, labels=list("abcd"))


def _logits(engine, contract, crops):
    return Predictor(engine, contract, list("abcd")).logits(to_tensor(crops, contract))


def test_contract_and_tensor_of_a_raw_model():
    raw = model_input.contract_for(model_input.RAW, CONTRACT)
    assert raw["dtype"] == "uint8" and raw["layout"] == "NHWC" and raw["resize_size"] == 28
    assert model_input.contract_for(model_input.FLOAT, CONTRACT) is CONTRACT
    crops = sample_crops(3, CONTRACT)
    frozen = crops.copy()
    frozen.flags.writeable = False  # loader.Split reads give read-only arrays; OpenVINO shares the memory
    x = to_tensor(frozen, raw)
    assert x.dtype == np.uint8 and x.shape == (3, 24, 20, 3) and x.flags.writeable and np.array_equal(x, crops)


def test_onnxruntime_pixels_in_gives_the_float_models_logits(fp32, tmp_path, monkeypatch):
    """Bit for bit where the normalisation stays ops (FP32; INT8 with its calibrated input range); the
    INT8 model whose first convolution reads the pixels (first_layer.py) within a few INT8 steps."""
    import onnx

    from edgetl import first_layer

    backend, raw = OnnxRuntimeBackend(), model_input.contract_for(model_input.RAW, CONTRACT)
    crops = sample_crops(16, CONTRACT, seed=1)
    calib = to_tensor(sample_crops(32, CONTRACT, seed=2), CONTRACT)
    from edgetl.backends import QuantInputs

    int8 = backend.quantizers["ort_static"](fp32, QuantInputs(calib, calib[:4], np.zeros(4), np.zeros((4, 4)), 1.0,
                                                              0.97, 0), load_profile("cpu"), tmp_path)
    for art, stem, choice in ((fp32, "fp32", first_layer.FOLD), (int8, "int8", first_layer.CALIBRATED),
                              (int8, "int8-fold", first_layer.FOLD)):
        monkeypatch.setattr(first_layer, "FIRST_LAYER", choice)
        pix = backend.with_raw_input(art, CONTRACT, tmp_path, stem)
        graph = onnx.load(str(pix.path)).graph
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [24, 20, 3]
        assert not {n.op_type for n in graph.node} & {"Shape", "Expand"}
        a = _logits(OrtEngine(art.path, {}), CONTRACT, crops)
        b = _logits(OrtEngine(pix.path, {}), raw, crops)
        if stem == "int8-fold":
            assert np.abs(a - b).max() < 0.02 and (a.argmax(1) == b.argmax(1)).mean() >= 0.9
        else:
            assert np.array_equal(a, b), float(np.abs(a - b).max())


def test_openvino_pixels_in_gives_the_float_models_logits(fp32, tmp_path):
    backend, raw = OpenVinoBackend(), model_input.contract_for(model_input.RAW, CONTRACT)
    ir = backend.convert(fp32, "fp32", load_profile("openvino"), tmp_path)
    pix = backend.with_raw_input(ir, CONTRACT, tmp_path, "model")
    crops = sample_crops(16, CONTRACT, seed=3)
    a = _logits(OvEngine(ir.path, {}), CONTRACT, crops)
    b = _logits(OvEngine(pix.path, {}), raw, crops)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))  # OpenVINO may fold /std into *1/std
    assert (a.argmax(1) == b.argmax(1)).all()

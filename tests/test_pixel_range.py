"""Pixel-input INT8 models keep every pixel (first_layer.py): on real built bundles (cpu: onnxruntime,
openvino) dark and bright pixels a calibrated input quantizer would clip still move the logits, a dark
frame keeps its red channel, and nothing is rebuilt per run (no Shape/Expand). A deliberately narrow
calibration shows what the old, calibrated range did (the same pairs gave equal logits)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgetl import export, first_layer, model_input
from edgetl.backends import QuantInputs
from edgetl.backends.onnxruntime import OnnxRuntimeBackend
from edgetl.backends.openvino import OpenVinoBackend
from edgetl.bundle import load_predictor
from edgetl.profiles import load_profile
from edgetl.runtime.engine_openvino import Engine as OvEngine
from edgetl.runtime.engine_ort import Engine as OrtEngine
from edgetl.runtime.predict import Predictor
from edgetl.runtime.preprocess import sample_crops, to_tensor

PAIRS = [((0, 0, 0), (24, 19, 6)), ((255, 255, 255), (253, 243, 231))]
CONTRACT = {"input_size": [24, 20], "resize_size": 28, "crop": "center", "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": "x/255 then (x-mean)/std",
            "channel_order": "RGB", "layout": "NCHW"}


def _images(size, colours) -> np.ndarray:
    h, w = size
    return np.stack([np.broadcast_to(np.asarray(c, np.uint8), (h, w, 3)) for c in colours]).copy()


def _dark_frames(size, seed=0) -> np.ndarray:
    """A dark camera frame (every channel < 30) and the same frame with only its red channel changed."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 30, (*size, 3), dtype=np.uint8)
    redder = frame.copy()
    redder[..., 0] = rng.integers(0, 30, size, dtype=np.uint8)
    return np.stack([frame, redder])


def _all_differ(logits: np.ndarray) -> list[bool]:
    return [not np.array_equal(logits[i], logits[i + 1]) for i in range(0, len(logits), 2)]


@pytest.mark.parametrize("name", ["cpu", "openvino"])
def test_built_pixel_models_keep_dark_and_bright_pixels(built, name):
    bundle = built["bundles"][name]
    predictor = load_predictor(bundle)
    size = predictor.contract["input_size"]
    assert predictor.contract["dtype"] == "uint8"
    logits = predictor.logits(_images(size, [c for pair in PAIRS for c in pair]))
    assert _all_differ(logits) == [True, True], logits
    dark = predictor.logits(_dark_frames(size))
    assert not np.array_equal(dark[0], dark[1])


def test_built_cpu_pixel_graph_rebuilds_nothing_per_run(built):
    for name in ("cpu", "cpu-arm64"):
        graph = onnx.load(str(built["bundles"][name] / "model.onnx")).graph
        ops = {n.op_type for n in graph.node}
        assert not ops & {"Shape", "Expand"}, name
        first = graph.node[0]
        assert first.op_type == "Transpose" and first.input[0] == export.INPUT
        # the first convolution reads the pixels: no QuantizeLinear of the normalised tensor
        assert not any(n.op_type == "QuantizeLinear" and model_input.NORMALISED in n.input for n in graph.node)


def test_built_openvino_pixel_model_rebuilds_nothing_per_run(built):
    import openvino as ov

    model = ov.Core().read_model(str(built["bundles"]["openvino"] / "model.xml"))
    kinds = {op.get_type_name() for op in model.get_ordered_ops()}
    assert not kinds & {"ShapeOf", "Broadcast"}
    assert model.inputs[0].get_element_type() == ov.Type.u8


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A small convnet quantized on mid-grey calibration images only: the calibrated input range clips."""
    tmp = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4)).eval()
    fp32 = export.to_onnx(net, tmp / "m.onnx", contract=CONTRACT, labels=list("abcd"))
    rng = np.random.default_rng(0)
    grey = rng.integers(90, 160, (32, 24, 20, 3), dtype=np.uint8)
    calib = to_tensor(grey, CONTRACT)
    return fp32, QuantInputs(calib, calib[:4], np.zeros(4), np.zeros((4, 4)), 1.0, 0.97, 0), tmp


def _engine(backend, art):
    return OrtEngine(art.path, {}) if isinstance(backend, OnnxRuntimeBackend) else OvEngine(art.path, {})


@pytest.mark.parametrize("profile,quantizer", [("cpu", "nncf_ptq"), ("cpu", "ort_static"), ("cpu-arm64", "nncf_ptq"),
                                               ("cpu-arm64", "ort_static"), ("openvino", "nncf_ptq")])
def test_each_quantizer_first_layer_options(narrow, monkeypatch, profile, quantizer):
    fp32, data, tmp = narrow
    prof = load_profile(profile)
    backend = OpenVinoBackend() if prof.backend == "openvino" else OnnxRuntimeBackend()
    work = tmp / f"{profile}-{quantizer}"
    work.mkdir()
    int8 = backend.quantizers[quantizer](fp32, data, prof, work)
    raw = model_input.contract_for(model_input.RAW, CONTRACT)
    probe = np.concatenate([_images(CONTRACT["input_size"], [c for pair in PAIRS for c in pair]),
                            _dark_frames(CONTRACT["input_size"])])
    crops = sample_crops(64, CONTRACT, seed=4)
    reference = Predictor(OrtEngine(fp32.path, {}), CONTRACT, list("abcd")).logits(to_tensor(crops, CONTRACT))
    differ, mse = {}, {}
    for choice in first_layer.CHOICES:
        monkeypatch.setattr(first_layer, "FIRST_LAYER", choice)
        pix = backend.with_raw_input(int8, CONTRACT, work, choice)
        predictor = Predictor(_engine(backend, pix), raw, list("abcd"))
        differ[choice] = _all_differ(predictor.logits(probe))
        mse[choice] = float(((predictor.logits(to_tensor(crops, raw)) - reference) ** 2).mean())
    assert differ["calibrated"][:2] == [False, False]  # what the calibrated range did: clipped
    assert differ["fold"][:2] == [True, True] and differ["full_range"][:2] == [True, True]
    # the fold stays as close to the float model as the calibrated model on in-range images
    assert mse["fold"] <= 2 * mse["calibrated"] + 1e-4, mse


def test_float_pixel_model_equals_the_float_model(narrow, tmp_path):
    fp32, _, _ = narrow
    raw = model_input.contract_for(model_input.RAW, CONTRACT)
    crops = sample_crops(8, CONTRACT, seed=6)
    atol = load_profile("cpu").tolerances.export_atol
    a = Predictor(OrtEngine(fp32.path, {}), CONTRACT, list("abcd")).logits(to_tensor(crops, CONTRACT))
    for backend in (OnnxRuntimeBackend(), OpenVinoBackend()):
        art = fp32 if isinstance(backend, OnnxRuntimeBackend) else backend.convert(fp32, "fp32",
                                                                                   load_profile("openvino"), tmp_path)
        pix = backend.with_raw_input(art, CONTRACT, tmp_path, "fp32")
        b = Predictor(_engine(backend, pix), raw, list("abcd")).logits(to_tensor(crops, raw))
        assert np.abs(a - b).max() <= atol
    graph = onnx.load(str(tmp_path / "fp32.pixels.onnx")).graph
    assert not {n.op_type for n in graph.node} & {"Shape", "Expand"}
    assert all(list(i.dims) in ([], [1, 1, 20, 3]) for i in graph.initializer if i.name.startswith("pixel_"))

"""Quantizers on a real exported MobileNetV2 (64 px): NNCF accuracy control and the float-node report."""

import numpy as np
import pytest

from edgetl import backbones, data, export, parity, train
from edgetl.backends import QuantInputs
from edgetl.backends.onnxruntime import float_nodes, mixed_precision
from edgetl.profiles import load_profile
from edgetl.recipe import TrainSection
from edgetl.runtime.engine_ort import Engine
from edgetl.runtime.predict import Predictor
from tests.conftest import preprocessed

pytestmark = pytest.mark.integration


def _setup(tiny_data, tmp_path):
    ds = data.scan(tiny_data)
    spec = backbones.get("mobilenet_v2")
    contract = spec.contract(64)
    trunk = backbones.trunk_of(backbones.load_pretrained(spec, backbones.resolve_weights(spec), 64))
    labels = {s: np.array([it.label for it in ds.split(s)]) for s in data.SPLITS}
    net = train.fit_feature_extract(train.Job(trunk, 3, ds.split("train"), ds.split("val"), contract,
                                              TrainSection(epochs=10, augment_views=0), seed=0)).model
    fp32 = export.to_onnx(net, tmp_path / "m.onnx", contract=contract, labels=ds.classes)
    val_x = preprocessed(ds.split("val"), contract)
    ref = train.forward_batches(net, val_x, 8, train.NullProgress(), "").numpy()
    qi = QuantInputs(preprocessed(ds.split("train"), contract), val_x, labels["val"], ref, 0.0, 1.0, 0)
    return ds, contract, fp32, qi, val_x, ref, labels


def test_mixed_precision_meets_the_tolerance_on_val(tiny_data, tmp_path):
    ds, contract, fp32, qi, val_x, ref, labels = _setup(tiny_data, tmp_path)
    art = mixed_precision(fp32, qi, load_profile("cpu"), tmp_path)
    assert art.meta["quantizer"] == "mixed_precision" and art.size < 0.5 * fp32.size
    rep = parity.evaluate(ref, parity.logits_of(Predictor(Engine(art.path, {}), contract, ds.classes), val_x),
                          labels["val"], ds.classes, split="val")
    assert rep.top1_agreement == 1.0 and rep.accuracy_drop_pp == 0.0
    kept, every = set(float_nodes(art.path)), set(float_nodes(fp32.path))  # fp32: every conv is float
    assert kept < every  # a strict subset: the restored layers are the model's own, and not all of them


def test_openvino_accuracy_control_on_val(tiny_data, tmp_path):
    """OpenVINO fallback: NNCF accuracy control on the OpenVINO model; float layers are reported."""
    from edgetl.backends import openvino as ovb
    from edgetl.runtime.engine_openvino import Engine as OvEngine

    ds, contract, fp32, qi, val_x, ref, labels = _setup(tiny_data, tmp_path)
    art = ovb.mixed_precision(fp32, qi, load_profile("openvino"), tmp_path)
    assert art.path.suffix == ".xml" and art.files[1].suffix == ".bin" and art.size < 0.5 * fp32.size
    runner = Predictor(OvEngine(art.path, {}), contract, ds.classes)
    rep = parity.evaluate(ref, parity.logits_of(runner, val_x), labels["val"], ds.classes, split="val")
    assert rep.top1_agreement == 1.0
    fp32_ir = ovb.OpenVinoBackend().convert(fp32, "fp32", load_profile("openvino"), tmp_path)
    every = len(ovb.float_nodes(fp32_ir.path))
    assert every >= 50  # every Convolution/MatMul of the FP32 IR is float
    assert len(ovb.float_nodes(art.path)) < every


def test_efficientnet_lite_same_padding_folds_so_every_int8_conv_fuses(tmp_path):
    """TF-'same' padding exports as Pad -> Conv; folded into Conv pads at export (checked against
    torch), so the INT8 model has no Pad between DequantizeLinear and Conv and onnxruntime fuses
    every convolution (before the fold, 17 ran in float and INT8 was slower than FP32)."""
    import collections

    import onnx
    import onnxruntime as ort
    from torch import nn

    from edgetl.backends.onnxruntime import nncf_ptq

    spec = backbones.get("efficientnet_lite0")
    contract = spec.contract(96)
    trunk = backbones.trunk_of(backbones.load_pretrained(spec, backbones.resolve_weights(spec), 96))
    net = nn.Sequential(trunk, nn.Linear(1280, 3)).eval()
    fp32 = export.to_onnx(net, tmp_path / "lite.onnx", contract=contract, labels=["a", "b", "c"])
    x = np.random.default_rng(0).normal(size=(4, 3, 96, 96)).astype(np.float32)
    assert export.check_against_torch(net, fp32, x, 1e-3) < 1e-3  # batch 4: the batch axis stays dynamic
    ops = collections.Counter(n.op_type for n in onnx.load(str(fp32.path)).graph.node)
    assert ops["Pad"] == 0 and ops["Conv"] == 49
    qi = QuantInputs(x, x, np.zeros(4, int), np.zeros((4, 3), np.float32), 1.0, 0.97, 0)
    art = nncf_ptq(fp32, qi, load_profile("cpu"), tmp_path)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    fused = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    assert fused["QLinearConv"] == 49 and fused["Conv"] == 0 and fused["Pad"] == 0


def test_mixed_precision_stops_at_its_time_budget(tiny_data, tmp_path):
    """Accuracy control is the last resort and bounded: past `mixed_precision_budget_s` it stops with
    a typed error (the search records it and the candidate is dropped), instead of running minutes."""
    from edgetl.errors import BudgetExceeded

    ds, contract, fp32, qi, val_x, ref, labels = _setup(tiny_data, tmp_path)
    profile = load_profile("cpu").model_copy(deep=True)
    profile.quantization.mixed_precision_budget_s = 1e-6
    with pytest.raises(BudgetExceeded, match="mixed_precision_budget_s"):
        mixed_precision(fp32, qi, profile, tmp_path)


def _unsaturated(path, dst):
    """The same INT8 model with its zero-point-0 INT8 weights re-encoded as UINT8 (zero point 128):
    exactly the same numbers, but onnxruntime then runs its U8U8 kernels, which cannot saturate."""
    import onnx
    from onnx import numpy_helper as nh

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and len(node.input) == 3 else None
        zp = inits.get(node.input[2]) if w is not None else None
        if w is None or zp is None or w.data_type != onnx.TensorProto.INT8 or nh.to_array(zp).any():
            continue
        w.CopyFrom(nh.from_array((nh.to_array(w).astype(np.int16) + 128).astype(np.uint8), w.name))
        zp.CopyFrom(nh.from_array(np.full(nh.to_array(zp).shape, 128, np.uint8), zp.name))
    onnx.save(model, str(dst))
    return dst


def _saturating_cpu() -> bool:
    """An x86 CPU whose onnxruntime U8S8 kernels use vpmaddubsw: AVX2 without VNNI (an SSE-only
    x86 CPU, a VNNI/AMX one and an ARM core sum exactly)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False  # unknown: do not claim the contrast
    return " avx2" in flags and "vnni" not in flags


def _weight_peaks(path) -> list[int]:
    """max |q| of every INT8 weight initializer behind a DequantizeLinear that feeds a dense convolution or
    a Gemm/MatMul (depthwise convolutions run a kernel of their own, which sums exactly: NNCF keeps 8 bits)."""
    import onnx
    from onnx import helper
    from onnx import numpy_helper as nh

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}

    def dense(n) -> bool:
        c = consumers.get(n.output[0])
        groups = next((helper.get_attribute_value(a) for a in c.attribute if a.name == "group"), 1) if c else 1
        return c is not None and c.op_type in ("Conv", "Gemm", "MatMul") and groups == 1

    return [int(np.abs(nh.to_array(inits[n.input[0]]).astype(np.int16)).max()) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and dense(n)]


def test_cpu_int8_computes_the_same_numbers_on_every_cpu(tiny_data, tmp_path):
    """x86 CPUs without VNNI multiply u8 x s8 pairs into int16 with saturation; the cpu profile's
    7-bit weights (overflow_fix = "enable") cannot overflow, so onnxruntime's fused U8S8 kernels give
    exactly what its U8U8 kernels (no saturation anywhere, as on VNNI or ARM) give. With 8-bit weights
    they differ on such a CPU: the check can fail."""
    from edgetl.backends.onnxruntime import OnnxRuntimeBackend

    ds, contract, fp32, qi, val_x, ref, labels = _setup(tiny_data, tmp_path)
    cpu = load_profile("cpu")
    assert cpu.quantization.overflow_fix == "enable"
    eight = cpu.model_copy(update={"quantization": cpu.quantization.model_copy(update={"overflow_fix": "first_layer"})})
    x = np.concatenate([val_x, qi.calibration[:24]])
    for profile, name in ((cpu, "seven"), (eight, "eight")):
        work = tmp_path / name
        work.mkdir()
        art = OnnxRuntimeBackend().quantizers["nncf_ptq"](fp32, qi, profile, work)
        fused = Engine(art.path, {}).run(x)
        exact = Engine(_unsaturated(art.path, work / "u8u8.onnx"), {}).run(x)
        peaks = _weight_peaks(art.path)
        if name == "seven":  # on any CPU: every weight on the 7-bit grid, and the same numbers unsaturated
            assert peaks and max(peaks) <= 64
            assert np.array_equal(fused, exact)
        else:
            assert max(peaks) > 64  # 8 bits: the grid the 7-bit check above would reject
            if _saturating_cpu():
                assert not np.array_equal(fused, exact)  # this AVX2 CPU saturates 8-bit weights


def _activation_scales(path) -> dict[str, float]:
    """The scale of every QuantizeLinear on an activation (not a weight), by the tensor it quantizes."""
    import onnx
    from onnx import numpy_helper as nh

    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    return {n.input[0]: float(nh.to_array(inits[n.input[1]]).reshape(-1)[0]) for n in g.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits}


def test_the_activation_range_setting_reaches_nncf(tiny_data, tmp_path):
    """quantization.activation_range picks NNCF's range estimator: "minmax" (the extremes over every
    calibration image) widens activation ranges against NNCF's default (per-image extremes,
    averaged), "mean_quantile" narrows them. Compared through the scales NNCF writes (its range
    tuning for asymmetric grids can move a single scale the other way: the typical quantizer is
    compared, and enough of them must move)."""
    from edgetl.backends.onnxruntime import OnnxRuntimeBackend

    _, _, fp32, qi, *_ = _setup(tiny_data, tmp_path)
    cpu = load_profile("cpu")
    scales = {}
    for name in ("mean_minmax", "minmax", "mean_quantile"):
        profile = cpu.model_copy(update={"quantization": cpu.quantization.model_copy(
            update={"activation_range": name, "bias_correction": "fast"})})  # fast: ranges are what counts
        (tmp_path / name).mkdir()
        scales[name] = _activation_scales(OnnxRuntimeBackend().quantizers["nncf_ptq"](fp32, qi, profile,
                                                                                     tmp_path / name).path)
    base = scales["mean_minmax"]
    assert base and scales["minmax"].keys() == base.keys() == scales["mean_quantile"].keys()
    wider = np.array([scales["minmax"][k] / base[k] for k in base])
    narrower = np.array([scales["mean_quantile"][k] / base[k] for k in base])
    assert np.median(wider) > 1.01 and (wider > 1.01).sum() > len(base) // 4
    assert np.median(narrower) < 0.99 and (narrower < 0.99).sum() > len(base) // 4

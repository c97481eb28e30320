"""Parity recovery: the head refit (real MobileNetV2, real onnxruntime/OpenVINO INT8 models), QAT, and
proof that neither the refiners nor the search can see the test split (the search itself: test_search.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgetl import backbones, data, export, parity, train
from edgetl.backends import QuantInputs
from edgetl.backends.onnxruntime import OnnxRuntimeBackend
from edgetl.profiles import load_profile
from edgetl.recipe import TrainSection
from edgetl.refine import RefineInputs
from edgetl.refine.head_refit import choose, head_refit, ridge_path
from edgetl.views import TrainViews
from tests.conftest import Poison, ReadBeforeTheGate, preprocessed


def test_ridge_path_recovers_a_linear_map_and_shrinks_to_the_start():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 12))
    w_true, b_true = rng.normal(size=(3, 12)), rng.normal(size=3)
    z = f @ w_true.T + b_true
    w0, b0 = np.zeros((3, 12)), np.zeros(3)
    path = ridge_path(f, z, w0, b0, alphas=(1e-8, 1e6))
    (_, w_small, b_small), (_, w_big, _) = path
    assert np.allclose(w_small, w_true, atol=1e-5) and np.allclose(b_small, b_true, atol=1e-5)
    assert np.abs(w_big).max() < 0.01  # strong ridge: stays at the float head


def test_choose_keeps_the_quantized_head_when_no_fit_is_better():
    ref = np.array([[2.0, 0.0], [0.0, 2.0]])
    keep = ref.copy()  # the quantized model already agrees exactly
    worse = [(0.1, np.array([[0.0, 0.0], [0.0, 0.0]]), np.array([0.0, 1.0]))]
    best, table = choose(worse, np.eye(2), keep, ref)
    assert best[0] is None and table[0]["agreement"] == 1.0 and table[0]["mse"] == 0.0 and len(table) == 2


def test_choose_picks_the_ridge_strength_by_logit_error_not_by_agreement():
    """Top-1 agreement on a few rows moves in whole images and rewards luck; the logit error does not:
    a fit that agrees on one more row but is further from the float logits loses."""
    ref = np.array([[1.0, 0.9], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    f = np.eye(4)
    near = (0.1, ref.T.copy() + np.array([[0.0, 0.0, 0.0, 0.0], [0.15, 0.0, 0.0, 0.0]]), np.zeros(2))  # flips row 0
    lucky = (1.0, ref.T.copy() * 0.5, np.zeros(2))  # agrees everywhere, logits halved
    keep = ref * 0.3
    best, table = choose([near, lucky], f, keep, ref)
    assert [t["agreement"] for t in table] == [1.0, 0.75, 1.0]
    assert best[0] == 0.1 and table[1]["mse"] < table[2]["mse"]


def test_the_ridge_strength_is_chosen_on_val_views_every_image_alike():
    from edgetl.refine.head_refit import SELECT_ROWS, selection_rows

    n, k = 120, 16
    views = np.arange(n * k, dtype=np.float32)[:, None]
    ref_views = np.repeat(np.arange(n * k, dtype=np.float32)[:, None], 2, 1)
    qi = QuantInputs(np.zeros((2, 1)), np.zeros((n, 1)), np.zeros(n, int), np.zeros((n, 2)), 1.0, 0.97, 0,
                     views, ref_views, k)
    x, rows, ref = selection_rows(qi)
    assert x is views and len(rows) == n * (SELECT_ROWS // n) <= SELECT_ROWS
    assert sorted({r // k for r in rows}) == list(range(n))  # every val image, the same number of views
    assert np.array_equal(ref, ref_views[rows])
    x, rows, ref = selection_rows(dataclasses.replace(qi, evidence_x=None, evidence_views=0))
    assert rows is None and x is qi.val_x  # no views: the clean val images


@pytest.fixture(scope="module")
def harder(tmp_path_factory):
    """scikit-learn's handwritten digits (real data, shipped offline), 24 per class: small margins,
    enough test images to see predictions flip."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "imgs"
    d = load_digits()
    for label in range(10):
        (root / f"d{label}").mkdir(parents=True)
        for i in np.flatnonzero(d.target == label)[:24]:
            arr = (d.images[i] / 16.0 * 255).round().astype(np.uint8)
            Image.fromarray(arr, "L").resize((48, 48), Image.Resampling.BILINEAR).save(root / f"d{label}" / f"{i}.png")
    return root


def _fitted(folder, tmp_path, *, seed: int, epochs: int):
    """A real feature-extract MobileNetV2 (64 px) on `folder`: data, FP32 export, val/test arrays, float
    logits, and the RefineInputs pieces (training views, float head)."""
    ds = data.scan(folder, seed=seed)
    spec = backbones.get("mobilenet_v2")
    contract = spec.contract(64)
    trunk = backbones.trunk_of(backbones.load_pretrained(spec, backbones.resolve_weights(spec), 64))
    y = {s: np.array([it.label for it in ds.split(s)]) for s in data.SPLITS}
    fit = train.fit_feature_extract(train.Job(trunk, len(ds.classes), ds.split("train"), ds.split("val"), contract,
                                              TrainSection(epochs=epochs, augment_views=1), seed=0))
    net = fit.model
    fp32 = export.to_onnx(net, tmp_path / "m.onnx", contract=contract, labels=ds.classes)
    x = {s: preprocessed(ds.split(s), contract) for s in ("val", "test")}
    ref = {s: train.forward_batches(net, x[s], 16, train.NullProgress(), "").numpy() for s in x}
    calib = preprocessed(ds.split("train")[:32], contract)

    def inputs(profile_agreement: float = 0.97) -> RefineInputs:
        qi = QuantInputs(calib, x["val"], y["val"], ref["val"], 1.0, profile_agreement, 0)
        return RefineInputs(qi, fit.views, (net[1].weight.detach().numpy(), net[1].bias.detach().numpy()), net,
                            lambda: fit.view_logits)

    return ds, fp32, x, y, ref, inputs


@pytest.mark.integration
def test_head_refit_recovers_agreement_where_ptq_flips(harder, tmp_path):
    """Per-tensor weights collapse MobileNetV2's depthwise convs (Krishnamoorthi 2018): plain PTQ flips
    predictions. Refitting the head on the INT8 trunk's features (train views; ridge chosen on val)
    brings the test-split agreement back up. The refit itself is never shown the test split."""
    ds, fp32, x, y, ref, inputs = _fitted(harder, tmp_path, seed=1, epochs=15)
    profile = load_profile("cpu").model_copy(deep=True)
    profile.quantization.per_channel = False
    backend = OnnxRuntimeBackend()
    rins = inputs()
    ptq = backend.quantizers["ort_static"](fp32, rins.data, profile, tmp_path)
    refit = head_refit(ptq, rins, backend, profile, tmp_path)

    def judged(art):  # test-split agreement, and the logit error over val + test (every image counts)
        run = backend.head_features(art, profile)
        logits = {sp: run(x[sp])[1] for sp in ("val", "test")}
        err = np.mean([((logits[sp] - ref[sp]) ** 2).mean() for sp in logits])
        return parity.evaluate(ref["test"], logits["test"], y["test"], ds.classes).top1_agreement, err

    (before, err_before), (after, err_after) = judged(ptq), judged(refit)
    assert before < 0.97, f"precondition: per-tensor PTQ should flip test predictions (agreement {before})"
    assert refit.path != ptq.path and refit.meta["refit"]["alpha"] is not None
    n = len(y["test"])
    assert after >= before + 2 / n, (before, after)  # at least two test images recovered, not one
    assert err_after < 0.8 * err_before, (err_before, err_after)  # the logits move towards the float model
    assert backend.float_nodes(refit, convolutions_only=True) == []  # still fully INT8


@pytest.mark.integration
def test_head_refit_rewrites_openvino_and_nncf_heads(tiny_data, tmp_path):
    """with_head on both backends: the model's logits become features @ W.T + b (the INT8 grid aside)."""
    from edgetl.backends.openvino import OpenVinoBackend

    ds = data.scan(tiny_data)
    spec = backbones.get("mobilenet_v2")
    contract = spec.contract(64)
    trunk = backbones.trunk_of(backbones.load_pretrained(spec, backbones.resolve_weights(spec), 64))
    from torch import nn

    net = nn.Sequential(trunk, nn.Linear(1280, 3)).eval()
    fp32 = export.to_onnx(net, tmp_path / "m.onnx", contract=contract, labels=ds.classes)
    x = preprocessed(ds.split("train"), contract)
    qi = QuantInputs(x[:16], x[:4], np.zeros(4, int), np.zeros((4, 3), np.float32), 1.0, 0.97, 0)
    rng = np.random.default_rng(0)
    w, b = rng.normal(0, 0.05, (3, 1280)).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32)
    for backend, name in ((OnnxRuntimeBackend(), "cpu"), (OpenVinoBackend(), "openvino")):
        profile = load_profile(name)
        art = backend.quantizers["nncf_ptq"](fp32, qi, profile, tmp_path)
        new = backend.with_head(art, w, b, tmp_path, f"{name}-new")
        f_old, _ = backend.head_features(art, profile)(x[:8])
        f_new, logits = backend.head_features(new, profile)(x[:8])
        assert np.array_equal(f_old, f_new)  # the trunk is untouched
        want = f_new @ w.T + b
        seven_bit = profile.quantization.overflow_fix == "enable"  # the cpu profile: 7-bit weights, half the grid
        assert np.abs(logits - want).max() < (0.04 if seven_bit else 0.02) * np.abs(want).max(), name
        # the head stays on the grid the quantizer chose (7 bits: |q| <= 64)
        if name == "cpu":
            import onnx
            from onnx import numpy_helper

            heads = [numpy_helper.to_array(i) for i in onnx.load(str(new.path)).graph.initializer
                     if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
        else:
            import openvino as ov

            heads = [op.get_data() for op in ov.Core().read_model(str(new.path)).get_ops()
                     if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
                     and len(op.get_output_shape(0)) == 2]
        assert heads and all(np.abs(h.astype(int)).max() <= (64 if seven_bit else 127) for h in heads), name
        assert backend.float_nodes(new) == []  # the new head is INT8 like the old one


def test_qat_plan_is_a_function_of_the_data_size_alone():
    from edgetl.refine.qat import plan

    assert plan(n_views=160, epochs=2, max_steps=96, checkpoints=4) == (20, [5, 10, 15, 20])
    assert plan(n_views=2040, epochs=2, max_steps=96, checkpoints=4) == (96, [24, 48, 72, 96])
    assert plan(n_views=10, epochs=1, max_steps=96, checkpoints=4) == (1, [1])


def test_refine_inputs_carry_no_test_data():
    names = {f.name for f in dataclasses.fields(RefineInputs)} | {f.name for f in dataclasses.fields(QuantInputs)}
    assert not [n for n in names if "test" in n]
    assert set(TrainViews.__dataclass_fields__) == {"items", "contract", "n_augmented", "seed", "workers"}


def test_poison_fails_on_use():
    for use in (len, lambda p: p[0], np.asarray, lambda p: p.shape, list):
        with pytest.raises(ReadBeforeTheGate):
            use(Poison())


def test_the_search_takes_no_test_data_by_construction():
    """What the search and the refiners are handed has no field for the test split."""
    import inspect

    from edgetl import target
    from edgetl.evidence import GateEvidence, SearchEvidence

    assert not [f.name for f in dataclasses.fields(SearchEvidence) if "test" in f.name]
    params = inspect.signature(target.search_int8).parameters
    assert "ctx" not in params and not [p for p in params.values() if "Gate" in str(p.annotation)]
    assert {f.name for f in dataclasses.fields(GateEvidence)} == {"x", "y", "reference", "files"}


@pytest.mark.integration
def test_the_search_and_refit_never_read_the_test_split(built):
    """The shared build (conftest's `built`: every built-in target) ran with the gate's evidence (test
    images, labels, float logits, files) poisoned while each target's search (quantizers + head refit)
    ran: any read would have failed it, whatever path it took. The gate afterwards read it as usual."""
    int8 = [t for t in built["result"]["targets"] if t["quantization"]["chosen"]]
    assert built["poisoned_searches"] == len(int8) == 4  # cpu, cpu-arm64, gpu-int8, openvino
    for t in int8:
        assert t["published"] and t["quantization"]["chosen"].endswith("+head_refit")
        assert "refit" in t["quantization"]["attempts"][0]


@pytest.mark.integration
def test_qat_exports_onnx_that_onnxruntime_fuses_and_openvino_loads(tiny_data, tmp_path):
    """NNCF torch QAT with the float model as teacher -> ONNX QDQ: onnxruntime fuses every Conv into
    QLinearConv; the OpenVINO IR made from the same model has INT8 weights everywhere and runs."""
    import onnxruntime as ort

    from edgetl.backends.openvino import OpenVinoBackend
    from edgetl.refine.qat import qat

    ds, fp32, x, y, ref, inputs = _fitted(tiny_data, tmp_path, seed=0, epochs=5)
    x_val, ref = x["val"], ref["val"]
    profile = load_profile("cpu").model_copy(deep=True)
    profile.quantization.qat_epochs, profile.quantization.qat_max_steps = 1, 3
    profile.quantization.qat_checkpoints = 2
    rins = inputs()
    backend = OnnxRuntimeBackend()
    art = qat(fp32, rins, backend, profile, tmp_path)
    info = art.meta["qat"]
    # bounded in steps (3), val-scored at the checkpoints 2 and 3, "no training" (step 0) one of them
    assert [h["step"] for h in info["history"]] == [0, 2, 3] and info["steps"] == 3
    assert info["chosen_step"] in (0, 2, 3)
    assert backend.float_nodes(art, convolutions_only=True) == []
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in __import__("onnx").load(opts.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 52 and "Conv" not in ops and "FusedConv" not in ops
    logits = sess.run(None, {"input": x_val})[0]
    one = 1 / len(x_val)
    # the exported checkpoint is the one the history chose: its val agreement, within one image
    assert (logits.argmax(1) == ref.argmax(1)).mean() == pytest.approx(info["val_agreement"], abs=one + 1e-9)

    ov_backend = OpenVinoBackend()
    ir = ov_backend.from_qdq_onnx(tmp_path / "qat.qdq.onnx", fp32, load_profile("openvino"), tmp_path, "qat")
    assert ir.path.suffix == ".xml" and ov_backend.float_nodes(ir, convolutions_only=True) == []
    _, ov_logits = ov_backend.head_features(ir, load_profile("openvino"))(x_val)
    assert (ov_logits.argmax(1) == logits.argmax(1)).mean() >= 1 - one - 1e-9  # the same model in both runtimes

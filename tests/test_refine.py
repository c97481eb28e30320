"""Parity recovery: the head refit (real MobileNetV2, real onnxruntime/OpenVINO INT8 models), the search
that walks candidates, and proof that neither can see the test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgetl import backbones, data, export, parity, search, train
from edgetl.artifact import Artifact
from edgetl.backends import QuantInputs
from edgetl.backends.onnxruntime import OnnxRuntimeBackend
from edgetl.profiles import TargetProfile, load_profile
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
    assert best[0] is None and table[0]["val_agreement"] == 1.0 and len(table) == 2


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
        assert np.abs(logits - want).max() < 0.02 * np.abs(want).max(), name
        assert backend.float_nodes(new) == []  # the new head is INT8 like the old one


# --- the search: order, fully-INT8 preference, errors recorded --------------------------------------------


class _FakeBackend:
    """Quantizers whose 'models' are fixed val logits; float layers named in the artifact's meta."""

    def __init__(self, outcomes: dict):
        self.outcomes = outcomes  # name -> (agreeing fraction of val, float convs)
        self.quantizers = {n: self._make(n) for n in outcomes}
        self.calls: list[str] = []

    def _make(self, name):
        def q(fp32, qins, profile, work):
            self.calls.append(name)
            if self.outcomes[name] is None:
                raise RuntimeError("quantizer crashed")
            return Artifact(fp32.path, "fake", "0", {"quantizer": name})

        return q

    def float_nodes(self, art, convolutions_only=False):
        return [f"conv{i}" for i in range(self.outcomes[art.meta["quantizer"]][1])]


def _run_search(tmp_path, outcomes, candidates, noise_cut=1.0, views=0, flips=None):
    """outcomes: name -> (share of val images agreeing on every row, float convolutions); the rest of
    the images flip on every row (or on the rows `flips(name, image)` says), with a large logit error."""
    n = 100
    ref_val = np.tile(np.eye(2) * 4, (n // 2, 1))
    ref_views = np.repeat(ref_val, views, axis=0)
    ref = np.concatenate([ref_val, ref_views])
    image = np.concatenate([np.arange(n), np.repeat(np.arange(n), views)])
    y = ref_val.argmax(1) ^ (np.arange(n) % 2)  # the float model right on every other image: flips cost no accuracy
    backend = _FakeBackend(outcomes)

    class Runner:
        def __init__(self, art):
            name = art.meta["quantizer"]
            frac = outcomes[name][0]
            if frac > 1:
                raise RuntimeError("the runtime refused the model")
            flipped = (image >= int(round(frac * n))) if flips is None else flips(name, image)
            self.out = np.where(flipped[:, None], ref[:, ::-1], ref)

        def logits(self, xb):
            i = int(xb[0, 0])
            return self.out[i:i + len(xb)]

    fp32 = tmp_path / "m.onnx"
    fp32.write_bytes(b"x")
    rows = np.arange(len(ref), dtype=np.float32)[:, None]
    qins = QuantInputs(np.zeros((2, 1)), rows[:n], y, ref_val, 1.0, 0.97, 0, rows[n:] if views else None,
                       ref_views if views else None, views)
    profile = TargetProfile(name="t", backend="fake", quantization={"quantizers": candidates,
                                                                    "escalate_noise_cut": noise_cut})
    choice = search.run(backend, profile, Artifact(fp32, "fp32", "0"), qins, None,
                        tolerances={"max_accuracy_drop_pp": 1.0, "min_top1_agreement": 0.9},
                        target_agreement=0.97, candidates=candidates, make_runner=Runner, classes=["a", "b"],
                        seed=0, work=tmp_path)
    return choice, backend


def test_search_stops_at_the_first_fully_int8_candidate_that_meets(tmp_path):
    choice, backend = _run_search(tmp_path, {"a": (0.9, 0), "b": (0.98, 0), "c": (1.0, 0)}, ["a", "b", "c"])
    assert choice.artifact.meta["candidate"] == "b" and backend.calls == ["a", "b"]
    assert [a["quantizer"] for a in choice.attempts] == ["a", "b"] and not choice.val_missed
    assert choice.attempts[1]["versus"] == {"candidate": "a", "images_better": 8, "images_worse": 0,
                                            "p_value": pytest.approx(0.5 ** 8)}


def test_a_later_candidate_replaces_an_earlier_one_only_when_significantly_better(tmp_path):
    """b agrees on 4 more images than a (p = 1/16 > 0.05): the cheaper a stays although both miss."""
    choice, backend = _run_search(tmp_path, {"a": (0.92, 0), "b": (0.96, 0)}, ["a", "b"])
    assert backend.calls == ["a", "b"] and choice.artifact.meta["candidate"] == "a"
    assert choice.attempts[1]["decision"].startswith("kept a: not significantly better")
    # 5 images better, none worse: p = 1/32 < 0.05
    choice, _ = _run_search(tmp_path, {"a": (0.92, 0), "b": (0.97, 0)}, ["a", "b"])
    assert choice.artifact.meta["candidate"] == "b" and choice.attempts[1]["decision"].startswith("replaces a")


def test_the_sign_test_counts_images_not_views(tmp_path):
    """With 9 views an image, b is better on 3 images x 10 rows: 30 rows, but 3 images (p = 1/8): a stays.
    The evidence (val + views) is what the agreement is judged on."""
    choice, _ = _run_search(tmp_path, {"a": (0.90, 0), "b": (0.93, 0)}, ["a", "b"], views=9)
    assert choice.artifact.meta["candidate"] == "a"
    ev = choice.attempts[0]["evidence"]
    assert ev["comparisons"] == 1000 and ev["views_per_image"] == 10 and ev["top1_agreement"] == pytest.approx(0.9)
    lo, hi = ev["agreement_ci95"]
    assert lo < 0.9 < hi and hi - lo > 0.05  # resampled by image: 100 images, not 1000 independent rows
    assert choice.attempts[1]["versus"]["images_better"] == 3


def test_views_count_in_the_agreement(tmp_path):
    """Agreeing on every clean val image is not enough when the views of 10 images flip: 0.91 < 0.97."""
    choice, _ = _run_search(tmp_path, {"a": (1.0, 0)}, ["a"], views=9,
                            flips=lambda name, image: np.r_[np.zeros(100, bool), np.repeat(np.arange(100) < 10, 9)])
    ev = choice.attempts[0]["evidence"]
    assert choice.attempts[0]["val_top1_agreement"] == 1.0 and ev["top1_agreement"] == pytest.approx(0.91)
    assert choice.attempts[0]["val_misses"] and "1000 val images and views" in choice.attempts[0]["val_misses"][-1]


def test_the_search_skips_what_could_never_be_chosen(tmp_path):
    """The choice misses on 4 of 100 val images: even a perfect later candidate would win only 4
    images (p = 1/16 >= 0.05) and could not replace it, so nothing more is built."""
    choice, backend = _run_search(tmp_path, {"a": (0.96, 0), "b": (1.0, 0), "c": (1.0, 0)}, ["a", "b", "c"])
    assert backend.calls == ["a"] and choice.artifact.meta["candidate"] == "a"
    assert all("none could replace it" in a["skipped"] for a in choice.attempts[1:])


def test_the_search_skips_what_cannot_plausibly_reach_the_target(tmp_path):
    """Flips with a logit error larger than the margin: halving the error still flips them, so the
    later candidates are not run, and are recorded as skipped."""
    choice, backend = _run_search(tmp_path, {"a": (0.9, 0), "b": (1.0, 0), "c": (1.0, 0)}, ["a", "b", "c"],
                                  noise_cut=0.5)
    assert backend.calls == ["a"] and choice.artifact.meta["candidate"] == "a"
    assert [a["quantizer"] for a in choice.attempts] == ["a", "b", "c"]
    assert all("no later candidate can plausibly reach" in a["skipped"] for a in choice.attempts[1:])
    # a broken first candidate (under the gate's 0.9 agreement floor) never stops the search
    choice, backend = _run_search(tmp_path, {"a": (0.5, 0), "b": (1.0, 0)}, ["a", "b"], noise_cut=0.5)
    assert backend.calls == ["a", "b"] and choice.artifact.meta["candidate"] == "b"
    # escalate_noise_cut 1 (the next candidate might remove the error entirely): the search goes on
    choice, backend = _run_search(tmp_path, {"a": (0.9, 0), "b": (1.0, 0)}, ["a", "b"], noise_cut=1.0)
    assert backend.calls == ["a", "b"] and choice.artifact.meta["candidate"] == "b"


def test_search_prefers_fully_int8_over_float_layers(tmp_path):
    """Mixed precision meets the target first, but a later fully-INT8 candidate meets it too: INT8 wins."""
    choice, _ = _run_search(tmp_path, {"mp": (1.0, 3), "q": (0.98, 0)}, ["mp", "q"])
    assert choice.artifact.meta["candidate"] == "q" and choice.float_nodes == []
    # nothing INT8 met it, and mixed precision is significantly better: it ships
    choice, _ = _run_search(tmp_path, {"q": (0.90, 0), "mp": (0.99, 3)}, ["q", "mp"])
    assert choice.artifact.meta["candidate"] == "mp" and len(choice.float_nodes) == 3
    # mixed precision met the target, but is not significantly better than the fully-INT8 model: INT8 ships
    choice, _ = _run_search(tmp_path, {"q": (0.95, 0), "mp": (0.99, 3)}, ["q", "mp"])
    assert choice.artifact.meta["candidate"] == "q" and choice.float_nodes == []
    # every candidate misses: the fully-INT8 one ships even though mixed precision agrees more
    choice, _ = _run_search(tmp_path, {"q": (0.90, 0), "mp": (0.96, 3)}, ["q", "mp"])
    assert choice.artifact.meta["candidate"] == "q"


def test_a_broken_choice_gives_way_without_significance(tmp_path):
    """Under the gate's agreement floor (0.9) the choice is broken: the gate would refuse it, so a later
    candidate that is not broken replaces it even on 2 images (p = 1/4), mixed precision included."""
    flips = {"bad": 0.89, "ok": 0.91}
    choice, _ = _run_search(tmp_path, {"bad": (0.0, 0), "ok": (0.0, 0)}, ["bad", "ok"],
                            flips=lambda name, image: image >= int(flips[name] * 100))
    assert choice.artifact.meta["candidate"] == "ok"
    assert choice.attempts[1]["decision"].startswith("replaces bad (under the agreement floor")
    flips = {"q": 0.89, "mp": 0.91}
    choice, _ = _run_search(tmp_path, {"q": (0.0, 0), "mp": (0.0, 3)}, ["q", "mp"],
                            flips=lambda name, image: image >= int(flips[name] * 100))
    assert choice.artifact.meta["candidate"] == "mp"


def test_search_records_a_crashing_candidate_and_goes_on(tmp_path):
    choice, _ = _run_search(tmp_path, {"boom": None, "q": (0.99, 0)}, ["boom", "q"])
    assert choice.attempts[0]["error"].startswith("RuntimeError") and choice.artifact.meta["candidate"] == "q"
    # a model that builds but cannot be run is recorded the same way
    choice, _ = _run_search(tmp_path, {"unloadable": (2.0, 0), "q": (0.99, 0)}, ["unloadable", "q"])
    assert "error" in choice.attempts[0] and choice.artifact.meta["candidate"] == "q"


def test_every_candidate_crashing_is_an_internal_error(tmp_path):
    from edgetl.errors import EdgetlError

    with pytest.raises(EdgetlError, match="every quantization candidate failed") as e:
        _run_search(tmp_path, {"boom": None, "bang": None}, ["boom", "bang"])
    assert e.value.exit_code == 3


def test_unknown_step_or_refiner_first_is_a_usage_error(tmp_path):
    from edgetl.errors import UsageError

    backend = OnnxRuntimeBackend()
    with pytest.raises(UsageError, match="head_refitt"):
        search.check_candidates(["nncf_ptq+head_refitt"], backend, "p.toml")
    with pytest.raises(UsageError, match="needs a quantized model"):
        search.check_candidates(["head_refit"], backend, "p.toml")
    with pytest.raises(UsageError, match="not usable"):
        search.check_candidates(["nncf_ptq+ort_static"], backend, "p.toml")
    with pytest.raises(UsageError, match="qat only first"):  # QAT starts from the float model
        search.check_candidates(["nncf_ptq+qat"], backend, "p.toml")
    search.check_candidates(["qat+head_refit", "nncf_ptq+head_refit"], backend, "p.toml")


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


def test_agreement_is_estimated_for_clean_images_not_for_the_harder_views():
    """Views have lower float margins and flip more: the estimate weights each margin stratum by the
    clean val images, so hard views sharpen it without dragging it down."""
    # 4 images x (clean + 3 views); strata: clean rows in stratum 7 (clear), views in 0 (borderline)
    strata = np.array([[7, 0, 0, 0]] * 4)
    agree = np.array([[True, False, False, True]] * 4)
    assert search.stratified(agree, strata)[0] == 1.0  # every clean image is clear, and clear rows agree
    assert agree.mean() == 0.5
    # half the clean images borderline: their stratum's rate (1 of 7 borderline rows agree) counts half
    strata2 = np.array([[7, 0, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    agree2 = np.array([[True, False, False, True], [True, False, False, False],
                       [False, False, False, False], [False, False, False, False]])
    assert search.stratified(agree2, strata2)[0] == pytest.approx(0.5 * 1.0 + 0.5 * (1 / 14))

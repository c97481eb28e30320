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
        assert np.abs(logits - want).max() < 0.02 * np.abs(want).max(), name
        assert backend.float_nodes(new) == []  # the new head is INT8 like the old one


# --- the search: evidence, the rule through real scoring, errors recorded (the rule alone: test_choice.py) -----


class _FakeBackend:
    """Quantizers whose 'models' are fixed val logits; float layers named in the artifact's meta."""

    def __init__(self, outcomes: dict, expensive=(), raises=None):
        self.outcomes = outcomes  # name -> (agreeing fraction of val, float convs)
        self.quantizers = {n: self._make(n, n in expensive, raises) for n in outcomes}
        self.calls: list[str] = []

    def _make(self, name, expensive, raises):
        def q(fp32, qins, profile, work):
            self.calls.append(name)
            if self.outcomes[name] is None:
                raise (raises or RuntimeError)("quantizer crashed")
            return Artifact(fp32.path, "fake", "0", {"quantizer": name})

        q.expensive = expensive
        return q

    def float_nodes(self, art, convolutions_only=False):
        return [f"conv{i}" for i in range(self.outcomes[art.meta["quantizer"]][1])]


def _run_search(tmp_path, outcomes, candidates, views=0, flips=None, effort="default", expensive=(), gap=None,
                clear_target=0.97, raises=None):
    """outcomes: name -> (share of val images agreeing on every row, float convolutions); the rest of
    the images flip on every row (or on the rows `flips(name, image)` says), with a large logit error.
    `gap`: per val image, the float model's logit gap (4: clear, margin 0.96; 0.2: borderline)."""
    n = 100
    gap = np.full(n, 4.0) if gap is None else np.asarray(gap, dtype=float)
    ref_val = np.tile(np.eye(2), (n // 2, 1)) * gap[:, None]
    ref_views = np.repeat(ref_val, views, axis=0)
    ref = np.concatenate([ref_val, ref_views])
    image = np.concatenate([np.arange(n), np.repeat(np.arange(n), views)])
    y = ref_val.argmax(1) ^ (np.arange(n) % 2)  # the float model right on every other image: flips cost no accuracy
    backend = _FakeBackend(outcomes, expensive, raises)

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
    profile = TargetProfile(name="t", backend="fake", quantization={"quantizers": candidates})
    choice = search.run(backend, profile, Artifact(fp32, "fp32", "0"), qins, None,
                        tolerances={"max_accuracy_drop_pp": 1.0, "min_top1_agreement": 0.9},
                        target_agreement=0.97, candidates=candidates, make_runner=Runner, classes=["a", "b"],
                        seed=0, work=tmp_path, effort=effort, clear_target=clear_target)
    return choice, backend


def test_search_ships_the_first_feasible_candidate_and_records_every_decision(tmp_path):
    choice, backend = _run_search(tmp_path, {"a": (0.9, 0), "b": (0.98, 0), "c": (1.0, 0)}, ["a", "b", "c"])
    assert choice.artifact.meta["candidate"] == "b" and backend.calls == ["a", "b"] and not choice.warnings
    assert [a["quantizer"] for a in choice.attempts] == ["a", "b", "c"] and not choice.val_missed
    a, b, c = choice.attempts
    assert a["decision"].startswith("not feasible: top-1 agreement 0.9000 < 0.97") and a["feasible"] is False
    assert b["decision"] == "chosen: the first feasible fully-INT8 candidate" and b["feasible"] is True
    assert c["decision"].startswith("skipped: b is feasible") and "evidence" not in c
    assert a["evidence"]["logit_mse"] > b["evidence"]["logit_mse"] > 0  # the tie-break's measure, recorded


def test_a_later_candidate_that_meets_the_target_ships_however_small_its_lead(tmp_path):
    """The old sign test kept a (0.96) against b (0.97: 1 image better, p = 0.5): now b, which meets the
    target, ships; max effort builds c too and ships it (the best agreement)."""
    choice, backend = _run_search(tmp_path, {"a": (0.96, 0), "b": (0.97, 0), "c": (0.99, 0)}, ["a", "b", "c"])
    assert choice.artifact.meta["candidate"] == "b" and backend.calls == ["a", "b"]
    choice, backend = _run_search(tmp_path, {"a": (0.96, 0), "b": (0.97, 0), "c": (0.99, 0)}, ["a", "b", "c"],
                                  effort="max")
    assert choice.artifact.meta["candidate"] == "c" and backend.calls == ["a", "b", "c"]
    assert choice.attempts[1]["decision"].startswith("feasible; not chosen: c ships")


def test_none_feasible_ships_the_best_agreement_with_a_warning(tmp_path):
    choice, _ = _run_search(tmp_path, {"a": (0.92, 0), "b": (0.95, 0), "c": (0.93, 0)}, ["a", "b", "c"])
    assert choice.artifact.meta["candidate"] == "b" and not choice.val_missed  # not broken: the gate may pass it
    assert len(choice.warnings) == 1 and choice.warnings[0].startswith("search target not met")
    assert "0.9500" in choice.warnings[0]


def test_views_count_in_the_agreement_and_the_interval_resamples_images(tmp_path):
    """Agreeing on every clean val image is not enough when the views of 10 images flip: 0.91 < 0.97;
    the interval resamples the 100 images, not 1000 independent rows."""
    choice, _ = _run_search(tmp_path, {"a": (1.0, 0)}, ["a"], views=9,
                            flips=lambda name, image: np.r_[np.zeros(100, bool), np.repeat(np.arange(100) < 10, 9)])
    att = choice.attempts[0]
    ev = att["evidence"]
    assert att["val_top1_agreement"] == 1.0 and ev["top1_agreement"] == pytest.approx(0.91)
    assert ev["comparisons"] == 1000 and ev["views_per_image"] == 10
    lo, hi = ev["agreement_ci95"]
    assert lo < 0.91 < hi and hi - lo > 0.05
    assert att["val_misses"] and "1000 val images and views" in att["val_misses"][0]


def test_the_clear_image_target_counts_only_images_the_float_model_is_sure_of(tmp_path):
    """20 borderline images (float margin 0.1) all flip, the 80 clear ones agree: agreement 0.80 misses
    the overall target, the clear-image agreement is 1.0; flipping 2 clear images instead misses the
    clear-image target (0.975 < 0.99) although the overall agreement is 0.98."""
    gap = np.r_[np.full(80, 4.0), np.full(20, 0.2)]
    choice, _ = _run_search(tmp_path, {"a": (0.8, 0)}, ["a"], gap=gap, clear_target=0.99)
    ev = choice.attempts[0]["evidence"]
    assert ev["top1_agreement"] == pytest.approx(0.8) and ev["clear_agreement"] == 1.0
    assert ev["by_margin"]["clear"]["n"] == 80
    choice, _ = _run_search(tmp_path, {"a": (0.98, 0)}, ["a"], gap=gap, clear_target=0.99,
                            flips=lambda name, image: np.isin(image, [0, 1]))
    att = choice.attempts[0]
    assert att["evidence"]["clear_agreement"] == pytest.approx(78 / 80)
    assert att["val_misses"] == ["clear-image agreement 0.9750 < 0.99 (float margin >= 0.2)"]


def test_default_effort_runs_an_expensive_candidate_only_where_it_can_pay(tmp_path):
    """cheap a misses the overall target but passes the gate and the clear-image target: the expensive
    x is skipped (recorded with the reason); when a misses the clear-image target, x runs and ships."""
    gap = np.r_[np.full(80, 4.0), np.full(20, 0.2)]
    borderline_flips = {"a": lambda image: image >= 95, "x": lambda image: image >= 99}
    by_name = lambda name, image: borderline_flips[name](image)  # noqa: E731
    choice, backend = _run_search(tmp_path, {"a": (0, 0), "x": (0, 0)}, ["a", "x"], gap=gap, clear_target=0.99,
                                  expensive={"x"}, flips=by_name)
    assert backend.calls == ["a"] and choice.artifact.meta["candidate"] == "a"
    assert choice.attempts[1]["decision"].startswith("skipped: expensive, and the best so far, a, passes the gate")
    assert choice.attempts[1]["expensive"] is True and choice.warnings[0].startswith("search target not met")
    # max effort runs it, and it ships (feasible: 0.99 overall, 1.0 on clear images)
    choice, backend = _run_search(tmp_path, {"a": (0, 0), "x": (0, 0)}, ["a", "x"], gap=gap, clear_target=0.99,
                                  expensive={"x"}, effort="max", flips=by_name)
    assert backend.calls == ["a", "x"] and choice.artifact.meta["candidate"] == "x" and not choice.warnings
    # a flips two clear images: it misses the clear-image target, so x runs under the default effort
    clear_flips = {"a": lambda image: np.isin(image, [0, 1]), "x": lambda image: image >= 99}
    choice, backend = _run_search(tmp_path, {"a": (0, 0), "x": (0, 0)}, ["a", "x"], gap=gap, clear_target=0.99,
                                  expensive={"x"}, flips=lambda name, image: clear_flips[name](image))
    assert backend.calls == ["a", "x"] and choice.artifact.meta["candidate"] == "x"


def test_low_effort_builds_the_first_candidate_only(tmp_path):
    choice, backend = _run_search(tmp_path, {"a": (0.9, 0), "b": (1.0, 0)}, ["a", "b"], effort="low")
    assert backend.calls == ["a"] and choice.artifact.meta["candidate"] == "a"
    assert choice.attempts[1]["decision"] == "skipped: quantize.effort 'low' builds the first candidate only"


def test_mixed_precision_ships_only_when_feasible_and_nothing_fully_int8_is(tmp_path):
    """Mixed precision meets the target first, but a later fully-INT8 candidate meets it too: INT8 wins."""
    choice, _ = _run_search(tmp_path, {"mp": (1.0, 3), "q": (0.98, 0)}, ["mp", "q"])
    assert choice.artifact.meta["candidate"] == "q" and choice.float_nodes == []
    # nothing INT8 is feasible, mixed precision is: it ships
    choice, _ = _run_search(tmp_path, {"q": (0.95, 0), "mp": (0.99, 3)}, ["q", "mp"])
    assert choice.artifact.meta["candidate"] == "mp" and len(choice.float_nodes) == 3
    # every candidate misses: the fully-INT8 one ships even though mixed precision agrees more
    choice, _ = _run_search(tmp_path, {"q": (0.90, 0), "mp": (0.96, 3)}, ["q", "mp"])
    assert choice.artifact.meta["candidate"] == "q" and choice.warnings


def test_a_broken_candidate_never_ships_when_another_is_not(tmp_path):
    """Under the gate's agreement floor (0.9) a candidate is broken: the one at 0.91 ships, even after
    it; when every fully-INT8 candidate is broken, a mixed-precision one that is not ships."""
    flips = {"bad": 0.89, "ok": 0.91}
    choice, _ = _run_search(tmp_path, {"bad": (0.0, 0), "ok": (0.0, 0)}, ["bad", "ok"],
                            flips=lambda name, image: image >= int(flips[name] * 100))
    assert choice.artifact.meta["candidate"] == "ok"
    assert choice.attempts[0]["decision"].startswith("not feasible: top-1 agreement 0.8900 < 0.9 ")
    flips = {"q": 0.89, "mp": 0.91}
    choice, _ = _run_search(tmp_path, {"q": (0.0, 0), "mp": (0.0, 3)}, ["q", "mp"],
                            flips=lambda name, image: image >= int(flips[name] * 100))
    assert choice.artifact.meta["candidate"] == "mp" and not choice.val_missed


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


@pytest.mark.parametrize("bug", [AttributeError, TypeError, KeyError, NameError])
def test_a_bug_inside_a_candidate_is_an_internal_error_not_a_failed_candidate(tmp_path, bug):
    """A missing method or a wrong argument is ours to fix: it propagates (the CLI's internal error,
    exit 3) instead of becoming a log line while another candidate quietly ships."""
    with pytest.raises(bug):
        _run_search(tmp_path, {"boom": None, "q": (0.99, 0)}, ["boom", "q"], raises=bug)


def test_what_a_candidate_may_legitimately_raise():
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

    from edgetl.errors import BudgetExceeded, UsageError

    ok = [BudgetExceeded("limit"), RuntimeError("x"), ValueError("x"), ort_errors.Fail("x"),
          ort_errors.InvalidGraph("x"), __import__("nncf").errors.InternalError("x")]
    assert all(search._candidate_error(e) for e in ok)
    assert not any(search._candidate_error(e) for e in (UsageError("x"), AttributeError("x"), KeyError("x")))


def test_the_shared_qat_model_is_keyed_by_its_time_limit():
    """A budgeted target must not reuse an unbudgeted target's QAT model (nor the reverse): the limit
    decides whether the candidate exists at all."""
    from edgetl.refine.qat import qat_key

    free = load_profile("cpu")
    budgeted = free.model_copy(deep=True)
    budgeted.quantization.qat_budget_s = 60.0
    assert qat_key(free) != qat_key(budgeted)
    assert qat_key(free) == qat_key(load_profile("openvino"))  # same scheme, no limit: one model for both


def test_expensive_candidates_are_marked_as_data():
    backend = OnnxRuntimeBackend()
    from edgetl.refine import refiners

    known = refiners()
    assert [search.expensive(c, backend, known) for c in load_profile("cpu").quantization.quantizers] == \
        [False, False, True, True]


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

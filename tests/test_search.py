"""The INT8 search through real scoring (edgetl/search.py): evidence, the rule's outcomes, errors recorded
(the rule alone, on synthetic scores: test_choice.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl import search
from edgetl.artifact import Artifact
from edgetl.backends import QuantInputs
from edgetl.backends.onnxruntime import OnnxRuntimeBackend
from edgetl.errors import EdgetlError, UsageError
from edgetl.profiles import TargetProfile, load_profile

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

    from edgetl.errors import BudgetExceeded

    ok = [BudgetExceeded("limit"), RuntimeError("x"), ValueError("x"), ort_errors.Fail("x"),
          ort_errors.InvalidGraph("x"), __import__("nncf").errors.InternalError("x")]
    assert all(search._candidate_error(e) for e in ok)
    assert not any(search._candidate_error(e) for e in (UsageError("x"), AttributeError("x"), KeyError("x"),
                                                        MemoryError(), RuntimeError("std::bad_alloc"),
                                                        RuntimeError("write: No space left on device")))


def test_the_shared_qat_model_is_keyed_by_its_time_limit():
    """A budgeted target must not reuse an unbudgeted target's QAT model (nor the reverse): the limit
    decides whether the candidate exists at all."""
    from edgetl.refine.qat import qat_key

    free = load_profile("cpu")
    budgeted = free.model_copy(deep=True)
    budgeted.quantization.qat_budget_s = 60.0
    assert qat_key(free) != qat_key(budgeted)
    assert qat_key(free) == qat_key(load_profile("openvino"))  # same scheme, no limit: one model for both
    ranged = free.model_copy(deep=True)
    ranged.quantization.activation_range = "mean_quantile"  # QAT's initial ranges differ: another model
    assert qat_key(free) != qat_key(ranged)


def test_expensive_candidates_are_marked_as_data():
    backend = OnnxRuntimeBackend()
    from edgetl.refine import refiners

    known = refiners()
    assert [search.expensive(c, backend, known) for c in load_profile("cpu").quantization.quantizers] == \
        [False, False, True, True]


def test_unknown_step_or_refiner_first_is_a_usage_error(tmp_path):

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

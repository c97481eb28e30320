import numpy as np
import pytest

from edgetl import parity


def _logits(pred, n_classes=3, margin=5.0):
    out = np.zeros((len(pred), n_classes), dtype=np.float32)
    out[np.arange(len(pred)), pred] = margin
    return out


def test_metrics_and_gate():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    ref = _logits(labels)  # float reference: 100 %
    pred = labels.copy()
    pred[[0, 1]] = [1, 2]  # two mistakes
    rep = parity.evaluate(ref, _logits(pred), labels, ["a", "b", "c"], tolerance_pp=1.0)
    assert rep.reference_accuracy == 1.0 and rep.accuracy == pytest.approx(0.8)
    assert rep.accuracy_drop_pp == pytest.approx(20.0) and rep.top1_agreement == pytest.approx(0.8)
    lo, hi = rep.accuracy_drop_ci95_pp
    assert lo <= 20.0 <= hi and hi > lo
    assert rep.discordant == {"reference_only_correct": 2, "target_only_correct": 0}
    assert [c["change_pp"] for c in rep.per_class] == [-25.0, -33.333, 0.0]
    assert rep.warnings and "one test image is worth 10.00 pp" in rep.warnings[0]
    missed, _ = parity.gate_misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.9)
    assert len(missed) == 2  # every miss listed, not just the first


def test_identical_models_pass():
    labels = np.arange(200) % 4
    ref = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    rep = parity.evaluate(ref, ref.copy(), labels, list("abcd"), tolerance_pp=1.0)
    assert rep.accuracy_drop_pp == 0 and rep.top1_agreement == 1 and rep.logits_cosine_min == pytest.approx(1.0)
    assert not rep.warnings
    assert parity.gate_misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.9) == ([], [])


def test_search_judges_the_drop_by_its_interval():
    labels = np.arange(100) % 2
    ref = _logits(labels, 2)
    pred = labels.copy()
    pred[:2] = 1 - pred[:2]  # 2 pp point drop, but within noise for n=100
    rep = parity.evaluate(ref, _logits(pred, 2), labels, ["a", "b"])
    assert parity.misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.9)
    assert not parity.misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.9, drop_by_ci=True)
    pred[:20] = 1 - labels[:20]  # 20 pp: significant
    rep = parity.evaluate(ref, _logits(pred, 2), labels, ["a", "b"])
    assert parity.misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.0, drop_by_ci=True)


def test_drop_upper_bound_known_values():
    from scipy.stats import beta, binom

    # n=228, 3 images only the reference gets right, 1 only the model: m=4, p_hi = 0.95 ** (1/4) (Beta(4, 1)).
    bound = parity.drop_upper_bound_pp(3, 1, 228)
    p_hi = beta.ppf(0.95, 4, 1)
    assert p_hi == pytest.approx(0.95 ** 0.25)
    assert bound == pytest.approx(4 * (2 * p_hi - 1) / 228 * 100) and bound == pytest.approx(1.7097, abs=1e-4)
    # the Clopper-Pearson bound leaves 5 % in the lower tail: P(Bin(m, p_hi) <= b) = 0.05
    for b, c in [(3, 1), (0, 5), (7, 2), (1, 9), (20, 20)]:
        m = b + c
        p_hi = (parity.drop_upper_bound_pp(b, c, 1000) / 100 * 1000 / m + 1) / 2
        assert binom.cdf(b, m, p_hi) == pytest.approx(0.05, rel=1e-6)
    # every discordant image goes the reference's way: p_hi = 1, the bound is all of them
    assert parity.drop_upper_bound_pp(5, 0, 100) == pytest.approx(5.0)


def test_drop_upper_bound_covers_the_point_estimate():
    for n in (10, 228, 5000):
        for b in range(0, 8):
            for c in range(0, 8):
                if b + c <= n:
                    assert parity.drop_upper_bound_pp(b, c, n) >= (b - c) / n * 100 - 1e-12


def test_drop_upper_bound_is_zero_without_discordant_images():
    assert parity.drop_upper_bound_pp(0, 0, 228) == 0.0
    assert parity.drop_upper_bound_pp(0, 0, 0) == 0.0


def test_agreement_lower_bound_known_values():
    from scipy.stats import beta

    for n in (1, 30, 228):
        assert parity.agreement_lower_bound(n, n) == pytest.approx(0.05 ** (1 / n))
    assert parity.agreement_lower_bound(221, 228) == pytest.approx(beta.ppf(0.05, 221, 8))
    assert 0.94 < parity.agreement_lower_bound(221, 228) < 221 / 228
    assert parity.agreement_lower_bound(0, 228) == 0.0 and parity.agreement_lower_bound(0, 0) == 0.0


def test_evaluate_lists_changed_predictions_and_bounds():
    labels = np.arange(228) % 3
    ref_pred = labels.copy()
    ref_pred[[10, 11]] = (labels[[10, 11]] + 1) % 3  # the reference misses 10, 11
    pred = ref_pred.copy()
    pred[[3, 50, 99]] = (labels[[3, 50, 99]] + 2) % 3  # only the reference right on 3 images
    pred[10] = labels[10]  # only the model right on one
    pred[11] = (labels[11] + 2) % 3  # both wrong, differently: changed, not discordant
    rep = parity.evaluate(_logits(ref_pred), _logits(pred), labels, ["a", "b", "c"])
    assert [c["index"] for c in rep.changed] == [3, 10, 11, 50, 99]
    assert rep.changed[0] == {"index": 3, "label": int(labels[3]), "reference": int(ref_pred[3]),
                              "predicted": int(pred[3]), "kind": "right → wrong"}
    assert [c["kind"] for c in rep.changed] == ["right → wrong", "wrong → right", "wrong → other wrong",
                                                "right → wrong", "right → wrong"]
    assert all(isinstance(v, int) for c in rep.changed for k, v in c.items() if k != "kind")  # JSON-ready
    assert rep.discordant == {"reference_only_correct": 3, "target_only_correct": 1}
    assert rep.drop_upper95_pp == pytest.approx(parity.drop_upper_bound_pp(3, 1, 228))
    assert rep.drop_upper95_pp >= rep.accuracy_drop_pp == pytest.approx(2 / 228 * 100, abs=1e-4)
    assert rep.agreement_lower95 == pytest.approx(parity.agreement_lower_bound(223, 228))
    assert rep.to_dict()["changed"] == rep.changed
    # the gate stays on the point estimates: a bound above the tolerance is no miss by itself
    assert rep.drop_upper95_pp > 1.0 and rep.agreement_lower95 < 0.97
    assert not parity.misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.97)


def test_identical_models_have_no_changes_and_a_zero_drop_bound():
    labels = np.arange(50) % 5
    ref = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
    rep = parity.evaluate(ref, ref.copy(), labels, list("abcde"))
    assert rep.changed == [] and rep.drop_upper95_pp == 0.0
    assert rep.agreement_lower95 == pytest.approx(0.05 ** (1 / 50))


def test_report_round_trips_through_json():
    """What report.json and the manifest carry reads back into the same typed record."""
    import json

    labels = np.arange(40) % 4
    ref = np.random.default_rng(3).normal(size=(40, 4)).astype(np.float32)
    rep = parity.evaluate(ref, ref + np.random.default_rng(4).normal(0, 0.5, ref.shape), labels, list("abcd"))
    rep.gate_rule = {"asked": "auto", "applied": "evidence", "certified": True}
    back = parity.ParityReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep and back.changed and isinstance(back.accuracy_drop_ci95_pp, tuple)
    old = {k: v for k, v in rep.to_dict().items() if k not in ("logits_cosine_min", "sqnr_db")}  # edgetl 0.2.0's
    back = parity.ParityReport.from_dict(old)  # `edgetl info` on an older bundle: missing figures are nan
    assert back.accuracy == rep.accuracy and np.isnan(back.logits_cosine_min) and np.isnan(back.sqnr_db)


def _discordant(n: int, reference_only: int, model_only: int, wrong_both: int = 0):
    """A report on n images: the float model right on all but `wrong_both` + `model_only`; the model
    differs on `reference_only` (wrong where the float is right), `model_only` (right where it is wrong)
    and `wrong_both` (both wrong, with different classes)."""
    labels = np.arange(n) % 4
    ref_pred, pred = labels.copy(), labels.copy()
    pred[:reference_only] = (labels[:reference_only] + 1) % 4
    sl = slice(reference_only, reference_only + model_only)
    ref_pred[sl] = (labels[sl] + 1) % 4
    sl = slice(reference_only + model_only, reference_only + model_only + wrong_both)
    ref_pred[sl], pred[sl] = (labels[sl] + 2) % 4, (labels[sl] + 3) % 4  # both wrong, differently
    return parity.evaluate(_logits(ref_pred, 4), _logits(pred, 4), labels, list("abcd"))


def test_point_gate_on_the_edge_of_its_tolerance():
    """n = 100: one net image is 1 pp, exactly the tolerance (passes); two are 2 pp (miss)."""
    tol = dict(max_accuracy_drop_pp=1.0, min_top1_agreement=0.9)
    assert parity.gate_misses(_discordant(100, 1, 0), **tol, rule="point") == ([], [])
    found, _ = parity.gate_misses(_discordant(100, 2, 0), **tol, rule="point")
    assert len(found) == 1 and found[0].startswith("accuracy drop 2.00 pp > 1 pp")
    # agreement floor on its edge: 90 of 100 agree passes, 89 misses (net drop 0: 5 up, 5 down)
    assert parity.gate_misses(_discordant(100, 5, 5), **tol, rule="point") == ([], [])
    found, _ = parity.gate_misses(_discordant(100, 5, 5, wrong_both=1), **tol, rule="point")
    assert found == ["top-1 agreement 0.8900 < 0.9"]


def test_non_finite_logits_miss_the_gate():
    rep = _discordant(100, 0, 0)
    rep.logits_cosine_mean = float("nan")
    found, _ = parity.gate_misses(rep, max_accuracy_drop_pp=1.0, min_top1_agreement=0.9)
    assert found == ["logits are not finite"]


def test_evidence_gate_fails_only_what_is_shown_worse_and_says_what_it_cannot_certify():
    """46 test images (one = 2.17 pp): a one-image net loss is not evidence of a 1 pp drop; it passes,
    loudly NOT CERTIFIED, naming the images needed. Ten images lost net is shown worse: a miss."""
    tol = dict(max_accuracy_drop_pp=1.0, min_top1_agreement=0.5)
    one = _discordant(46, 1, 0)
    assert parity.gate_misses(one, **tol, rule="point")[0]  # the point rule fails it
    found, warnings = parity.gate_misses(one, **tol, rule="evidence")
    assert found == [] and len(warnings) == 1
    assert warnings[0].startswith("NOT CERTIFIED") and "about 200 test images" in warnings[0]
    bad = _discordant(46, 10, 0)
    assert bad.drop_lower95_pp > 1.0
    found, _ = parity.gate_misses(bad, **tol, rule="evidence")
    assert found and "lower bound" in found[0] and "'evidence'" in found[0]
    # a clean model on a small split is certified: no discordant image, no warning
    assert parity.gate_misses(_discordant(46, 0, 0), **tol, rule="evidence") == ([], [])


def test_auto_rule_takes_the_point_estimate_only_where_one_image_is_worth_half_the_tolerance():
    assert parity.resolve_rule("auto", 200, 1.0) == "point"
    assert parity.resolve_rule("auto", 199, 1.0) == "evidence"
    assert parity.resolve_rule("auto", 46, 1.0) == "evidence"
    assert parity.resolve_rule("auto", 400, 0.5) == "point"
    assert parity.resolve_rule("auto", 10**6, 0.0) == "point"  # no drop allowed: the point estimate judges
    assert parity.resolve_rule("point", 10, 1.0) == "point"
    assert parity.resolve_rule("evidence", 10**6, 1.0) == "evidence"


def test_drop_lower_bound_mirrors_the_upper_one():
    rep = _discordant(228, 3, 1)
    assert rep.drop_lower95_pp == pytest.approx(-parity.drop_upper_bound_pp(1, 3, 228))
    assert rep.drop_lower95_pp <= rep.accuracy_drop_pp <= rep.drop_upper95_pp


def test_agreement_by_margin_splits_clear_from_borderline():
    ref = np.array([[5.0, 0.0], [0.1, 0.0], [0.0, 4.0], [0.0, 0.05]])  # clear, borderline, clear, borderline
    same = np.array([True, False, True, True])
    got = parity.agreement_by_margin(ref, same)
    assert got["clear"] == {"n": 2, "agreement": 1.0, "flips": 0}
    assert got["borderline"] == {"n": 2, "agreement": 0.5, "flips": 1}


def test_sign_test_known_values():
    assert parity.sign_test_p(5, 0) == pytest.approx(1 / 32)
    assert parity.sign_test_p(4, 0) == pytest.approx(1 / 16)
    assert parity.sign_test_p(0, 0) == 1.0
    assert parity.sign_test_p(6, 2) == pytest.approx((28 + 8 + 1) / 256)  # P(X >= 6), X ~ Bin(8, 1/2)

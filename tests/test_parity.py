import numpy as np
import pytest

from edgetl import parity
from edgetl.errors import ParityError


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
    assert rep.drop_ci95_pp[0] <= 20.0 <= rep.drop_ci95_pp[1] and rep.drop_ci95_pp[1] > rep.drop_ci95_pp[0]
    assert rep.discordant == {"reference_only_correct": 2, "target_only_correct": 0}
    assert [c["change_pp"] for c in rep.per_class] == [-25.0, -33.333, 0.0]
    assert rep.warnings and "one test image is worth 10.00 pp" in rep.warnings[0]
    with pytest.raises(ParityError) as err:
        parity.gate(rep, target="cpu", max_accuracy_drop_pp=1.0, min_top1_agreement=0.9)
    assert len(err.value.misses) == 2  # every miss listed, not just the first


def test_identical_models_pass():
    labels = np.arange(200) % 4
    ref = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    rep = parity.evaluate(ref, ref.copy(), labels, list("abcd"), tolerance_pp=1.0)
    assert rep.accuracy_drop_pp == 0 and rep.top1_agreement == 1 and rep.logits_cosine_min == pytest.approx(1.0)
    assert not rep.warnings
    parity.gate(rep, target="cpu", max_accuracy_drop_pp=1.0, min_top1_agreement=0.9)


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

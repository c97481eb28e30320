"""Stage 6: compare a target's model with the float reference and gate on the profile's tolerances."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np


@dataclass
class ParityReport:
    n_test: int
    reference_accuracy: float
    accuracy: float
    accuracy_drop_pp: float
    accuracy_drop_ci95_pp: tuple[float, float]  # paired bootstrap over test images
    top1_agreement: float
    logits_cosine_mean: float
    logits_cosine_min: float
    sqnr_db: float
    per_class: list[dict] = field(default_factory=list)  # {class, n, reference_recall, recall, change_pp}
    discordant: dict = field(default_factory=dict)  # McNemar counts: only-reference-right / only-target-right
    one_image_pp: float = 0.0
    confusion: list[list[int]] = field(default_factory=list)  # [true class][predicted class]
    warnings: list[str] = field(default_factory=list)
    split: str = "test"
    drop_upper95_pp: float = 0.0  # exact paired one-sided 95 % upper bound of the drop
    drop_lower95_pp: float = 0.0  # exact paired one-sided 95 % lower bound of the drop
    agreement_lower95: float = 0.0  # one-sided 95 % Clopper-Pearson lower bound of top1_agreement
    changed: list[dict] = field(default_factory=list)  # {index, label, reference, predicted, kind, file}: top-1 differs
    gate_rule: dict = field(default_factory=dict)  # {asked, applied, certified}: set by the gate
    agreement_by_margin: dict = field(default_factory=dict)  # agreement_by_margin(): set by the gate
    export_max_abs_diff: float | None = None  # the FP32 ONNX vs torch on val images: set by the gate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ParityReport:
        """The record report.json / manifest.json carry, read back (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        nan = float("nan")  # a figure an older edgetl did not record (or named otherwise)
        required = {f.name: (nan, nan) if f.name == "accuracy_drop_ci95_pp" else 0 if f.name == "n_test" else nan
                    for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        out = cls(**{**required, **{k: v for k, v in d.items() if k in known}})
        out.accuracy_drop_ci95_pp = tuple(out.accuracy_drop_ci95_pp)
        return out


def evaluate(reference_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, classes: list[str],
             *, seed: int = 0, split: str = "test", tolerance_pp: float | None = None,
             n_boot: int = 2000, min_judged: int = 1) -> ParityReport:
    """Every metric from the two logit matrices on the same images, in the same order. A class with
    fewer than `min_judged` images is listed with `judged: false` (its recall change is noise)."""
    labels = np.asarray(labels)
    ref_pred, pred = reference_logits.argmax(1), logits.argmax(1)
    ref_ok, ok = ref_pred == labels, pred == labels
    n = len(labels)
    ref_acc, acc = float(ref_ok.mean()), float(ok.mean())
    drop = (ref_acc - acc) * 100.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = (ref_ok[idx].mean(1) - ok[idx].mean(1)) * 100.0
    ci = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))
    num = (reference_logits * logits).sum(1)
    den = np.linalg.norm(reference_logits, axis=1) * np.linalg.norm(logits, axis=1) + 1e-12
    cos = num / den
    noise = float(((reference_logits - logits) ** 2).sum())
    sqnr = float(10 * np.log10((reference_logits ** 2).sum() / noise)) if noise > 0 else float("inf")
    per_class = []
    for c, name in enumerate(classes):
        m = labels == c
        if m.any():
            r0, r1 = float(ref_ok[m].mean()), float(ok[m].mean())
            per_class.append({"class": name, "n": int(m.sum()), "reference_recall": r0, "recall": r1,
                              "change_pp": round((r1 - r0) * 100, 3), "judged": bool(m.sum() >= min_judged)})
    only_ref, only_model = int((ref_ok & ~ok).sum()), int((~ref_ok & ok).sum())
    same = ref_pred == pred
    changed = [{"index": int(i), "label": int(labels[i]), "reference": int(ref_pred[i]), "predicted": int(pred[i]),
                "kind": flip_kind(int(labels[i]), int(ref_pred[i]), int(pred[i]))}
               for i in np.flatnonzero(~same)]
    one = 100.0 / n if n else float("inf")
    warnings = []
    if tolerance_pp is not None and one > tolerance_pp:
        warnings.append(f"one {split} image is worth {one:.2f} pp, more than the {tolerance_pp:g} pp tolerance: "
                        f"with {n} images the gate cannot resolve a drop that small; add {split} images")
    return ParityReport(
        n_test=n, reference_accuracy=ref_acc, accuracy=acc, accuracy_drop_pp=round(drop, 4),
        accuracy_drop_ci95_pp=ci,
        top1_agreement=float(same.mean()), logits_cosine_mean=float(cos.mean()),
        logits_cosine_min=float(cos.min()), sqnr_db=sqnr, per_class=per_class,
        discordant={"reference_only_correct": only_ref, "target_only_correct": only_model},
        one_image_pp=one, confusion=confusion(labels, pred, len(classes)), warnings=warnings, split=split,
        drop_upper95_pp=drop_upper_bound_pp(only_ref, only_model, n),
        drop_lower95_pp=-drop_upper_bound_pp(only_model, only_ref, n),
        agreement_lower95=agreement_lower_bound(int(same.sum()), n), changed=changed)


FLIP_KINDS = ("right → wrong", "wrong → right", "wrong → other wrong")


def flip_kind(label: int, reference: int, predicted: int) -> str:
    """How a changed prediction moved: the float model right and this one wrong, the reverse, or
    both wrong with different classes."""
    return FLIP_KINDS[0] if reference == label else FLIP_KINDS[1] if predicted == label else FLIP_KINDS[2]


def drop_upper_bound_pp(reference_only: int, model_only: int, n: int, *, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound (95 % by default) of the paired accuracy drop
    (reference accuracy minus model accuracy, in pp).

    McNemar's construction: of the m = b + c discordant images, b = `reference_only` are right only
    for the reference and c = `model_only` only for the model. Given m, b ~ Binomial(m, p) and the
    drop is m (2p - 1) / n; the one-sided Clopper-Pearson upper bound p_hi of p bounds it. 0.0 when
    the two models are right on exactly the same images."""
    m = reference_only + model_only
    if m == 0 or n <= 0:
        return 0.0
    from scipy.stats import beta

    p_hi = 1.0 if reference_only == m else float(beta.ppf(confidence, reference_only + 1, m - reference_only))
    return m * (2.0 * p_hi - 1.0) / n * 100.0


def agreement_lower_bound(agree: int, n: int, *, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower confidence bound (95 % by default) of the top-1 agreement
    (`agree` of `n` images agree); 0.0 when none do."""
    if agree <= 0 or n <= 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(1.0 - confidence, agree, n - agree + 1))


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> list[list[int]]:
    """Confusion matrix, [true class][predicted class]."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(predicted)), 1)
    return m.tolist()


def misses(report: ParityReport, *, max_accuracy_drop_pp: float, min_top1_agreement: float,
           drop_by_ci: bool = False) -> list[str]:
    """Every missed tolerance. The gate judges the point estimate of the drop; with drop_by_ci the
    drop only misses when even the lower end of its 95 % interval is above the tolerance (used
    for the quantizer search on the small validation split, where one image can be worth > 1 pp)."""
    out = []
    drop = report.accuracy_drop_ci95_pp[0] if drop_by_ci else report.accuracy_drop_pp
    if drop > max_accuracy_drop_pp + 1e-9:
        what = "95 % CI lower bound of the accuracy drop" if drop_by_ci else "accuracy drop"
        out.append(f"{what} {drop:.2f} pp > {max_accuracy_drop_pp:g} pp "
                   f"(float {report.reference_accuracy:.4f}, int8 {report.accuracy:.4f}, n={report.n_test})")
    if report.top1_agreement < min_top1_agreement - 1e-9:
        out.append(f"top-1 agreement {report.top1_agreement:.4f} < {min_top1_agreement:g}")
    if not np.isfinite(report.logits_cosine_mean):
        out.append("logits are not finite")
    return out


RULES = ("point", "evidence")


def resolve_rule(rule: str, n: int, tolerance_pp: float) -> str:
    """"auto" -> "point" when one image is worth at most half the tolerance, else "evidence"."""
    if rule != "auto":
        return rule
    if tolerance_pp <= 0:  # no drop allowed: only the point estimate can say so
        return "point"
    return "point" if n and 100.0 / n <= tolerance_pp / 2 + 1e-12 else "evidence"


def gate_misses(report: ParityReport, *, max_accuracy_drop_pp: float, min_top1_agreement: float,
                rule: str = "point") -> tuple[list[str], list[str]]:
    """(every missed tolerance, warnings) on the test split under the drop rule:
    "point": the drop itself must be within the tolerance;
    "evidence": a miss only when the paired 95 % lower bound of the drop is above the tolerance (the
    model is shown worse by more than it); when the upper bound is above it, a warning says that
    this split cannot certify the tolerance and how many images would."""
    found = misses(report, max_accuracy_drop_pp=math.inf if rule == "evidence" else max_accuracy_drop_pp,
                   min_top1_agreement=min_top1_agreement)
    warnings = []
    if rule == "evidence":
        if report.drop_lower95_pp > max_accuracy_drop_pp + 1e-9:
            found.insert(0, f"accuracy drop {report.accuracy_drop_pp:.2f} pp: its 95 % lower bound "
                            f"{report.drop_lower95_pp:.2f} pp > {max_accuracy_drop_pp:g} pp (gate rule 'evidence', "
                            f"n={report.n_test})")
        elif report.drop_upper95_pp > max_accuracy_drop_pp + 1e-9:
            warnings.append(f"NOT CERTIFIED: the {report.split} split (n={report.n_test}, one image = "
                            f"{report.one_image_pp:.2f} pp) cannot certify the {max_accuracy_drop_pp:g} pp tolerance: "
                            f"drop {report.accuracy_drop_pp:+.2f} pp, 95 % upper bound "
                            f"{report.drop_upper95_pp:.2f} pp; passed under gate rule 'evidence' (not shown worse); "
                            f"about {images_to_resolve(max_accuracy_drop_pp)} test images would let the point "
                            "rule judge it")
    return found, warnings


def logits_of(runner, x: np.ndarray, batch: int = 32, progress=None, description: str = "") -> np.ndarray:
    """runner.logits over x (an array or a loader.Split) in batches."""
    starts = range(0, len(x), batch)
    it = progress.track(starts, total=len(starts), description=description) if progress else starts
    return np.concatenate([runner.logits(x[s:s + batch]) for s in it])


MARGIN = 0.2  # float top-1 minus top-2 probability: below it an image is "borderline"


def float_margin(reference_logits: np.ndarray) -> np.ndarray:
    """Per image: the float model's top-1 minus top-2 softmax probability."""
    z = np.asarray(reference_logits, dtype=np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.sort(p, axis=1)
    return top[:, -1] - (top[:, -2] if p.shape[1] > 1 else 0.0)


def agreement_by_margin(reference_logits: np.ndarray, same: np.ndarray, threshold: float = MARGIN) -> dict:
    """Agreement with the float model split by its margin: are the flips confined to borderline images?"""
    clear = float_margin(reference_logits) >= threshold
    same = np.asarray(same, dtype=bool)

    def part(mask):
        n = int(mask.sum())
        return {"n": n, "agreement": float(same[mask].mean()) if n else None, "flips": int((~same[mask]).sum())}

    return {"threshold": threshold, "clear": part(clear), "borderline": part(~clear)}


def sign_test_p(better: int, worse: int) -> float:
    """One-sided exact binomial (McNemar / sign) test: the probability of `better` or more successes in
    `better + worse` fair coin tosses. Small: the advantage is unlikely to be chance."""
    m = better + worse
    if m == 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(better - 1, m, 0.5))


def images_to_resolve(tolerance_pp: float) -> int:
    """Test images needed for one image to be worth at most half the drop tolerance."""
    return int(np.ceil(200.0 / tolerance_pp)) if tolerance_pp > 0 else 0

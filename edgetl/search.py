"""The INT8 search: walk the profile's candidates in order, each judged on train + val evidence.

A candidate is a chain `step[+step...]`: the first step is a quantizer of the backend (fp32 ONNX
in, INT8 model out) or a refiner (edgetl/refine/) applied to the float model; every later step is a
refiner applied to the model before it. "nncf_ptq+head_refit" is NNCF PTQ, then the head refit;
models built by a chain's prefix are reused by the next candidate. The search does not know what
a step does: every one is "model in, model out".

Evidence. Agreement with the float model needs no labels, so a candidate is judged on the val
images *and* seeded augmented views of them (`QuantInputs.evidence_x`, thousands of comparisons
where val alone has ~100). Views have lower float margins than clean images and flip more often,
so the agreement is estimated per margin stratum over every row and weighted by the clean val
images' strata (post-stratification). The accuracy drop, which needs labels, is judged on val.

The rule (deterministic: nothing here reads a clock):
- The first candidate that builds is the current choice. A later one replaces it only when its
  advantage is significant on paired evidence: over the val images on whose views exactly one of
  the two agrees with the float model more often, an exact one-sided sign (McNemar) test at ALPHA
  (an image counts once, whatever its views). Otherwise the cheaper, earlier one stays. A broken
  choice (one that misses the gate's tolerances on val — agreement floor, or a drop shown above the
  tolerance — so the gate would refuse it anyway) is replaced by any later one that is not broken,
  mixed precision included.
- The search stops at the first fully-INT8 choice that meets the search target; before a candidate
  that could not replace the choice even if it agreed everywhere (the choice misses on so few val
  images that no sign test over them reaches ALPHA: more work cannot change what ships); and
  before a candidate that cannot plausibly reach the target: when even the current choice with
  its logit error cut by `quantization.escalate_noise_cut` (0.5: half the quantization noise)
  stays under the target. Skipped candidates are recorded as such. (Neither skip follows a broken
  choice: it is broken, not noisy, and the next quantizer is always tried.)
- A candidate that keeps convolutions in float (mixed precision) ships only when it meets the
  target, no fully-INT8 choice does, and it is significantly better than the fully-INT8 choice.
The search never receives the test split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import parity
from .artifact import Artifact
from .backends import QuantInputs
from .errors import BudgetExceeded, EdgetlError, UsageError
from .progress import NullProgress, Progress

log = logging.getLogger(__name__)


def steps_of(candidate: str) -> list[str]:
    """"nncf_ptq+head_refit" -> ["nncf_ptq", "head_refit"]."""
    return [s.strip() for s in candidate.split("+")]


def check_candidates(candidates: list[str], backend, source: str) -> None:
    """Every step must be a quantizer of the backend or a refiner; refiners only after the first step
    or, when they start a chain, ones that take the float model (QAT)."""
    from .refine import refiners

    known = refiners()
    for cand in candidates:
        steps = steps_of(cand)
        first, rest = steps[0], steps[1:]
        bad = [s for s in steps if not s or (s not in backend.quantizers and s not in known)]
        bad += [s for s in rest if s in backend.quantizers or getattr(known.get(s), "from_float", False)]
        if bad:
            raise UsageError(f"{source}: quantization candidate '{cand}': {bad} not usable here; fix: start with a "
                             f"quantizer ({', '.join(backend.quantizers)}) or a refiner ({', '.join(known)}), "
                             f"then refiners joined by '+' (qat only first: it starts from the float model)")
        if first in known and not getattr(known[first], "from_float", False):
            raise UsageError(f"{source}: quantization candidate '{cand}': refiner '{first}' needs a quantized model; "
                             f"fix: put a quantizer before it (e.g. 'nncf_ptq+{first}')")


ALPHA = 0.05  # significance a later candidate needs to replace an earlier one


@dataclass
class Choice:
    artifact: Artifact
    val_missed: list[str]  # the chosen model's misses of the gate tolerances on val (non-empty: budget spent)
    float_nodes: list[str]
    attempts: list[dict]


@dataclass
class _Scored:
    """A candidate that built and ran, with its evidence."""

    name: str
    artifact: Artifact
    agree: np.ndarray  # (val images, 1 + views) bool: agrees with the float model on that row
    logits: np.ndarray  # its logits on the evidence rows, val first, then the views image-major
    gate_missed: list[str]
    missed: list[str]  # of the search target
    float_nodes: list[str]
    int8: bool  # no convolution left in float
    attempt: dict
    broken: bool = False  # misses the gate's tolerances on val (agreement floor, drop): broken, not noisy


def evidence_reference(qins: QuantInputs) -> np.ndarray:
    """The float logits on every evidence row: val, then the val views image-major."""
    parts = [qins.val_reference_logits]
    if qins.evidence_views:
        parts.append(qins.evidence_reference_logits)
    return np.concatenate(parts)


def _by_image(rows: np.ndarray, qins: QuantInputs) -> np.ndarray:
    """Evidence rows (val, then the views image-major) as (val images, 1 + views)."""
    n, k = len(qins.val_y), qins.evidence_views
    return np.column_stack([rows[:n], rows[n:].reshape(n, k)]) if k else rows[:n, None]


def _agreement(logits: np.ndarray, qins: QuantInputs) -> np.ndarray:
    return _by_image(logits.argmax(1) == evidence_reference(qins).argmax(1), qins)


# Strata of the float model's margin (top-1 minus top-2 probability). Augmented views have lower
# margins than the clean images a device sees, so they flip more often: the agreement is estimated
# per stratum on every row, then weighted by the clean val images' strata (post-stratification), so
# that the views sharpen the estimate without biasing it towards harder images.
MARGIN_EDGES = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])


def _strata(qins: QuantInputs) -> np.ndarray:
    margin = parity.float_margin(evidence_reference(qins))
    return _by_image(np.searchsorted(MARGIN_EDGES, margin, side="right") - 1, qins)


def stratified(agree: np.ndarray, strata: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Agreement estimated for clean images: per margin stratum over all rows, weighted by the clean
    (column 0) images' strata. `idx` (resamples x images) gives one estimate per resample of images."""
    b = len(MARGIN_EDGES)
    hits = np.stack([(agree & (strata == s)).sum(1) for s in range(b)], 1).astype(np.float64)  # (images, strata)
    rows = np.stack([(strata == s).sum(1) for s in range(b)], 1).astype(np.float64)
    clean = np.eye(b)[strata[:, 0]]
    idx = np.arange(len(agree))[None] if idx is None else idx
    out = []
    for c in range(0, len(idx), 64):  # resamples in chunks: memory stays (64 x images x strata)
        part = idx[c:c + 64]
        h, r, w = hits[part].sum(1), rows[part].sum(1), clean[part].sum(1)
        rate = np.divide(h, r, out=np.zeros_like(h), where=r > 0)
        out.append((w * rate).sum(1) / w.sum(1))
    return np.concatenate(out)


def _interval(agree: np.ndarray, strata: np.ndarray, seed: int, n_boot: int = 2000) -> list[float]:
    """95 % interval of the estimate, resampling val images (rows of one image are not independent)."""
    idx = np.random.default_rng(seed).integers(0, len(agree), size=(n_boot, len(agree)))
    boot = stratified(agree, strata, idx)
    return [round(float(np.percentile(boot, 2.5)), 5), round(float(np.percentile(boot, 97.5)), 5)]


def compare(new: np.ndarray, old: np.ndarray) -> dict:
    """Paired evidence that `new` agrees with the float model more often than `old`: val images whose
    views favour one of the two, and the one-sided sign test's p-value."""
    diff = new.sum(1).astype(np.int64) - old.sum(1).astype(np.int64)
    better, worse = int((diff > 0).sum()), int((diff < 0).sum())
    return {"images_better": better, "images_worse": worse, "p_value": parity.sign_test_p(better, worse)}


def projected_agreement(logits: np.ndarray, qins: QuantInputs, strata: np.ndarray, noise_cut: float) -> float:
    """Agreement (estimated as for a candidate) if the model's logit error were cut by `noise_cut`
    (0.5: halved): an optimistic reach for the next candidate, read from this one's evidence."""
    reference = evidence_reference(qins)
    shrunk = reference + (1.0 - noise_cut) * (logits - reference)
    return float(stratified(_by_image(shrunk.argmax(1) == reference.argmax(1), qins), strata)[0])


def run(backend, profile, fp32: Artifact, qins: QuantInputs, refine_inputs, *, tolerances: dict,
        target_agreement: float, candidates: list[str], make_runner: Callable, classes: list[str], seed: int,
        work: Path, progress: Progress = NullProgress()) -> Choice:
    """Walk `candidates`; see the module docstring."""
    from .refine import refiners

    known = refiners()
    built: dict[tuple[str, ...], Artifact] = {}
    attempts: list[dict] = []
    int8: _Scored | None = None  # the current fully-INT8 choice
    mixed: _Scored | None = None  # the current choice among those that keep convolutions in float
    noise_cut = profile.quantization.escalate_noise_cut
    strata = _strata(qins)  # the float model's margins: the same for every candidate

    def build(steps: tuple[str, ...]) -> Artifact:
        if steps in built:
            return built[steps]
        *head, last = steps
        if not head:
            art = (backend.quantizers[last](fp32, qins, profile, work) if last in backend.quantizers
                   else known[last](fp32, refine_inputs, backend, profile, work))
        else:
            art = known[last](build(tuple(head)), refine_inputs, backend, profile, work)
        built[steps] = art
        return art

    for k, cand in enumerate(candidates):
        current = int8 or mixed
        if int8 is not None and not int8.missed:
            break  # the first fully-INT8 choice that meets the search target
        if int8 is not None and not int8.broken:  # a later candidate must beat it significantly to ship
            imperfect = int((~int8.agree).any(1).sum())  # val images where the choice misses a row
            if parity.sign_test_p(imperfect, 0) >= ALPHA:
                for rest in candidates[k:]:
                    attempts.append({"quantizer": rest, "skipped": (
                        f"{int8.name} disagrees with the float model on {imperfect} of {len(int8.agree)} val "
                        f"images: a later candidate agreeing everywhere would reach p = "
                        f"{parity.sign_test_p(imperfect, 0):.3g} >= {ALPHA:g}, so none could replace it")})
                break
        if current is not None and not current.broken:  # a broken model (under the agreement floor) says nothing
            reach = projected_agreement(current.logits, qins, strata, noise_cut)
            if reach < target_agreement:
                for rest in candidates[k:]:
                    attempts.append({"quantizer": rest, "skipped": (
                        f"{current.name} agrees {stratified(current.agree, strata)[0]:.4f} on the evidence; "
                        f"with its logit error cut "
                        f"by {noise_cut:g} it would agree {reach:.4f} < {target_agreement:g}: no later candidate "
                        "can plausibly reach the search target (quantization.escalate_noise_cut)")})
                break
        scored = _score(cand, build, backend, profile, qins, strata, make_runner, classes, seed, tolerances,
                        target_agreement, progress, attempts)
        if scored is None:
            continue
        attempts.append(scored.attempt)
        old = int8 if scored.int8 else mixed
        if old is None:
            scored.attempt["decision"] = ("chosen (first that built)" if current is None else
                                          "chosen" if scored.int8 else
                                          "the mixed-precision candidate (ships only if it meets the target and "
                                          "beats the fully-INT8 choice, or that one is broken)")
        elif old.broken and not scored.broken:  # the gate would refuse the old one anyway
            scored.attempt["decision"] = f"replaces {old.name} (under the agreement floor: broken, not noisy)"
        else:
            test = compare(scored.agree, old.agree)
            scored.attempt["versus"] = {"candidate": old.name, **test}
            if test["p_value"] >= ALPHA:
                scored.attempt["decision"] = f"kept {old.name}: not significantly better (p = {test['p_value']:.3g})"
                continue
            scored.attempt["decision"] = f"replaces {old.name} (p = {test['p_value']:.3g})"
        if scored.int8:
            int8 = scored
        else:
            mixed = scored
    if int8 is None and mixed is None:
        raise EdgetlError(f"target '{profile.name}': every quantization candidate failed: "
                          + "; ".join(f"{a['quantizer']}: {a['error']}" for a in attempts if "error" in a))
    chosen = int8 or mixed
    if int8 is not None and int8.broken and mixed is not None and not mixed.broken:
        chosen = mixed  # the gate would refuse the fully-INT8 choice anyway
    elif int8 is not None and int8.missed and mixed is not None and not mixed.missed:
        test = compare(mixed.agree, int8.agree)
        if test["p_value"] < ALPHA:  # mixed precision: met, nothing fully INT8 did, and clearly better
            chosen = mixed
    return Choice(replace(chosen.artifact, meta={**chosen.artifact.meta, "candidate": chosen.name}),
                  chosen.gate_missed, chosen.float_nodes, attempts)


def _score(cand: str, build: Callable, backend, profile, qins: QuantInputs, strata: np.ndarray, make_runner: Callable,
           classes: list[str], seed: int, tolerances: dict, target_agreement: float, progress: Progress,
           attempts: list[dict]) -> _Scored | None:
    """Build and run one candidate on the evidence; a failure is recorded in `attempts` (None)."""
    progress.stage(f"{profile.name}: quantize ({cand})")
    t0 = time.perf_counter()
    try:
        made = build(tuple(steps_of(cand)))
        art = replace(made, meta={**made.meta, "candidate": cand})
        runner = make_runner(art)
        parts = [parity.logits_of(runner, qins.val_x, progress=progress, description=f"{cand} (val)")]
        if qins.evidence_views:
            parts.append(parity.logits_of(runner, qins.evidence_x, progress=progress,
                                          description=f"{cand} (val views)"))
        logits = np.concatenate(parts)
        float_nodes = backend.float_nodes(art)
        # A float classifier head (one small Gemm) costs no measurable speed; a float convolution does.
        compute_float = backend.float_nodes(art, convolutions_only=True)
    except UsageError:
        raise
    except Exception as e:  # a candidate that fails to build or to run is recorded; the next one goes on
        message = str(e) if isinstance(e, EdgetlError) else f"{type(e).__name__}: {e}"
        log.warning("candidate %s failed: %s", cand, message)
        log.debug("candidate %s failed", cand, exc_info=True)
        attempts.append({"quantizer": cand, "error": message, "seconds": round(time.perf_counter() - t0, 2),
                         **({"dropped_by_time_limit": True} if isinstance(e, BudgetExceeded) else {})})
        return None
    n = len(qins.val_y)
    rep = parity.evaluate(qins.val_reference_logits, logits[:n], qins.val_y, classes, seed=seed, split="val")
    agree = _agreement(logits, qins)
    rate = float(stratified(agree, strata)[0])
    drop_only = dict(max_accuracy_drop_pp=tolerances["max_accuracy_drop_pp"], min_top1_agreement=0.0,
                     drop_by_ci=True)
    gate_missed = parity.misses(rep, **drop_only)
    missed = list(gate_missed)
    if rate < tolerances["min_top1_agreement"] - 1e-9:
        gate_missed.append(f"top-1 agreement {rate:.4f} < {tolerances['min_top1_agreement']:g} "
                           f"({agree.size} val images and views)")
    if rate < target_agreement - 1e-9:
        missed.append(f"top-1 agreement {rate:.4f} < {target_agreement:g} ({agree.size} val images and views)")
    attempt = {"quantizer": cand, "val_accuracy_drop_pp": rep.accuracy_drop_pp,
               "val_top1_agreement": rep.top1_agreement,
               "evidence": {"images": int(agree.shape[0]), "views_per_image": int(agree.shape[1]),
                            "comparisons": int(agree.size), "top1_agreement": round(rate, 5),
                            "agreement_ci95": _interval(agree, strata, seed),
                            "raw_agreement": round(float(agree.mean()), 5),
                            "by_margin": parity.agreement_by_margin(evidence_reference(qins), _rows(agree))},
               "val_misses": missed, "float_nodes": len(float_nodes), "float_convolutions": len(compute_float),
               "seconds": round(time.perf_counter() - t0, 2)}
    from .refine import refiners

    for refiner in refiners().values():  # what the refiners chose (on train + val), for the report
        key = getattr(refiner, "record_key", None)
        if key and key in art.meta:
            attempt[key] = {k: v for k, v in art.meta[key].items() if k != "path"}
    # broken: the gate would refuse it on val already (agreement floor, or a drop shown above tolerance)
    return _Scored(cand, art, agree, logits, gate_missed, missed, float_nodes, not compute_float, attempt,
                   bool(gate_missed))


def _rows(agree: np.ndarray) -> np.ndarray:
    """The agreement matrix back in evidence-row order: val first, then the views image-major."""
    return np.concatenate([agree[:, 0], agree[:, 1:].reshape(-1)])

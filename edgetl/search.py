"""The INT8 search: walk the profile's candidates in order, each judged on train + val evidence.

A candidate is a chain `step[+step...]`: the first step is a quantizer of the backend (fp32 ONNX
in, INT8 model out) or a refiner (edgetl/refine/) applied to the float model; every later step is a
refiner applied to the model before it. "nncf_ptq+head_refit" is NNCF PTQ, then the head refit;
models built by a chain's prefix are reused by the next candidate. The search does not know what
a step does: every one is "model in, model out"; a step marked `expensive = True` (QAT, mixed
precision) makes its candidate expensive.

Evidence. Agreement with the float model needs no labels, so a candidate is judged on the val
images *and* seeded augmented views of them (`QuantInputs.evidence_x`, thousands of comparisons
where val alone has ~100). Views have lower float margins than clean images and flip more often,
so the agreement is estimated per margin stratum over every row and weighted by the clean val
images' strata (post-stratification); the clear-image agreement is the same estimate over the
strata whose float margin is >= parity.MARGIN (the flips a user notices: images the float model is
sure of). The accuracy drop, which needs labels, is judged on val by the gate's own rule.

The rule (edgetl/choice.py, a pure function of the scores; deterministic, nothing reads a clock):
a candidate is *feasible* when it passes the gate's rule on val (drop rule, agreement floor) and
meets the search target (search_top1_agreement, and search_clear_agreement on clear images). The
first feasible fully-INT8 candidate ships (effort "max": the feasible one with the best agreement);
else a feasible mixed-precision one; else the fully-INT8 candidate that passes the gate on val with
the best agreement (ties within a quarter point: the lower logit MSE to the float model, then the
cheaper), with the warning "search target not met". What runs is `quantize.effort`: "low" the
first candidate only; "default" in order until a fully-INT8 one is feasible, an expensive one only
while the best so far misses the gate on val or the clear-image target; "max" all of them. Every
attempt records its evidence and its decision. The search never receives the test split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import choice, parity, space
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


@dataclass
class Choice:
    artifact: Artifact
    val_missed: list[str]  # the chosen model's misses of the gate's rule on val (non-empty: budget spent)
    float_nodes: list[str]
    attempts: list[dict]
    warnings: list[str] = field(default_factory=list)  # e.g. "search target not met: ..." (to the manifest)


@dataclass
class _Scored:
    """A candidate that built and ran, with its evidence."""

    artifact: Artifact
    scores: choice.Scores
    gate_missed: list[str]
    float_nodes: list[str]
    attempt: dict


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
# that the views sharpen the estimate without biasing it towards harder images. parity.MARGIN is an
# edge: the strata from it up are the clear images.
MARGIN_EDGES = np.unique(np.r_[0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, parity.MARGIN])
CLEAR = MARGIN_EDGES >= parity.MARGIN - 1e-12  # the strata of clear images


def _strata(qins: QuantInputs) -> np.ndarray:
    margin = parity.float_margin(evidence_reference(qins))
    return _by_image(np.searchsorted(MARGIN_EDGES, margin, side="right") - 1, qins)


def stratified(agree: np.ndarray, strata: np.ndarray, idx: np.ndarray | None = None,
               kept: np.ndarray | None = None) -> np.ndarray:
    """Agreement estimated for clean images: per margin stratum over all rows, weighted by the clean
    (column 0) images' strata; `kept` (bool per stratum) restricts it to some strata (CLEAR). `idx`
    (resamples x images) gives one estimate per resample of images; nan where no clean image counts."""
    b = len(MARGIN_EDGES)
    hits = np.stack([(agree & (strata == s)).sum(1) for s in range(b)], 1).astype(np.float64)  # (images, strata)
    rows = np.stack([(strata == s).sum(1) for s in range(b)], 1).astype(np.float64)
    clean = np.eye(b)[strata[:, 0]] * (1.0 if kept is None else kept)
    idx = np.arange(len(agree))[None] if idx is None else idx
    out = []
    for c in range(0, len(idx), 64):  # resamples in chunks: memory stays (64 x images x strata)
        part = idx[c:c + 64]
        h, r, w = hits[part].sum(1), rows[part].sum(1), clean[part].sum(1)
        rate = np.divide(h, r, out=np.zeros_like(h), where=r > 0)
        total = w.sum(1)
        out.append(np.divide((w * rate).sum(1), total, out=np.full_like(total, np.nan), where=total > 0))
    return np.concatenate(out)


def _interval(agree: np.ndarray, strata: np.ndarray, seed: int, n_boot: int = 2000) -> list[float]:
    """95 % interval of the estimate, resampling val images (rows of one image are not independent)."""
    idx = np.random.default_rng(seed).integers(0, len(agree), size=(n_boot, len(agree)))
    boot = stratified(agree, strata, idx)
    return [round(float(np.percentile(boot, 2.5)), 5), round(float(np.percentile(boot, 97.5)), 5)]


def expensive(cand: str, backend, known: dict) -> bool:
    """A candidate is expensive when one of its steps says so (`expensive = True`: QAT, mixed precision)."""
    return any(getattr(backend.quantizers.get(s) or known.get(s), "expensive", False) for s in steps_of(cand))


def run(backend, profile, fp32: Artifact, qins: QuantInputs, refine_inputs, *, tolerances: dict,
        target_agreement: float, candidates: list[str], make_runner: Callable, classes: list[str], seed: int,
        work: Path, effort: str = "default", rule: str = "auto", clear_target: float | None = None,
        progress: Progress = NullProgress()) -> Choice:
    """Walk `candidates` as quantize.effort says, ship what edgetl/choice.py picks; see the module docstring."""
    from .refine import refiners

    known = refiners()
    built: dict[tuple[str, ...], Artifact] = {}
    strata = _strata(qins)  # the float model's margins: the same for every candidate
    clear = profile.tolerances.search_clear_agreement if clear_target is None else clear_target
    judge = _Judge(qins, strata, tolerances, target_agreement, clear, rule, classes, seed)
    scored: dict[int, _Scored] = {}
    failed: dict[int, dict] = {}

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

    def score(k: int) -> choice.Scores | str:
        result = _score(candidates[k], build, backend, profile, qins, make_runner, judge, progress)
        if isinstance(result, dict):
            failed[k] = result
            return result["error"]
        scored[k] = result
        return result.scores

    cands = [choice.Candidate(c, expensive(c, backend, known)) for c in candidates]
    out = choice.decide(cands, effort, score)
    attempts = []
    for k, (cand, decision) in enumerate(zip(cands, out.decisions, strict=True)):
        attempt = scored[k].attempt if k in scored else failed.get(k, {"quantizer": cand.name})
        attempts.append({**attempt, **({"expensive": True} if cand.expensive else {}), "decision": decision})
    if out.chosen is None:
        raise EdgetlError(f"target '{profile.name}': every quantization candidate failed: "
                          + "; ".join(f"{a['quantizer']}: {a['error']}" for a in attempts if "error" in a))
    chosen = scored[out.chosen]
    for w in out.warnings:
        log.warning("%s: %s", profile.name, w)
    return Choice(replace(chosen.artifact, meta={**chosen.artifact.meta, "candidate": candidates[out.chosen]}),
                  chosen.gate_missed, chosen.float_nodes, attempts, out.warnings)


OUT_OF_MEMORY = ("bad_alloc", "Cannot allocate memory", "out of memory")  # a native library's words for it


def _candidate_error(e: BaseException) -> bool:
    """What a candidate may legitimately raise: edgetl's typed errors (BudgetExceeded among them) and
    the runtimes' and quantizers' failures (onnxruntime's pybind errors, OpenVINO's *Failure, NNCF's
    errors, RuntimeError / ValueError). Anything else (AttributeError, TypeError, KeyError...) is a
    bug: it propagates as an internal error instead of quietly shipping another candidate."""
    if isinstance(e, UsageError):
        return False  # the user's to fix: the build stops
    if isinstance(e, (MemoryError, NotImplementedError, RecursionError)) or space.is_disk_full(e) or any(
            word in str(e) for word in OUT_OF_MEMORY):
        return False  # the machine's state or a bug, not the candidate's: what ships must not depend on it
    if isinstance(e, (EdgetlError, RuntimeError, ValueError)):
        return True
    return type(e).__module__.split(".")[0] in ("onnxruntime", "openvino", "nncf", "onnx")


@dataclass
class _Judge:
    """What every candidate is judged against on val: the gate's rule, the search target."""

    qins: QuantInputs
    strata: np.ndarray
    tolerances: dict
    target: float
    clear_target: float
    rule: str
    classes: list[str]
    seed: int

    def scores(self, cand: str, logits: np.ndarray, int8: bool) -> tuple[choice.Scores, list[str], dict]:
        """(the rule's view of the candidate, its misses of the gate's rule on val, its evidence record)."""
        qins, tol, strata = self.qins, self.tolerances, self.strata
        n = len(qins.val_y)
        rep = parity.evaluate(qins.val_reference_logits, logits[:n], qins.val_y, self.classes, seed=self.seed,
                              split="val", tolerance_pp=tol["max_accuracy_drop_pp"])
        rule = parity.resolve_rule(self.rule, n, tol["max_accuracy_drop_pp"])
        gate_missed, _ = parity.gate_misses(rep, max_accuracy_drop_pp=tol["max_accuracy_drop_pp"],
                                            min_top1_agreement=0.0, rule=rule)
        agree = _agreement(logits, qins)
        rate = float(stratified(agree, strata)[0])
        clear = float(stratified(agree, strata, kept=CLEAR)[0])
        clear = None if np.isnan(clear) else clear
        rows = f"({agree.size} val images and views)"
        if rate < tol["min_top1_agreement"] - 1e-9:
            gate_missed.append(f"top-1 agreement {rate:.4f} < {tol['min_top1_agreement']:g} {rows}")
        missed = []
        if rate < self.target - 1e-9:
            missed.append(f"top-1 agreement {rate:.4f} < {self.target:g} {rows}")
        clear_missed = clear is not None and clear < self.clear_target - 1e-9
        if clear_missed:
            missed.append(f"clear-image agreement {clear:.4f} < {self.clear_target:g} (float margin >= "
                          f"{parity.MARGIN:g})")
        reference = evidence_reference(qins)
        mse = float(((logits.astype(np.float64) - reference) ** 2).mean())
        s = choice.Scores(cand, rate, mse, int8, tuple(gate_missed), tuple(missed), clear, clear_missed)
        record = {"val_accuracy_drop_pp": rep.accuracy_drop_pp, "val_top1_agreement": rep.top1_agreement,
                  "val_gate_rule": rule,
                  "evidence": {"images": int(agree.shape[0]), "views_per_image": int(agree.shape[1]),
                               "comparisons": int(agree.size), "top1_agreement": round(rate, 5),
                               "agreement_ci95": _interval(agree, strata, self.seed),
                               "clear_agreement": None if clear is None else round(clear, 5),
                               "logit_mse": round(mse, 6), "raw_agreement": round(float(agree.mean()), 5),
                               "by_margin": parity.agreement_by_margin(reference, _rows(agree))},
                  "val_misses": [*gate_missed, *missed], "feasible": s.feasible}
        return s, gate_missed, record


def _score(cand: str, build: Callable, backend, profile, qins: QuantInputs, make_runner: Callable, judge: _Judge,
           progress: Progress) -> _Scored | dict:
    """Build and run one candidate on the evidence; a candidate's own failure is its attempt record
    (a dict with its error), anything else propagates (see _candidate_error)."""
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
    except Exception as e:
        if not _candidate_error(e):
            raise
        message = str(e) if isinstance(e, EdgetlError) else f"{type(e).__name__}: {e}"
        log.warning("candidate %s failed: %s", cand, message)
        log.debug("candidate %s failed", cand, exc_info=True)
        return {"quantizer": cand, "error": message, "seconds": round(time.perf_counter() - t0, 2),
                **({"dropped_by_time_limit": True} if isinstance(e, BudgetExceeded) else {})}
    scores, gate_missed, record = judge.scores(cand, logits, not compute_float)
    attempt = {"quantizer": cand, **record, "float_nodes": len(float_nodes), "float_convolutions": len(compute_float),
               "seconds": round(time.perf_counter() - t0, 2)}
    from .refine import refiners

    for refiner in refiners().values():  # what the refiners chose (on train + val), for the report
        key = getattr(refiner, "record_key", None)
        if key and key in art.meta:
            attempt[key] = {k: v for k, v in art.meta[key].items() if k != "path"}
    return _Scored(art, scores, gate_missed, float_nodes, attempt)


def _rows(agree: np.ndarray) -> np.ndarray:
    """The agreement matrix back in evidence-row order: val first, then the views image-major."""
    return np.concatenate([agree[:, 0], agree[:, 1:].reshape(-1)])

"""The INT8 search's rule as a pure function: which candidates run, and which one ships.

edgetl/search.py builds and scores candidates on the val evidence; this module only decides, from
per-candidate `Scores`, so every branch of the rule is testable without a model (docs/search.md).

- *Feasible*: passes the gate's own rule on val (its accuracy-drop rule and agreement floor; a
  candidate that misses it is *broken*: the gate would refuse it) and meets the search target
  (post-stratified agreement >= search_top1_agreement, and agreement on clear images — float
  margin >= parity.MARGIN — >= search_clear_agreement).
- Ships: the first feasible fully-INT8 candidate (effort "max": the feasible fully-INT8 one with the
  best agreement); else a feasible one that keeps convolutions in float (mixed precision); else the
  fully-INT8 candidate that is not broken with the best agreement, with the warning "search target
  not met" (then, only when every fully-INT8 candidate is broken, the best one that is not).
  "Best agreement": within TIE of the highest, the lowest logit MSE to the float model, then the
  earliest (cheapest).
- Runs (quantize.effort): "low" the first candidate that builds; "default" candidates in order until a
  fully-INT8 one is feasible, an expensive one (QAT, mixed precision: `expensive = True` on its
  quantizer or refiner) only while no fully-INT8 candidate passes the gate on val, or the best
  fully-INT8 one misses the clear-image target;
  "max" every candidate.
Nothing here reads a clock: the same scores give the same choice on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

EFFORTS = ("low", "default", "max")
TIE = 0.0025  # agreements within a quarter point are a tie: the logit error decides


@dataclass(frozen=True)
class Candidate:
    name: str
    expensive: bool = False  # minutes of work (QAT, mixed precision): runs only where it can pay


@dataclass(frozen=True)
class Scores:
    """One candidate's evidence on val, as the rule reads it."""

    name: str
    agreement: float  # post-stratified agreement with the float model on the val evidence
    logit_mse: float  # mean squared logit error to the float model on the same rows (the tie-break)
    int8: bool = True  # no convolution left in float
    gate_missed: tuple[str, ...] = ()  # the gate's rule on val (drop rule, agreement floor): broken
    target_missed: tuple[str, ...] = ()  # the search target (agreement, clear-image agreement)
    clear_agreement: float | None = None  # on clear images (None: val has none)
    clear_missed: bool = False  # the clear-image target is among target_missed

    @property
    def broken(self) -> bool:
        return bool(self.gate_missed)

    @property
    def feasible(self) -> bool:
        return not self.gate_missed and not self.target_missed

    def why_not(self) -> str:
        return "; ".join((*self.gate_missed, *self.target_missed))


@dataclass
class Outcome:
    chosen: int | None  # index into the candidates; None: none built
    decisions: list[str]  # one per candidate: "chosen: ...", "feasible; ...", "not feasible: ...", "skipped: ..."
    warnings: list[str]


def best(done: dict[int, Scores], ks: list[int]) -> int:
    """The highest agreement; within TIE of it, the lowest logit MSE, then the earliest."""
    top = max(done[k].agreement for k in ks)
    return min((k for k in ks if done[k].agreement >= top - TIE - 1e-12), key=lambda k: (done[k].logit_mse, k))


def pick(done: dict[int, Scores], effort: str) -> tuple[int | None, str, list[str]]:
    """(the candidate that ships, why, warnings) among those scored."""
    order = sorted(done)
    int8 = [k for k in order if done[k].int8]
    mixed = [k for k in order if not done[k].int8]
    for pool, what in ((int8, "fully-INT8"), (mixed, "mixed-precision")):
        feasible = [k for k in pool if done[k].feasible]
        if not feasible:
            continue
        if effort == "max":
            return best(done, feasible), f"the feasible {what} candidate with the best agreement", []
        why = "the first feasible fully-INT8 candidate" if pool is int8 else \
            "feasible, keeps convolutions in float, and no fully-INT8 candidate is feasible"
        return feasible[0], why, []
    for pool, what in ((int8, "fully-INT8"), (mixed, "mixed-precision")):
        ok = [k for k in pool if not done[k].broken]
        if ok:
            k = best(done, ok)
            return k, f"no candidate is feasible: the {what} candidate with the best agreement that passes the " \
                      "gate on val", [_not_met(done[k], f"no candidate met it on val; {done[k].name} ships as the "
                                                         f"{what} candidate with the best agreement")]
    if not order:
        return None, "", []
    k = best(done, int8 or mixed)
    return k, "every candidate misses the gate on val: the one with the best agreement", \
        [_not_met(done[k], "every candidate misses the gate on val")]


def _not_met(s: Scores, how: str) -> str:
    clear = "" if s.clear_agreement is None else f", clear images {s.clear_agreement:.4f}"
    return f"search target not met: {how} (val evidence agreement {s.agreement:.4f}{clear}; {s.why_not()})"


def skip_reason(k: int, cand: Candidate, done: dict[int, Scores], effort: str) -> str | None:
    """Why candidate k is not run (None: run it), from what ran before it."""
    if effort == "max":
        return None
    if effort == "low":  # the first candidate that builds (a failed one is no choice)
        return "skipped: quantize.effort 'low' builds the first candidate only" if done else None
    first = next((done[j] for j in sorted(done) if done[j].int8 and done[j].feasible), None)
    if first is not None:
        return f"skipped: {first.name} is feasible (effort 'default' stops at the first feasible fully-INT8 candidate)"
    if not cand.expensive or not done:
        return None
    int8 = [j for j in sorted(done) if done[j].int8 and not done[j].broken]
    if not int8:  # nothing fully INT8 the gate would take: a mixed-precision model is no reason to stop
        return None
    s = done[best(done, int8)]
    if s.clear_missed:
        return None
    clear = "no clear val images" if s.clear_agreement is None else f"clear-image agreement {s.clear_agreement:.4f}"
    return (f"skipped: expensive, and the best so far, {s.name}, passes the gate on val and meets the clear-image "
            f"target ({clear}); effort 'default' runs expensive candidates only when the best so far misses "
            "either (effort 'max' runs every candidate)")


def decide(candidates: list[Candidate], effort: str, score: Callable[[int], Scores | str]) -> Outcome:
    """Walk the candidates in order: skip (skip_reason) or score each — `score(k)` builds and runs
    candidate k: its Scores, or the reason it failed — then pick what ships."""
    if effort not in EFFORTS:
        raise ValueError(f"effort {effort!r} is not one of {EFFORTS}")
    done: dict[int, Scores] = {}
    decisions: list[str] = []
    for k, cand in enumerate(candidates):
        why = skip_reason(k, cand, done, effort)
        if why is None:
            s = score(k)
            if isinstance(s, Scores):
                done[k] = s
            else:
                why = f"failed: {s}"
        decisions.append(why or "")
    chosen, how, warnings = pick(done, effort)
    for k, s in done.items():
        if k == chosen:
            decisions[k] = f"chosen: {how}" + ("" if s.feasible else f" ({s.why_not()})")
        elif s.feasible:
            decisions[k] = f"feasible; not chosen: {done[chosen].name} ships ({how})"
        else:
            decisions[k] = f"not feasible: {s.why_not()}"
    return Outcome(chosen, decisions, warnings)

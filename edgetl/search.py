"""The INT8 search: walk the profile's candidates in order, each judged on the validation split.

A candidate is a chain `step[+step...]`: the first step is a quantizer of the backend (fp32 ONNX
in, INT8 model out) or a refiner (edgetl/refine/) applied to the float model; every later step is a
refiner applied to the model before it. "nncf_ptq+head_refit" is NNCF PTQ, then the head refit;
models built by a chain's prefix are reused by the next candidate. The search does not know what
a step does: every one is "model in, model out, judged on val".

The first fully-INT8 candidate that meets the search target is taken. A candidate that keeps
compute layers in float (mixed precision) is taken only when no fully-INT8 candidate meets it.
When none meets it, the best attempt goes to the gate. The search never receives the test split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import backends, parity
from .artifact import Artifact
from .errors import EdgetlError, UsageError
from .progress import NullProgress, Progress

log = logging.getLogger(__name__)


def steps_of(candidate: str) -> list[str]:
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
    val_missed: list[str]  # the chosen model's misses of the gate tolerances on val (non-empty: budget spent)
    float_nodes: list[str]
    attempts: list[dict]


def run(backend, profile, fp32: Artifact, qins: backends.QuantInputs, refine_inputs, *, tolerances: dict,
        target_agreement: float, candidates: list[str], make_runner: Callable, classes: list[str], seed: int,
        work: Path, progress: Progress = NullProgress()) -> Choice:
    """Walk `candidates`; see the module docstring."""
    from .refine import refiners

    known = refiners()
    built: dict[tuple[str, ...], Artifact] = {}
    attempts: list[dict] = []
    best_int8 = best_any = None

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

    for cand in candidates:
        steps = tuple(steps_of(cand))
        progress.stage(f"{profile.name}: quantize ({cand})")
        t0 = time.perf_counter()
        try:
            made = build(steps)
            art = replace(made, meta={**made.meta, "candidate": cand})
            runner = make_runner(art)
            val_logits = parity.logits_of(runner, qins.val_x, progress=progress, description=f"{cand} (val)")
            float_nodes = backend.float_nodes(art)
            # A float classifier head (one small Gemm) costs no measurable speed; a float convolution does.
            compute_float = backend.float_nodes(art, convolutions_only=True)
        except UsageError:
            raise
        except Exception as e:  # a candidate that fails to build or to run is recorded; the next one goes on
            message = str(e) if isinstance(e, EdgetlError) else f"{type(e).__name__}: {e}"
            log.warning("candidate %s failed: %s", cand, message)
            log.debug("candidate %s failed", cand, exc_info=True)
            attempts.append({"quantizer": cand, "error": message, "seconds": round(time.perf_counter() - t0, 2)})
            continue
        rep = parity.evaluate(qins.val_reference_logits, val_logits, qins.val_y, classes, seed=seed, split="val")
        gate_missed = parity.misses(rep, **tolerances, drop_by_ci=True)
        missed = parity.misses(rep, max_accuracy_drop_pp=tolerances["max_accuracy_drop_pp"],
                               min_top1_agreement=target_agreement, drop_by_ci=True)
        attempt = {"quantizer": cand, "val_accuracy_drop_pp": rep.accuracy_drop_pp,
                   "val_top1_agreement": rep.top1_agreement, "val_misses": missed,
                   "float_nodes": len(float_nodes), "float_convolutions": len(compute_float),
                   "seconds": round(time.perf_counter() - t0, 2)}
        for step in ("qat", "refit"):  # what the refiners chose (on train + val), for the report
            if step in art.meta:
                attempt[step] = {k: v for k, v in art.meta[step].items() if k != "path"}
        attempts.append(attempt)
        key = (not gate_missed, not missed, not compute_float, rep.top1_agreement, -rep.accuracy_drop_pp)
        entry = (key, art, gate_missed, float_nodes)
        if best_any is None or key > best_any[0]:
            best_any = entry
        if not compute_float and (best_int8 is None or key > best_int8[0]):
            best_int8 = entry
        if not missed and not compute_float:
            break  # the first fully-INT8 candidate that meets the search
    if best_any is None:
        raise EdgetlError(f"target '{profile.name}': every quantization candidate failed: "
                          + "; ".join(f"{a['quantizer']}: {a['error']}" for a in attempts))
    met_int8 = best_int8 is not None and best_int8[0][1]
    chosen = best_int8 if met_int8 else best_any
    return Choice(chosen[1], chosen[2], chosen[3], attempts)


"""One target: make each of its models (the INT8 search, or a float conversion), gate each on the test
split (`gate`), then — alone on the machine — measure its speed against FP32 and write its bundle
(`finish`). A target that fails is a `TargetResult` with its error: it never stops the others."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    __version__,
    backends,
    bundle,
    bundle_contents,
    export,
    interrupt,
    model_input,
    parity,
    search,
    space,
    speed,
)
from .artifact import Artifact
from .errors import EdgetlError
from .evidence import GateEvidence, SearchEvidence
from .prepare import Prepared
from .profiles import TargetProfile
from .progress import Progress
from .provenance import Provenance
from .recipe import BuildRecipe
from .refine import refiners
from .results import ModelResult, QuantizationRecord, TargetResult, failed_target

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every target of a build is made from."""

    prepared: Prepared
    search: SearchEvidence
    gate: GateEvidence
    progress: Progress
    threads: int = 0  # engine threads of a target built beside others (--jobs); 0: all


@dataclass
class Model:
    """One model of a target (one precision), gated on the test split."""

    precision: str
    stem: str  # bundle file stem: "model" for the default model, "model.<precision>" for the others
    artifact: Artifact
    runner: object
    metrics: parity.ParityReport
    misses: list[str]
    quantization: QuantizationRecord | None
    sizes: dict
    warnings: list[str]
    validated_with: str  # what ran the gate (and where, when the bundle is for another architecture)
    model_input: str  # what it takes (model_input.py)
    latency_ms: float = 0.0
    speed: dict = field(default_factory=dict)  # batch_<n>: vs the FP32 model through the same runtime, interleaved
    certified: bool = False  # the test split certifies the drop tolerance (parity.certified)

    def result(self, files: list[str]) -> ModelResult:
        return ModelResult(self.precision, self.metrics, self.misses, self.quantization, self.sizes,
                           self.validated_with, files, self.latency_ms, self.speed, self.model_input, self.certified)


@dataclass
class Gated:
    """A target whose models are made and gated; its speed evidence and bundle come next."""

    profile: TargetProfile
    backend: object
    fp32: Artifact
    work: Path
    models: list[Model]

    @property
    def contract(self) -> dict:
        """What the target's models take (model_input.py): its bundle's preprocess.json."""
        return self.models[0].runner.contract


def tolerances(profile: TargetProfile, recipe: BuildRecipe) -> dict:
    """The gate's tolerances: the recipe's [gate] where set, else the profile's."""
    t, g = profile.tolerances, recipe.gate
    drop = t.max_accuracy_drop_pp if g.max_accuracy_drop_pp is None else g.max_accuracy_drop_pp
    return {"max_accuracy_drop_pp": drop,
            "min_top1_agreement": t.min_top1_agreement if g.min_top1_agreement is None else g.min_top1_agreement}


def gate(profile: TargetProfile, fp32: Artifact, ctx: Context, work: Path) -> Gated:
    """Every model of the target made and gated (the profile's precisions, default first)."""
    work.mkdir(parents=True, exist_ok=True)
    backend = backends.get(profile)
    tol = tolerances(profile, ctx.prepared.recipe)
    models = [make_model(precision, "model" if i == 0 else f"model.{precision}", backend, profile, fp32, tol, ctx,
                         work) for i, precision in enumerate(profile.precisions)]
    return Gated(profile, backend, fp32, work, models)


def search_int8(backend, profile: TargetProfile, fp32: Artifact, tol: dict, evidence: SearchEvidence,
                recipe: BuildRecipe, classes: list[str], contract: dict, work: Path, progress: Progress,
                threads: int = 0) -> search.Choice:
    """The INT8 search (edgetl/search.py) on the search's evidence: the test split is not among its
    inputs (neither the gate's evidence nor the dataset, whose items include the test files)."""
    target_agreement = max(tol["min_top1_agreement"], profile.tolerances.search_top1_agreement)
    qins = evidence.quant_inputs(tol["max_accuracy_drop_pp"], target_agreement, recipe.seed)
    rins = evidence.refine_inputs(qins, fp32)
    return search.run(backend, profile, fp32, qins, rins, tolerances=tol, target_agreement=target_agreement,
                      candidates=profile.quantization.quantizers, effort=recipe.quantize.level,
                      rule=recipe.gate.rule, classes=classes, seed=recipe.seed, work=work, progress=progress,
                      make_runner=lambda art: backends.runner(backend, art, contract, classes, profile,
                                                             threads=threads))


def make_model(precision: str, stem: str, backend, profile: TargetProfile, fp32: Artifact, tol: dict, ctx: Context,
               work: Path) -> Model:
    """One model of the target: the INT8 search or a float conversion, then its gate on the test split."""
    p, progress = ctx.prepared, ctx.progress
    recipe, ds, contract = p.recipe, p.dataset, p.contract
    quant, val_missed, search_warnings = None, [], []
    if precision == "int8":
        choice = search_int8(backend, profile, fp32, tol, ctx.search, recipe, ds.classes, contract, work, progress,
                             ctx.threads)
        art, val_missed, search_warnings = choice.artifact, choice.val_missed, choice.warnings
        records = {key: art.meta[key] for r in refiners().values()
                   if (key := getattr(r, "record_key", None)) and key in art.meta}
        quant = QuantizationRecord(art.meta.get("candidate", art.meta.get("quantizer")), choice.attempts,
                                   choice.float_nodes, tol, "validation split; gate on test split", records)
    else:
        progress.stage(f"{profile.name}: convert ({precision})")
        art = backend.convert(fp32, precision, profile, work)
        # A float conversion must agree with the float model almost everywhere.
        tol = {**tol, "min_top1_agreement": profile.tolerances.float_min_top1_agreement}
    if profile.model_input == model_input.RAW:  # what ships takes pixels: the gate judges that model
        art = backend.with_raw_input(art, contract, work, stem)
    contract = model_input.contract_for(profile.model_input, contract)
    # The gate: the test split is looked at here for the first time, once, with the chosen model.
    g = ctx.gate
    progress.stage(f"{profile.name}: parity gate ({precision})")
    runner = backends.runner(backend, art, contract, ds.classes, profile, threads=ctx.threads)
    test_logits = parity.logits_of(runner, model_input.view(g.x, contract), progress=progress,
                                   description=f"parity (test, {precision})")
    report = parity.evaluate(g.reference, test_logits, g.y, ds.classes, seed=recipe.seed,
                             tolerance_pp=tol["max_accuracy_drop_pp"], min_judged=recipe.data.min_judged_images)
    rule = parity.resolve_rule(recipe.gate.rule, report.n_test, tol["max_accuracy_drop_pp"])
    missed, gate_warnings = parity.gate_misses(report, **tol, rule=rule,
                                               require_certified=recipe.gate.require_certified)
    for w in gate_warnings:
        log.warning("%s (%s): %s", profile.name, precision, w)
    if val_missed:
        missed = [f"quantization budget spent: every candidate the search ran missed the gate on the validation split "
                  f"({'; '.join(val_missed)})"] + missed
    sizes = {"fp32_onnx_bytes": fp32.size, "model_bytes": art.size, "ratio": round(art.size / fp32.size, 4)}
    certified = parity.certified(report, tol["max_accuracy_drop_pp"])
    report.gate_rule = {"asked": recipe.gate.rule, "applied": rule, "certified": certified,
                        "required": recipe.gate.require_certified, "tolerance_pp": tol["max_accuracy_drop_pp"]}
    report.agreement_by_margin = parity.agreement_by_margin(g.reference,
                                                            g.reference.argmax(1) == test_logits.argmax(1))
    report.export_max_abs_diff = fp32.meta.get("max_abs_diff")
    for item in report.changed:
        item["file"] = g.files[item["index"]]
    return Model(precision, stem, art, runner, report, [f"{precision}: {m}" for m in missed], quant,
                 sizes, [*report.warnings, *gate_warnings, *search_warnings], validated_with(runner, profile),
                 profile.model_input, certified=certified)


def validated_with(runner, profile: TargetProfile) -> str:
    """What ran the gate; for a bundle made for another CPU architecture, also where it ran."""
    here = platform.machine().lower()
    if not profile.arch or profile.arch == here:
        return runner.executed_by
    return (f"{runner.executed_by} on {here} (the bundle is for {profile.arch}: INT8 kernels differ between "
            "architectures; run its self-test there)")


def finish(g: Gated, ctx: Context, out: Path, provenance: Provenance, golden: list) -> TargetResult:
    """Speed evidence (alone on the machine), then the bundle when every model passed."""
    p, progress = ctx.prepared, ctx.progress
    ds, contract = p.dataset, p.contract
    profile, backend, models = g.profile, g.backend, g.models
    baseline = backends.runner(backend, backend.convert(g.fp32, "fp32", profile, g.work), contract, ds.classes,
                               profile, timing=True)
    for m in models:
        progress.stage(f"{profile.name}: speed vs FP32 ({m.precision})")
        runner = backends.runner(backend, m.artifact, g.contract, ds.classes, profile, timing=True)  # all the CPUs
        m.speed = speed.versus(runner, baseline, ctx.gate.x, batches=(1, profile.speed_batch))  # same pixels
        m.latency_ms = m.speed["batch_1"]["ms"]
    missed = [miss for m in models for miss in m.misses]
    result = TargetResult(profile.name, models=[m.result([]) for m in models], misses=missed)
    quant = result.quantization
    result.warnings = sorted({w for m in models for w in m.warnings}) + budget_warnings(quant)
    if missed:
        log.warning("target %s missed its gate: %s", profile.name, missed)
        return result
    final = out / profile.name
    stage = bundle.staging_dir(out, profile.name)
    try:
        files = bundle_contents.write(stage, profile=profile, backend=backend, models=models, prepared=p,
                                      contract=g.contract, golden=golden, common=provenance.to_dict(),
                                      quantization=quant.to_dict(), warnings=result.warnings)
        bundle.publish(stage, final)
    except BaseException:
        bundle.discard(stage)
        raise
    result.published, result.bundle = True, str(final)
    result.models = [m.result(files[m.precision]) for m in models]
    return result


def budget_warnings(quant: QuantizationRecord) -> list[str]:
    """A wall-clock limit that dropped a candidate makes the bundle depend on the machine's speed."""
    hit = [a["quantizer"] for a in quant.attempts if a.get("dropped_by_time_limit")]
    if not hit:
        return []
    return [f"a time limit dropped {', '.join(hit)} on this machine (quantization.qat_budget_s / "
            "mixed_precision_budget_s): this bundle depends on the build machine's speed, and a rebuild "
            "elsewhere may differ; fix: unset the limit for a reproducible bundle"]


def failed(profile: TargetProfile, e: Exception, needs: space.Needs | None = None) -> TargetResult:
    """A target that could not be built, with its error's message and exit code."""
    interrupt.check()  # an error a signal caused (a killed worker) ends the build as the interrupt it is
    if space.is_disk_full(e):
        e = space.explain(e, needs)
    log.warning("target %s could not be built: %s", profile.name, e)
    log.debug("target %s failed", profile.name, exc_info=True)
    code = e.exit_code if isinstance(e, EdgetlError) else EdgetlError.exit_code
    message = str(e) if isinstance(e, EdgetlError) else f"internal error: {type(e).__name__}: {e}"
    return failed_target(profile.name, message, code)


def stale_bundle_warning(folder: Path) -> list[str]:
    """A bundle from an earlier build left in place when this build's target failed: say so."""
    try:
        manifest = json.loads((folder / bundle.MANIFEST).read_text(encoding="utf-8"))
        made = manifest.get("created") or f"digest {str(manifest.get('digest', '?'))[:19]}"
    except (OSError, ValueError, AttributeError):
        return []
    return [f"{folder} holds an earlier build's bundle ({made}), not this build's; "
            "this build published nothing for the target"]


def export_checked(net, work: Path, profile: TargetProfile, p: Prepared, val_x) -> Artifact:
    """The fine-tuned model as FP32 ONNX at the profile's opset, checked against torch on val images."""
    art = export.to_onnx(net, work / f"model.fp32.opset{profile.opset}.onnx", contract=p.contract,
                         labels=p.dataset.classes, opset=profile.opset,
                         extra_metadata={"edgetl.backbone": p.spec.name, "edgetl.version": __version__})
    diff = export.check_against_torch(net, art, val_x[:16], profile.tolerances.export_atol)
    return Artifact(art.path, art.kind, art.sha256, {**art.meta, "max_abs_diff": diff})


def reference_row(fp32: Artifact, p: Prepared, g: GateEvidence) -> dict:
    """The float model's row of the parity table: the float reference's accuracy, FP32 ONNX size and latency on
    onnxruntime's CPU provider (the speed baseline), timed by speed.py's one loop."""
    from .runtime.engine_ort import Engine
    from .runtime.predict import Predictor

    ref_pred = g.reference.argmax(1)
    from .threads import engine

    runner = Predictor(Engine(fp32.path, {"providers": ["CPUExecutionProvider"], "threads": engine()}), p.contract,
                       p.dataset.classes)
    return {"accuracy": float((ref_pred == g.y).mean()), "n_test": int(len(ref_pred)),
            "fp32_onnx_bytes": fp32.size, "latency_ms": speed.latency_ms(runner, g.x),
            "latency_measured_with": runner.executed_by,
            "confusion": parity.confusion(g.y, ref_pred, len(p.dataset.classes))}

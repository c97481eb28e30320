"""build(recipe) -> BuildResult: the stages wired together. No `if target == ...` anywhere: every
target-specific choice comes from its profile and its backend."""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import (
    __version__,
    backbones,
    backends,
    bundle,
    data,
    export,
    features,
    interrupt,
    launch,
    loader,
    parity,
    search,
    space,
    speed,
    train,
)
from .artifact import Artifact
from .errors import EdgetlError, UsageError, require
from .profiles import TargetProfile, load_profile
from .progress import NullProgress, Progress
from .recipe import BuildRecipe
from .refine import RefineInputs, onnx_teacher, refiners
from .runtime.preprocess import load_rgb, preprocess
from .views import EvidenceCrops, TrainViews

log = logging.getLogger(__name__)
N_GOLDEN = 8
GOLDEN_MARGIN = 0.5  # float top-1 minus top-2 probability a golden image should have


@dataclass
class TargetResult:
    target: str
    published: bool
    bundle: str | None
    metrics: dict
    misses: list[str]
    quantization: dict
    sizes: dict
    warnings: list[str] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)  # one per precision: file, metrics, sizes, latency, misses
    validated_with: str | None = None
    error: dict | None = None  # the target could not be built (not a gate miss): message, exit code

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class BuildResult:
    ok: bool
    out: str
    targets: list[TargetResult]
    data: dict
    training: dict
    timings: dict
    recipe: dict
    peak_rss_mb: dict = field(default_factory=dict)  # process peak RSS after each stage
    reference: dict = field(default_factory=dict)  # the float model: accuracy, FP32 ONNX size/latency, confusion
    machine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["targets"] = [t.to_dict() for t in self.targets]
        return d

    @property
    def exit_code(self) -> int:
        """0 all published; 1 a gate failed; the worst error's code when a target could not be built."""
        errors = [t.error["exit_code"] for t in self.targets if t.error]
        return max(errors) if errors else (0 if self.ok else 1)


@dataclass
class _Prepared:
    """Everything validated before any heavy work starts (so bad input fails fast, writing nothing)."""

    recipe: BuildRecipe
    profiles: list[TargetProfile]
    spec: backbones.BackboneSpec
    weights: backbones.WeightsSource
    model: object  # the pretrained ImageNet model (loaded here so a wrong checkpoint fails fast)
    dataset: data.Dataset
    contract: dict
    needs: space.Needs | None = None  # disk space a build needs (for a full disk's message)
    data_warnings: list[str] = field(default_factory=list)  # class imbalance, classes too small to judge


@dataclass
class _Evidence:
    """What every target is built and judged from: the same model outputs and images for all."""

    calibration: np.ndarray  # preprocessed, class-balanced training images
    x: dict[str, loader.Split]  # "val"/"test" -> preprocessed images (on disk, read in batches)
    y: dict[str, np.ndarray]  # split -> labels
    reference: dict[str, np.ndarray]  # "val"/"test" -> float PyTorch logits
    golden: list  # (label, image) pairs shipped for device self-tests
    manifest: dict  # manifest fields shared by every target
    test_files: list[str]  # every test image's file, relative to the data folder, in order (changed ones are shown)
    refine: dict  # what refiners get besides the val split: training views, float head and model, teacher


def prepare(recipe: BuildRecipe, progress: Progress = NullProgress(), ranks: launch.Ranks = launch.SINGLE,
            workers: int = 0) -> _Prepared:
    profiles = [load_profile(t) for t in recipe.targets]
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UsageError(f"--target: two profiles share the name {names}; fix: give each profile a unique name")
    for p in profiles:
        backend = backends.get(p)
        quantizers = p.quantization.quantizers if p.quantization else []
        used = quantizers if recipe.quantize.escalate else quantizers[:1]
        steps = [s for cand in used for s in search.steps_of(cand)]
        for q in ["*", *(steps if "int8" in p.precisions else [])]:
            if q in backend.requires:
                require(*backend.requires[q])
        backend.check(p)
    bundle.created()  # a bad SOURCE_DATE_EPOCH fails now, not after the build
    spec = backbones.get(recipe.model.backbone)
    weights = backbones.resolve_weights(spec, recipe.model.weights)
    model = backbones.load_pretrained(spec, weights, recipe.model.image_size)
    progress.stage("scan data")
    folder = recipe.data.path
    if folder is None:
        from .synthetic import ensure_shapes

        folder = ensure_shapes()
    dataset = None
    if ranks.main:  # one rank reads the folder; the others get its scan
        dataset = data.scan(folder, val_fraction=recipe.data.val_fraction, test_fraction=recipe.data.test_fraction,
                            seed=recipe.seed, workers=workers + 1)  # + this process's core
        _check_out(Path(recipe.out), Path(folder))
    dataset = ranks.broadcast(dataset)
    contract = spec.contract(recipe.model.image_size)
    d = recipe.data
    warnings = data.balance_warnings(dataset, ratio=d.imbalance_ratio, min_judged=d.min_judged_images)
    n_val = len(dataset.split("val"))
    views = evidence_views(recipe, profiles, n_val)
    needs = space.needs(n_crops=n_val * (1 + views) + len(dataset.split("test")) + d.calibration_size,
                        input_size=tuple(contract["input_size"]),
                        fp32_bytes=4 * sum(t.numel() for t in model.parameters()),
                        precisions=[list(p.precisions) for p in profiles], out=Path(recipe.out))
    if ranks.main:
        for w in [*warnings, *space.shortfalls(needs)]:
            log.warning("%s", w)
    return _Prepared(recipe, profiles, spec, weights, model, dataset, contract, needs, warnings)


EVIDENCE_COMPARISONS = 2000  # what the search's agreement evidence aims for by default
MAX_EVIDENCE_VIEWS = 16


def evidence_views(recipe: BuildRecipe, profiles: list[TargetProfile], n_val: int) -> int:
    """Augmented views per val image for the search's agreement evidence (0 when nothing is searched)."""
    if not any("int8" in p.precisions for p in profiles):
        return 0
    if recipe.quantize.evidence_views is not None:
        return recipe.quantize.evidence_views
    return max(2, min(MAX_EVIDENCE_VIEWS, -(-EVIDENCE_COMPARISONS // max(1, n_val)) - 1))


def _check_out(out: Path, data_root: Path) -> None:
    """Fail before any work if OUT cannot be written (nothing is created here)."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; fix: choose another --out")
    if out == data_root.resolve() or data_root.resolve() in out.parents:
        raise UsageError(f"--out {out}: inside the data folder (bundles would be scanned as a class next time); "
                         "fix: choose an --out outside it")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot be created in {ancestor}; fix: choose a writable --out")


def build(recipe: BuildRecipe, progress: Progress = NullProgress()) -> BuildResult | None:
    """Run the build: in this process, in `compute.nproc` launched ones, or as one rank of a build
    started by torchrun. Returns rank 0's result (None on the other ranks)."""
    interrupt.expect([load_profile(t).name for t in recipe.targets])  # here: a launcher never runs prepare()
    if launch.from_environment():
        ranks, device = launch.join(recipe.train.device, recipe.compute.timeout_s, recipe.compute.prepare_timeout_s)
        result = _build(recipe, progress if ranks.main else NullProgress(), ranks, device)
        launch.leave()
        return result
    if recipe.compute.nproc > 1:
        launch.check_devices(recipe.train.device, recipe.compute.nproc)
        return launch.launch(recipe.compute.nproc, build, (recipe, progress))
    return _build(recipe, progress, launch.SINGLE, launch.resolve_device(recipe.train.device))


class _Clock:
    """Seconds and the process's peak RSS after each stage (evidence for the report)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, float] = {}

    def lap(self, name: str, since: float | None = None) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - (self.last if since is None else since), 3)
        self.peak_rss[name] = _peak_rss_mb()
        self.last = now


def _build(recipe: BuildRecipe, progress: Progress, ranks: launch.Ranks, device: str) -> BuildResult | None:
    """The stages; a write that finds the disk full anywhere ends as one DiskFullError naming the folder."""
    known: dict = {}
    try:
        return _stages(recipe, progress, ranks, device, known)
    except OSError as e:
        if not space.is_disk_full(e):
            raise
        raise space.explain(e, known.get("needs")) from None


def _stages(recipe: BuildRecipe, progress: Progress, ranks: launch.Ranks, device: str,
            known: dict) -> BuildResult | None:
    clock = _Clock()
    compute = recipe.compute
    workers = loader.default_workers() if compute.workers is None else compute.workers
    p = prepare(recipe, progress, ranks, workers)
    known["needs"] = p.needs
    clock.lap("prepare")
    ds, contract, cfg = p.dataset, p.contract, recipe.train
    labels = {s: np.asarray([it.label for it in ds.split(s)], dtype=np.int64) for s in data.SPLITS}
    with interrupt.temporary_folder("edgetl-") as work:
        x: dict[str, loader.Split] = {}
        if ranks.main:  # val and test decoded once, to uint8 crops on disk, read in batches from here on
            x = {s: loader.Split.write(ds.split(s), contract, work / f"{s}.crops", workers, progress, f"decode ({s})")
                 for s in ("val", "test")}
            views = evidence_views(recipe, p.profiles, len(ds.split("val")))
            if views:  # the search's agreement evidence: seeded augmented views of the val images
                x["evidence"] = loader.Split.write(
                    ds.split("val"), contract, work / "evidence.crops", workers, progress, "decode (val views)",
                    samples=EvidenceCrops(ds.split("val"), contract, views, recipe.seed))
        clock.lap("decode")

        progress.stage(f"train ({cfg.strategy}) on {device}" + (f", {ranks.world} processes" if ranks.world > 1
                                                                 else ""))
        trunk = backbones.trunk_of(p.model)
        fit = train.Fit(device, workers, ranks, _cache_dir(compute), progress)
        namespace = train.feature_namespace(p.spec.name, p.weights.sha256, contract)
        trained = train.STRATEGIES[cfg.strategy](trunk, len(ds.classes), ds.split("train"), ds.split("val"),
                                                 contract, cfg, recipe.seed, fit, val_x=x.get("val"),
                                                 cache_namespace=namespace)
        clock.lap("train")
        if not ranks.main:  # only rank 0 goes on: reference, quantization, gate, publish
            return None
        if ranks.world > 1:
            launch.take_the_machine()
        return _targets(recipe, p, trained, x, labels, work, device, workers, ranks, progress, clock)


def _cache_dir(compute) -> Path | None:
    if not compute.cache:
        return None
    return Path(compute.cache_dir).expanduser() if compute.cache_dir else features.default_dir()


def _targets(recipe: BuildRecipe, p: _Prepared, trained: train.TrainResult, x: dict, labels: dict, work: Path,
             device: str, workers: int, ranks: launch.Ranks, progress: Progress, clock: _Clock) -> BuildResult:
    """Rank 0, after training: the float reference, then every target built, gated and published."""
    ds, contract, cfg = p.dataset, p.contract, recipe.train
    net = trained.model
    progress.stage("float reference")
    ref = {s: train.forward_batches(net, x[s], 8, progress, f"float reference ({s})", device).numpy() for s in x}
    clock.lap("reference")

    calib_items = data.calibration_subset(ds.split("train"), len(ds.classes), recipe.data.calibration_size,
                                          recipe.seed)
    calib = loader.Split.write(calib_items, contract, work / "calibration.crops", workers)[:]
    calib_sha = data.items_sha256(calib_items, ds.root)
    common = {
        "edgetl_version": __version__, "seed": recipe.seed, "data_sha256": ds.sha256,
        "calibration_sha256": calib_sha, "calibration_size": len(calib_items),
        "backbone": {"name": p.spec.name, "weights_origin": p.weights.origin, "weights_sha256": p.weights.sha256,
                     "weights_file": p.weights.path.name},
        "training": {"strategy": cfg.strategy, "best_epoch": trained.best_epoch,
                     "best_val_accuracy": trained.best_val_accuracy, "epochs_run": len(trained.history),
                     "device": device},
        "classes": ds.classes,
        "data": {"n_train": len(labels["train"]), "n_val": len(labels["val"]), "n_test": len(labels["test"]),
                 "skipped": len(ds.skipped), "presplit": ds.presplit, "warnings": p.data_warnings},
    }
    head = net[-1]
    views = trained.views or TrainViews(ds.split("train"), contract, cfg.augment_views, recipe.seed, workers)
    refine_parts = {"views": views, "model": net, "cache": {},
                    "head": (head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()),
                    "view_logits": trained.view_logits}
    ev = _Evidence(calib, x, labels, ref, _golden_items(ds, labels["test"], ref["test"]), common,
                   [it.rel(ds.root) for it in ds.split("test")], refine_parts)

    out = Path(recipe.out)
    results, reference = _run_targets(p, ev, net, out, work, progress, clock)
    clock.timings["total"] = round(time.perf_counter() - clock.start, 3)
    training = {**common["training"], "history": trained.history, "feature_seconds": trained.seconds_features,
                "device_info": launch.device_info(device), "processes": ranks.world, "workers": workers,
                "feature_cache": trained.cache}
    build_result = BuildResult(
        ok=all(r.published for r in results), out=str(out), targets=results,
        data={**ds.report(), "warnings": p.data_warnings},
        training=training, timings=clock.timings, recipe=recipe.to_toml_dict(), peak_rss_mb=clock.peak_rss,
        reference=reference, machine=machine_info())
    from . import report

    report.write(out, build_result)
    return build_result


class _StagesOnly:
    """Progress for a target built beside others (--jobs): stage lines, no live bars."""

    def __init__(self, progress: Progress):
        self.inner = progress

    def track(self, iterable, *, total=None, description=""):
        for item in iterable:  # signals reach the main thread only: a target's thread stops here
            interrupt.check()
            yield item

    def stage(self, name: str) -> None:
        interrupt.check()
        self.inner.stage(name)


def _run_targets(p: _Prepared, ev: _Evidence, net, out: Path, work: Path, progress: Progress,
                 clock: _Clock) -> tuple[list[TargetResult], dict]:
    """Every target: gated (compute.jobs at a time, the cores shared among them), then — one after
    another, so that no timing shares the machine — its speed evidence and its bundle."""
    jobs = min(p.recipe.compute.jobs, len(p.profiles))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    exports: dict[int, Artifact] = {}
    reference: dict = {}
    lock = threading.Lock()
    seconds: dict[str, float] = {}

    def export(profile: TargetProfile) -> Artifact:
        with lock:  # targets share one export per opset, and one reference row
            if profile.opset not in exports:
                exports[profile.opset] = _export_checked(net, work, profile, p, ev.x, p.dataset)
            if not reference:
                reference.update(_reference_row(exports[profile.opset], p, ev))
            return exports[profile.opset]

    def gate(profile: TargetProfile):
        interrupt.check()  # a target's thread (--jobs) stops here once the build is interrupted
        t0 = time.perf_counter()
        progress.stage(f"target {profile.name}")
        try:
            return _gate_target(profile, export(profile), p, ev, work / profile.name,
                                _StagesOnly(progress) if jobs > 1 else progress, threads)
        except Exception as e:  # one target's failure must not hide the others' results
            return _failed(profile, e, p.needs)
        finally:
            seconds[profile.name] = time.perf_counter() - t0

    if jobs > 1:
        with ThreadPoolExecutor(jobs, thread_name_prefix="edgetl-target") as pool:
            try:
                gated = list(pool.map(gate, p.profiles))
            except interrupt.Interrupted:
                pool.shutdown(wait=True, cancel_futures=True)  # targets not started never start
                raise
    else:
        gated = [gate(profile) for profile in p.profiles]
    results = []
    for profile, g in zip(p.profiles, gated, strict=True):
        t0 = time.perf_counter()
        if isinstance(g, _Gated):
            try:
                g = _finish_target(g, p, ev, out, progress)
            except Exception as e:
                g = _failed(profile, e, p.needs)
        if not g.published:
            g.warnings.extend(_stale_bundle_warning(out / profile.name))
        results.append(g)
        clock.lap(f"target:{profile.name}", since=t0 - seconds[profile.name])
    return results, reference


def _failed(profile: TargetProfile, e: Exception, needs: space.Needs | None = None) -> TargetResult:
    interrupt.check()  # an error a signal caused (a killed worker) ends the build as the interrupt it is
    if space.is_disk_full(e):
        e = space.explain(e, needs)
    log.warning("target %s could not be built: %s", profile.name, e)
    log.debug("target %s failed", profile.name, exc_info=True)
    code = e.exit_code if isinstance(e, EdgetlError) else EdgetlError.exit_code
    message = str(e) if isinstance(e, EdgetlError) else f"internal error: {type(e).__name__}: {e}"
    return TargetResult(profile.name, False, None, {}, [message], {"chosen": None, "attempts": [], "float_nodes": []},
                        {}, error={"message": message, "exit_code": code})


def _stale_bundle_warning(folder: Path) -> list[str]:
    """A bundle from an earlier build left in place when this build's target failed: say so."""
    try:
        manifest = json.loads((folder / bundle.MANIFEST).read_text(encoding="utf-8"))
        made = manifest.get("created") or f"digest {str(manifest.get('digest', '?'))[:19]}"
    except (OSError, ValueError, AttributeError):
        return []
    return [f"{folder} holds an earlier build's bundle ({made}), not this build's; "
            "this build published nothing for the target"]


def _export_checked(net, work: Path, profile: TargetProfile, p: _Prepared, arrays: dict, ds) -> Artifact:
    """The fine-tuned model as FP32 ONNX at the profile's opset, checked against torch on val images."""
    art = export.to_onnx(net, work / f"model.fp32.opset{profile.opset}.onnx", contract=p.contract,
                         labels=ds.classes, opset=profile.opset,
                         extra_metadata={"edgetl.backbone": p.spec.name, "edgetl.version": __version__})
    diff = export.check_against_torch(net, art, arrays["val"][:16], profile.tolerances.export_atol)
    return Artifact(art.path, art.kind, art.sha256, {**art.meta, "max_abs_diff": diff})


def _peak_rss_mb() -> float:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except ImportError:  # pragma: no cover (Windows)
        return float("nan")


def _golden_items(ds: data.Dataset, test_labels, reference_logits) -> list[tuple[str, object]]:
    """Up to N_GOLDEN test images, round-robin over classes, saved decoded (PNG) for device self-tests.
    Per class, the images whose float top-1 is clear (margin >= GOLDEN_MARGIN) come first, in file
    order, then the rest by margin: another CPU, runtime version or TensorRT's FP16/INT8 kernels must
    not flip a golden image's top-1 by rounding alone."""
    margin = parity.float_margin(reference_logits)
    per_class = [sorted(np.flatnonzero(test_labels == c).tolist(),
                        key=lambda i: (margin[i] < GOLDEN_MARGIN, 0.0 if margin[i] >= GOLDEN_MARGIN else -margin[i]))
                 for c in range(len(ds.classes))]
    order = [i for rnd in itertools.zip_longest(*per_class) for i in rnd if i is not None][:N_GOLDEN]
    return [(ds.classes[test_labels[i]], load_rgb(ds.split("test")[i].path)) for i in order]


def _tolerances(profile: TargetProfile, recipe: BuildRecipe) -> dict:
    t, g = profile.tolerances, recipe.gate
    drop = t.max_accuracy_drop_pp if g.max_accuracy_drop_pp is None else g.max_accuracy_drop_pp
    return {"max_accuracy_drop_pp": drop,
            "min_top1_agreement": t.min_top1_agreement if g.min_top1_agreement is None else g.min_top1_agreement}


def _metrics(report: parity.ParityReport, fp32: Artifact) -> dict:
    return {"reference_accuracy": report.reference_accuracy, "accuracy": report.accuracy,
            "accuracy_drop_pp": report.accuracy_drop_pp, "accuracy_drop_ci95_pp": report.drop_ci95_pp,
            "top1_agreement": report.top1_agreement, "n_test": report.n_test,
            "logits_cosine_mean": report.logits_cosine_mean, "sqnr_db": report.sqnr_db,
            "per_class": report.per_class, "discordant": report.discordant, "confusion": report.confusion,
            "drop_upper95_pp": report.drop_upper95_pp, "drop_lower95_pp": report.drop_lower95_pp,
            "agreement_lower95": report.agreement_lower95, "one_image_pp": report.one_image_pp,
            "changed": [dict(c) for c in report.changed],
            "export_max_abs_diff": fp32.meta.get("max_abs_diff")}


@dataclass
class _Model:
    """One model of a target (one precision), gated on the test split."""

    precision: str
    stem: str  # bundle file stem: "model" for the default model, "model.<precision>" for the others
    artifact: Artifact
    runner: object
    metrics: dict
    misses: list[str]
    quantization: dict | None
    sizes: dict
    warnings: list[str]
    latency_ms: float = 0.0
    speed: dict = field(default_factory=dict)  # batch_<n>: vs the FP32 model through the same runtime, interleaved

    def summary(self, files: list[str]) -> dict:
        return {"precision": self.precision, "files": files, "metrics": self.metrics, "misses": self.misses,
                "quantization": self.quantization, "sizes": self.sizes, "latency_ms": self.latency_ms,
                "speed": self.speed, "validated_with": self.runner.executed_by}


def _search(backend, profile: TargetProfile, fp32: Artifact, p: _Prepared, ev: _Evidence, tol: dict, work: Path,
            progress: Progress, threads: int = 0) -> search.Choice:
    """The INT8 search on train + val (edgetl/search.py); the test split is not handed over."""
    recipe = p.recipe
    target_agreement = max(tol["min_top1_agreement"], profile.tolerances.search_top1_agreement)
    views = ev.x.get("evidence")
    qins = backends.QuantInputs(ev.calibration, ev.x["val"], ev.y["val"], ev.reference["val"],
                                tol["max_accuracy_drop_pp"], target_agreement, recipe.seed, views,
                                ev.reference.get("evidence"),
                                len(views) // len(ev.y["val"]) if views is not None else 0)
    r = ev.refine
    known = r["view_logits"]
    teacher = (lambda: known) if known is not None else onnx_teacher(fp32, r["views"])
    rins = RefineInputs(qins, r["views"], r["head"], r["model"], teacher, r["cache"])
    names = profile.quantization.quantizers if recipe.quantize.escalate else profile.quantization.quantizers[:1]
    return search.run(backend, profile, fp32, qins, rins, tolerances=tol, target_agreement=target_agreement,
                      candidates=names, classes=p.dataset.classes, seed=recipe.seed, work=work, progress=progress,
                      make_runner=lambda art: backends.runner(backend, art, p.contract, p.dataset.classes, profile,
                                                             threads=threads))


def _make_model(precision: str, stem: str, backend, profile: TargetProfile, fp32: Artifact, p: _Prepared,
                ev: _Evidence, tol: dict, work: Path, progress: Progress, threads: int) -> _Model:
    recipe, ds, contract = p.recipe, p.dataset, p.contract
    quant, val_missed = None, []
    if precision == "int8":
        choice = _search(backend, profile, fp32, p, ev, tol, work, progress, threads)
        art, val_missed = choice.artifact, choice.val_missed
        quant = {"chosen": art.meta.get("candidate", art.meta.get("quantizer")), "attempts": choice.attempts,
                 "float_nodes": choice.float_nodes, "tolerances": tol,
                 "judged_on": "validation split; gate on test split"}
        for refiner in refiners().values():
            key = getattr(refiner, "record_key", None)
            if key and key in art.meta:
                quant[key] = art.meta[key]
    else:
        progress.stage(f"{profile.name}: convert ({precision})")
        art = backend.convert(fp32, precision, profile, work)
        # A float conversion must agree with the float model almost everywhere.
        tol = {**tol, "min_top1_agreement": profile.tolerances.float_min_top1_agreement}
    # The gate: the test split is looked at here for the first time, once, with the chosen model.
    progress.stage(f"{profile.name}: parity gate ({precision})")
    runner = backends.runner(backend, art, contract, ds.classes, profile, threads=threads)
    test_logits = parity.logits_of(runner, ev.x["test"], progress=progress, description=f"parity (test, {precision})")
    report = parity.evaluate(ev.reference["test"], test_logits, ev.y["test"], ds.classes, seed=recipe.seed,
                             tolerance_pp=tol["max_accuracy_drop_pp"], min_judged=recipe.data.min_judged_images)
    rule = parity.resolve_rule(recipe.gate.rule, report.n_test, tol["max_accuracy_drop_pp"])
    missed, gate_warnings = parity.gate_misses(report, **tol, rule=rule)
    for w in gate_warnings:
        log.warning("%s (%s): %s", profile.name, precision, w)
    if val_missed:
        missed = [f"quantization budget spent: every candidate missed on the validation split "
                  f"({'; '.join(val_missed)})"] + missed
    sizes = {"fp32_onnx_bytes": fp32.size, "model_bytes": art.size, "ratio": round(art.size / fp32.size, 4)}
    metrics = _metrics(report, fp32)
    metrics["gate_rule"] = {"asked": recipe.gate.rule, "applied": rule, "certified": not gate_warnings}
    metrics["agreement_by_margin"] = parity.agreement_by_margin(ev.reference["test"],
                                                                ev.reference["test"].argmax(1) == test_logits.argmax(1))
    for item in metrics["changed"]:
        item["file"] = ev.test_files[item["index"]]
    return _Model(precision, stem, art, runner, metrics, [f"{precision}: {m}" for m in missed], quant,
                  sizes, [*report.warnings, *gate_warnings])


def _latency_ms(runner, x: np.ndarray, warmup: int = 5, runs: int = 30) -> float:
    """Median batch-1 latency through the runner, as built (a quick figure for the report;
    `edgetl bench` measures properly)."""
    from .runtime.predict import _timed

    return round(float(np.median(_timed(runner, x, warmup, runs))) * 1e3, 3)


def _reference_row(fp32: Artifact, p: _Prepared, ev: _Evidence) -> dict:
    """The float model's row of the parity table: PyTorch accuracy, FP32 ONNX size and latency on
    onnxruntime's CPU provider (the speed baseline)."""
    from .runtime.engine_ort import Engine
    from .runtime.predict import Predictor

    ref_pred = ev.reference["test"].argmax(1)
    runner = Predictor(Engine(fp32.path, {"providers": ["CPUExecutionProvider"]}), p.contract, p.dataset.classes)
    return {"accuracy": float((ref_pred == ev.y["test"]).mean()), "n_test": int(len(ref_pred)),
            "fp32_onnx_bytes": fp32.size, "latency_ms": _latency_ms(runner, ev.x["test"][:1]),
            "latency_measured_with": runner.executed_by,
            "confusion": parity.confusion(ev.y["test"], ref_pred, len(p.dataset.classes))}


@dataclass
class _Gated:
    """A target whose models are made and gated; its speed evidence and bundle come next."""

    profile: TargetProfile
    backend: object
    fp32: Artifact
    work: Path
    models: list[_Model]


def _gate_target(profile: TargetProfile, fp32: Artifact, p: _Prepared, ev: _Evidence, work: Path,
                 progress: Progress, threads: int = 0) -> _Gated:
    work.mkdir(parents=True, exist_ok=True)
    backend = backends.get(profile)
    tol = _tolerances(profile, p.recipe)
    models = [_make_model(precision, "model" if i == 0 else f"model.{precision}", backend, profile, fp32, p, ev,
                          tol, work, progress, threads) for i, precision in enumerate(profile.precisions)]
    return _Gated(profile, backend, fp32, work, models)


def _finish_target(g: _Gated, p: _Prepared, ev: _Evidence, out: Path, progress: Progress) -> TargetResult:
    """Speed evidence (alone on the machine), then the bundle when every model passed."""
    recipe, ds, contract = p.recipe, p.dataset, p.contract
    profile, backend, models = g.profile, g.backend, g.models
    baseline = backends.runner(backend, backend.convert(g.fp32, "fp32", profile, g.work), contract, ds.classes,
                               profile)
    for m in models:
        progress.stage(f"{profile.name}: speed vs FP32 ({m.precision})")
        runner = backends.runner(backend, m.artifact, contract, ds.classes, profile)  # all the cores again
        m.speed = speed.versus(runner, baseline, ev.x["test"], batches=(1, profile.speed_batch))
        m.latency_ms = m.speed["batch_1"]["ms"]
    default = models[0]
    int8 = next((m for m in models if m.quantization), None)
    quant = int8.quantization if int8 else {"chosen": None, "attempts": [], "float_nodes": []}
    missed = [miss for m in models for miss in m.misses]
    warnings = sorted({w for m in models for w in m.warnings}) + _budget_warnings(quant)
    result = TargetResult(profile.name, False, None, default.metrics, missed, quant, default.sizes, warnings,
                          [m.summary([]) for m in models], default.runner.executed_by)
    if missed:
        log.warning("target %s missed its gate: %s", profile.name, missed)
        return result

    final = out / profile.name
    stage = bundle.staging_dir(out, profile.name)
    try:
        files: dict = {}
        runtime_dir = Path(str(resources.files("edgetl").joinpath("runtime")))
        for name in ("predict.py", "preprocess.py", "integrity.py", f"engine_{backend.engine}.py"):
            files[name] = runtime_dir / name
        model_files = {m.precision: backend.model_files(m.artifact, m.stem) for m in models}
        for mf in model_files.values():
            files.update(mf)
        files["labels.txt"] = "\n".join(ds.classes) + "\n"
        files["preprocess.json"] = json.dumps(contract, indent=2) + "\n"
        files["runtime.json"] = json.dumps({
            "backend": backend.name, "engine": backend.engine, "requires": backend.runtime_requires,
            "models": {prec: next(iter(mf)) for prec, mf in model_files.items()},
            "default_model": default.precision, "settings": backend.settings(profile),
            "model_settings": {m.precision: ms for m in models if (ms := backend.model_settings(profile, m.precision))},
        }, indent=2) + "\n"
        files["recipe.toml"] = _recipe_toml(recipe, profile)
        files["README.md"] = _bundle_readme(profile, p, models, backend)
        golden = []
        for k, (label, img) in enumerate(ev.golden):
            rel = f"golden/{k:02d}_{label}.png"
            files[rel] = _png_bytes(img)
            golden.append((rel, label))
        bundle.write_files(stage, files)
        expected = {"models": {m.precision: _expected(m, stage, golden, contract) for m in models}}
        bundle.write_files(stage, {"golden/expected.json": json.dumps(expected, indent=1) + "\n"})
        created = bundle.created()  # SOURCE_DATE_EPOCH's; a bundle is a function of its inputs
        manifest = {
            "target": profile.name, "backend": backend.name, "profile": profile.model_dump(),
            **({"created": created} if created else {}),
            **ev.manifest, "versions": _versions(backend), "metrics": default.metrics, "quantization": quant,
            "sizes": default.sizes, "validated_with": default.runner.executed_by,
            "models": {m.precision: m.summary(list(model_files[m.precision])) for m in models},
            "preprocess": contract, "warnings": warnings,
        }
        bundle.write_manifest(stage, manifest)
        bundle.publish(stage, final)
    except BaseException:
        bundle.discard(stage)
        raise
    result.published, result.bundle = True, str(final)
    result.models = [m.summary(list(model_files[m.precision])) for m in models]
    return result


def _budget_warnings(quant: dict) -> list[str]:
    """A wall-clock limit that dropped a candidate makes the bundle depend on the machine's speed."""
    hit = [a["quantizer"] for a in quant.get("attempts", []) if a.get("dropped_by_time_limit")]
    if not hit:
        return []
    return [f"a time limit dropped {', '.join(hit)} on this machine (quantization.qat_budget_s / "
            "mixed_precision_budget_s): this bundle depends on the build machine's speed, and a rebuild "
            "elsewhere may differ; fix: unset the limit for a reproducible bundle"]


def _expected(m: _Model, stage: Path, golden: list[tuple[str, str]], contract: dict) -> dict:
    """Expected outputs of the bundle's own golden files through its own runtime."""
    items = []
    for rel, label in golden:
        logits = m.runner.logits(preprocess(load_rgb(stage / rel), contract)[None])[0]
        items.append({"file": rel, "label": label, "index": int(logits.argmax()),
                      "logits": [round(float(v), 6) for v in logits]})
    scale = max((abs(v) for it in items for v in it["logits"]), default=1.0)
    return {"logit_atol": round(max(1e-3, 0.05 * scale), 6), "executed_by": m.runner.executed_by, "items": items}


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _recipe_toml(recipe: BuildRecipe, profile: TargetProfile) -> str:
    """The resolved recipe as far as this bundle goes: without what describes the build machine
    (OUT, the data and weights paths: manifest.json has their sha256; [compute]: it changes no
    result) and with this bundle's target alone, by name (manifest.json has the profile)."""
    import tomli_w

    d = recipe.to_toml_dict()
    for key in ("out", "compute"):
        d.pop(key, None)
    d["data"].pop("path", None)
    d["model"].pop("weights", None)
    d["targets"] = [profile.name]
    return ("# The resolved recipe this bundle was built with (defaults + file + flags), less the\n"
            "# build machine's paths and [compute]: data_sha256 and backbone.weights_sha256 in\n"
            "# manifest.json name the data and the weights.\n" + tomli_w.dumps(d))


def _versions(backend) -> dict:
    import onnx
    import PIL
    import torch
    import torchvision

    v = {"edgetl": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
         "pillow": PIL.__version__}
    v.update(backend.versions())
    try:
        import nncf

        v["nncf"] = nncf.__version__
    except ImportError:
        pass
    return v


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(), "python": platform.python_version()}


def _bundle_readme(profile: TargetProfile, p: _Prepared, models: list[_Model], backend) -> str:
    c = p.contract
    rows = "\n".join(
        f"| `{m.stem}` ({m.precision}) | {m.metrics['accuracy']:.4f} | {m.metrics['accuracy_drop_pp']:+.2f} | "
        f"{m.metrics['top1_agreement']:.4f} | {m.sizes['model_bytes'] / 1e6:.2f} MB | {m.runner.executed_by} |"
        for m in models)
    quant = next((m.quantization for m in models if m.quantization), None)
    qline = (f"INT8 quantizer: `{quant['chosen']}`; layers kept in float: {len(quant['float_nodes'])}.\n"
             if quant else "")
    return f"""# edgetl bundle: {profile.name}

{profile.description}

Backbone `{p.spec.name}` fine-tuned on {len(p.dataset.classes)} classes ({", ".join(p.dataset.classes)}).

## Run

    pip install {" ".join(backend.runtime_requires)}
    python predict.py IMAGE...           # label and probability per image
    python predict.py --json IMAGE...
    python predict.py --selftest         # golden inputs in golden/ must give the recorded outputs
    python predict.py --bench            # latency, throughput, cold-load time on this device
    python predict.py --model {models[-1].precision} IMAGE...   # another model of this bundle
    python predict.py --set KEY=VALUE    # override a setting of runtime.json "settings"

`runtime.json` holds the models, the default one and the runtime settings
(providers / device, performance hint); `--set` overrides them on the device.

## Input contract (preprocess.json)

RGB, resize shorter side to {c["resize_size"]} ({c["interpolation"]}),
centre-crop {c["input_size"][0]}x{c["input_size"][1]}, x/255, subtract mean {c["mean"]},
divide by std {c["std"]}, NCHW float32. `preprocess.py` implements it.

## Parity (test split, n={models[0].metrics["n_test"]}; float PyTorch {models[0].metrics["reference_accuracy"]:.4f})

| model | top-1 accuracy | drop (pp) | agreement | size | validated with |
|---|---|---|---|---|---|
{rows}

{qline}Validation ran on the build machine through the runtime named in the last column; where that
is not the provider/device this bundle prefers, the numbers are numerical checks of the same
model file, not measurements on the target hardware.

`manifest.json` lists every file's sha256; `edgetl verify DIR` checks them.
"""

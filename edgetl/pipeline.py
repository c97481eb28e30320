"""build(recipe) -> BuildResult: the stages wired together, in the order data flows, and nothing more.

prepare.py (every check, the scan) -> decode val/test (loader.py) -> train.py -> the float reference
and the two bodies of evidence (evidence.py) -> every target (target.py: made and gated, `--jobs`
at a time; then timed and bundled one at a time) -> report.py. No `if target == ...` anywhere:
every target-specific choice comes from its profile and its backend.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import (
    backbones,
    budget,
    bundle_contents,
    data,
    features,
    interrupt,
    launch,
    loader,
    provenance,
    space,
    target,
    threads,
    train,
)
from .artifact import Artifact
from .evidence import GateEvidence, SearchEvidence
from .machine import Clock, machine_info
from .prepare import Prepared, check, choose, configure, prepare, scan
from .profiles import TargetProfile, load_profile
from .progress import NullProgress, Progress
from .recipe import BuildRecipe
from .reference import float_logits
from .results import BuildResult, TargetResult
from .views import EvidenceCrops, TrainViews


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


@contextlib.contextmanager
def _disk_full_explained(needs: space.Needs | None):
    """A write that finds the disk full anywhere ends as one DiskFullError naming the folder."""
    try:
        yield
    except OSError as e:
        if not space.is_disk_full(e):
            raise
        raise space.explain(e, needs) from None


def _build(recipe: BuildRecipe, progress: Progress, ranks: launch.Ranks, device: str) -> BuildResult | None:
    threads.fix_numerics()  # training, the float reference, QAT: the same sums on any machine
    clock = Clock()
    workers = loader.default_workers() if recipe.compute.workers is None else recipe.compute.workers
    if recipe.search.active:  # a budget search chooses the configuration, then the normal path builds it
        with _disk_full_explained(None), interrupt.temporary_folder("edgetl-search-") as work:
            build_inputs = scan(recipe, check(recipe, budget.space(recipe.search)), progress, ranks, workers)
            clock.lap("prepare")
            recipe, record = budget.search(build_inputs, progress, workers, _cache_dir(recipe.compute), device, work)
            clock.lap("budget search")
            p = choose(replace(build_inputs, recipe=recipe), configure(recipe), ranks.main)
        search = record
    else:
        with _disk_full_explained(None):
            p = prepare(recipe, progress, ranks, workers)
        clock.lap("prepare")
        search = None
    with _disk_full_explained(p.needs), interrupt.temporary_folder("edgetl-") as work:
        return _stages(p, progress, ranks, device, workers, clock, work, search)


@dataclass
class Trained:
    """A build after training, on rank 0: what every target is made from. Tests may start here."""

    prepared: Prepared
    result: train.TrainResult
    x: dict  # split -> loader.Split (val, test, and the val views of the search's evidence)
    work: Path
    device: str
    workers: int
    ranks: launch.Ranks = launch.SINGLE
    search: budget.SearchRecord | None = None  # the budget search, when one chose the configuration


def _stages(p: Prepared, progress: Progress, ranks: launch.Ranks, device: str, workers: int, clock: Clock,
            work: Path, search: budget.SearchRecord | None = None) -> BuildResult | None:
    recipe, ds, contract, cfg = p.recipe, p.dataset, p.contract, p.recipe.train
    x: dict[str, loader.Split] = {}
    if ranks.main:  # val and test decoded once, to uint8 crops on disk, read in batches from here on
        x = {s: loader.Split.write(ds.split(s), contract, work / f"{s}.crops", workers, progress, f"decode ({s})")
             for s in ("val", "test")}
        if p.evidence_views:  # the search's agreement evidence: seeded augmented views of the val images
            x["evidence"] = loader.Split.write(
                ds.split("val"), contract, work / "evidence.crops", workers, progress, "decode (val views)",
                samples=EvidenceCrops(ds.split("val"), contract, p.evidence_views, recipe.seed))
    ranks.wait_for_main()  # the other ranks wait for the decoding here, not inside a training collective
    clock.lap("decode")

    progress.stage(f"train ({cfg.strategy}) on {device}" + (f", {ranks.world} processes" if ranks.world > 1 else ""))
    trunk = backbones.trunk_of(p.model)
    fit = train.Fit(device, workers, ranks, _cache_dir(recipe.compute), progress)
    namespace = train.feature_namespace(p.spec.name, p.weights.sha256, contract)
    job = train.Job(trunk, len(ds.classes), ds.split("train"), ds.split("val"), contract, cfg, recipe.seed,
                    val_x=x.get("val"), cache_namespace=namespace)
    trained = train.run(job, fit)
    clock.lap("train")
    if not ranks.main:  # only rank 0 goes on: reference, quantization, gate, publish
        return None
    if ranks.world > 1:
        threads.alone()  # the other ranks are done: the engines get every allowed CPU, as in one process
    return after_training(Trained(p, trained, x, work, device, workers, ranks, search), progress, clock)


def _cache_dir(compute) -> Path | None:
    if not compute.cache:
        return None
    return Path(compute.cache_dir).expanduser() if compute.cache_dir else features.default_dir()


def calibration(p: Prepared, work: Path, workers: int) -> tuple[np.ndarray, list]:
    """The class-balanced calibration subset of the training split, decoded: (crops, items)."""
    ds = p.dataset
    items = data.calibration_subset(ds.split("train"), len(ds.classes), p.recipe.data.calibration_size, p.recipe.seed)
    return loader.Split.write(items, p.contract, work / "calibration.crops", workers)[:], items


def evidence(t: Trained, ref: dict, calib: np.ndarray) -> tuple[SearchEvidence, GateEvidence, list]:
    """The INT8 search's evidence (calibration, val, training views: never the test split), the gate's
    (the test split) and the golden images."""
    p, net, trained = t.prepared, t.result.model, t.result
    ds, cfg = p.dataset, p.recipe.train
    labels = {s: np.asarray([it.label for it in ds.split(s)], dtype=np.int64) for s in ("val", "test")}
    head = net[-1]
    views = trained.views or TrainViews(ds.split("train"), p.contract, cfg.augment_views, p.recipe.seed, t.workers)
    searching = SearchEvidence(calib, t.x["val"], labels["val"], ref["val"], views,
                               (head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()), net,
                               trained.view_logits, t.x.get("evidence"), ref.get("evidence"))
    gating = GateEvidence(t.x["test"], labels["test"], ref["test"], [it.rel(ds.root) for it in ds.split("test")])
    return searching, gating, bundle_contents.golden_items(ds, labels["test"], ref["test"])


def after_training(t: Trained, progress: Progress, clock: Clock) -> BuildResult:
    """Rank 0, after training: the float reference and the evidence, then every target, then the report."""
    p, trained = t.prepared, t.result
    progress.stage("float reference")
    ref = float_logits(trained.model, t.x, p, t.work, t.device, progress, _cache_dir(p.recipe.compute))
    clock.lap("reference")
    calib, calib_items = calibration(p, t.work, t.workers)
    prov = provenance.of(p, trained, calib_items, t.device, t.search.to_dict() if t.search else None)
    searching, gating, golden = evidence(t, ref, calib)
    out = Path(p.recipe.out)
    results, reference = _run_targets(p, target.Context(p, searching, gating, progress), trained.model, out, t.work,
                                      prov, golden, clock)
    clock.total()
    training = {**asdict(prov.training), "history": trained.history, "feature_seconds": trained.seconds_features,
                "device_info": launch.device_info(t.device), "processes": t.ranks.world, "workers": t.workers,
                "feature_cache": trained.cache}
    result = BuildResult(ok=all(r.published for r in results), out=str(out), targets=results,
                         data={**p.dataset.report(), "warnings": p.data_warnings}, training=training,
                         timings=clock.timings, recipe=p.recipe.to_toml_dict(), peak_rss_mb=clock.peak_rss,
                         reference=reference, machine=machine_info(),
                         search=t.search.to_dict(report=True) if t.search else None)
    from . import report

    report.write(out, result)
    return result


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


def _run_targets(p: Prepared, ctx: target.Context, net, out: Path, work: Path, prov: provenance.Provenance,
                 golden: list, clock: Clock) -> tuple[list[TargetResult], dict]:
    """Every target: gated (compute.jobs at a time, the cores shared among them), then — one after
    another, so that no timing shares the machine — its speed evidence and its bundle."""
    jobs = min(p.recipe.compute.jobs, len(p.profiles))
    shared = target.Context(p, ctx.search, ctx.gate, _StagesOnly(ctx.progress) if jobs > 1 else ctx.progress,
                            threads.engine(jobs))
    exports: dict[int, Artifact] = {}
    reference: dict = {}
    lock = threading.Lock()
    seconds: dict[str, float] = {}

    def export(profile: TargetProfile) -> Artifact:
        with lock:  # targets share one export per opset, and one reference row
            if profile.opset not in exports:
                exports[profile.opset] = target.export_checked(net, work, profile, p, ctx.search.val_x)
            if not reference:
                reference.update(target.reference_row(exports[profile.opset], p, ctx.gate))
            return exports[profile.opset]

    def gate(profile: TargetProfile):
        interrupt.check()  # a target's thread (--jobs) stops here once the build is interrupted
        t0 = time.perf_counter()
        ctx.progress.stage(f"target {profile.name}")
        try:
            return target.gate(profile, export(profile), shared, work / profile.name)
        except Exception as e:  # one target's failure must not hide the others' results
            return target.failed(profile, e, p.needs)
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
        if isinstance(g, target.Gated):
            try:
                g = target.finish(g, ctx, out, prov, golden)
            except Exception as e:
                g = target.failed(profile, e, p.needs)
        if not g.published:
            g.warnings.extend(target.stale_bundle_warning(out / profile.name))
        results.append(g)
        clock.lap(f"target:{profile.name}", since=t0 - seconds[profile.name])
    return results, reference

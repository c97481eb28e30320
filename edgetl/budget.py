"""The latency-budget search: which (backbone, input size) to build for a batch-1 latency budget.

Every configuration of the recipe's [search] space is trained feature-extract (the feature cache makes
a repeat cheap) and its val accuracy recorded; its latency is measured at batch 1 through each
target's own runtime at the precision that target ships (latency.py: a random-weight model of the
same graph), or read from a device profile (device_profile.py). The most accurate configuration
that fits the budget on every target is chosen (ties: the faster, then the name); the recipe comes
back pinned to it (model.backbone, model.image_size, no [search]) and the build goes on through the
normal path (pipeline.py). The test split is never read here: only the chosen model's gate reads it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import backbones, backends, latency, launch, prepare, train
from .errors import UsageError
from .prepare import BuildInputs
from .progress import Progress
from .recipe import BuildRecipe, ModelSection, SearchSection

if TYPE_CHECKING:
    from .device_profile import DeviceProfile

DECIDES = "val accuracy (feature-extract), then batch-1 latency: the most accurate that fits on every target; " \
          "ties go to the faster"


@dataclass
class Tried:
    """One configuration of the space, as the search saw it."""

    backbone: str
    image_size: int
    val_accuracy: float
    latency_ms: float  # the largest over the targets: what the budget is held against
    latency_by_target: dict[str, dict] = field(default_factory=dict)  # target -> latency.measure's row
    model_bytes: dict[str, int] = field(default_factory=dict)  # target -> size of its latency model
    parameters: int = 0
    fits: bool = False
    feature_cache: dict | None = None
    train_seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.backbone}@{self.image_size}"


@dataclass
class SearchRecord:
    """What the manifest's "search" and the report carry."""

    latency_ms: float
    configurations: list[Tried]
    chosen: Tried
    reason: str
    latency_source: str  # "measured on the build machine" or the device profile
    device_profile: dict | None = None  # cpu, threads, runtime versions of the profile's device

    def to_dict(self, report: bool = False) -> dict:
        """The manifest's "search" (nothing that varies between two runs of one build: no timings,
        no cache hits); `report`: with the training seconds and feature-cache figures too."""

        def row(t: Tried) -> dict:
            d = asdict(t)
            if not report:
                d.pop("feature_cache")
                d.pop("train_seconds")
            d["latency_by_target"] = {k: {"latency_ms": v["latency_ms"], "p90_ms": v.get("p90_ms"),
                                          "runs": v.get("runs"), "executed_by": v.get("executed_by")}
                                      for k, v in t.latency_by_target.items()}
            return d

        return {"latency_ms": self.latency_ms, "configurations": [row(t) for t in self.configurations],
                "chosen": row(self.chosen), "reason": self.reason, "latency_source": self.latency_source,
                "decided_by": DECIDES, **({"device_profile": self.device_profile} if self.device_profile else {})}


class NothingFits(UsageError):
    """No configuration of the space fits the budget (exit 2, one line naming the fastest)."""


def space(s: SearchSection) -> list[tuple[str, int]]:
    """(backbone, size) pairs: every size of the search up to each backbone's native size."""
    pairs = [(b, size) for b in s.backbones for size in s.image_sizes if size <= backbones.get(b).native_size]
    if not pairs:
        raise UsageError(f"search.image_sizes {s.image_sizes}: every size is above the native size of "
                         f"{', '.join(s.backbones)}; fix: choose sizes from 96 up to each backbone's native size")
    return pairs


def pick(tried: list[Tried], budget: float, source: str) -> tuple[Tried, str]:
    """The most accurate configuration that fits (ties: faster, then by name); NothingFits otherwise."""
    for t in tried:
        t.fits = t.latency_ms <= budget
    fitting = sorted((t for t in tried if t.fits), key=lambda t: (-t.val_accuracy, t.latency_ms, t.name))
    if not fitting:
        fastest = min(tried, key=lambda t: (t.latency_ms, t.name))
        worst = max(fastest.latency_by_target, key=lambda k: fastest.latency_by_target[k]["latency_ms"])
        raise NothingFits(f"--latency-ms {budget:g}: no configuration fits; the fastest is {fastest.backbone} at "
                          f"{fastest.image_size} px, {fastest.latency_ms:.3f} ms on target {worst} ({source}); "
                          f"fix: a budget of at least {fastest.latency_ms:.3f} ms, or smaller search.image_sizes")
    best = fitting[0]
    rivals = [t for t in fitting[1:] if t.val_accuracy == best.val_accuracy]
    reason = (f"the most accurate of {len(fitting)} configuration(s) within {budget:g} ms on every target "
              f"(val accuracy {best.val_accuracy:.4f}, {best.latency_ms:.3f} ms)")
    if rivals:
        reason += f"; tied with {', '.join(t.name for t in rivals)} on accuracy, and faster"
    slower = [t for t in tried if not t.fits and t.val_accuracy > best.val_accuracy]
    if slower:
        reason += f"; {len(slower)} more accurate configuration(s) exceed the budget"
    return best, reason


def pinned(recipe: BuildRecipe, chosen: Tried) -> BuildRecipe:
    """The recipe that rebuilds the chosen configuration without searching (the bundle's recipe.toml);
    the recipe's --weights stay when the chosen backbone is theirs (prepare.check refuses a search
    over other backbones with --weights)."""
    weights = recipe.model.weights if chosen.backbone == recipe.model.backbone else None
    model = ModelSection(backbone=chosen.backbone, image_size=chosen.image_size, weights=weights)
    return recipe.model_copy(update={"model": model, "search": SearchSection()})


def _val_accuracy(build: BuildInputs, backbone: str, size: int, fit: train.Fit) -> train.TrainResult:
    """Feature-extract training of one configuration on train, judged on val (never test)."""
    recipe, ds = build.recipe, build.dataset
    config = prepare.configure(recipe, backbone, size)
    cfg = recipe.train.model_copy(update={"strategy": "feature-extract"})
    namespace = train.feature_namespace(config.spec.name, config.weights.sha256, config.contract)
    job = train.Job(backbones.trunk_of(config.model), len(ds.classes), ds.split("train"), ds.split("val"),
                    config.contract, cfg, recipe.seed, cache_namespace=namespace)
    return train.run(job, fit)


def _latencies(build: BuildInputs, pairs: list[tuple[str, int]], cache: Path | None, work: Path,
               progress: Progress, device: DeviceProfile | None = None) -> dict:
    """(backbone, size) -> target -> latency row; and target -> (backbone, size) -> model bytes."""
    out: dict = {pair: {} for pair in pairs}
    sizes: dict = {pair: {} for pair in pairs}
    n_classes = len(build.dataset.classes)
    for profile in build.profiles:
        backend = backends.get(profile)
        if device is not None:
            for b, s in pairs:
                out[(b, s)][profile.name] = device.latency(b, s, profile)
            continue
        folder = (cache or work) / "graphs"
        graphs = {}
        for b, s in pairs:
            progress.stage(f"{profile.name}: latency model {b} at {s} px ({profile.precisions[0]})")
            graphs[f"{b}@{s}"] = latency.graph(b, s, n_classes, profile, backend, folder)
        measured = latency.measure(graphs, backend, profile, build.recipe.search.runs,
                                   None if cache is None else cache / "measured", progress)
        for b, s in pairs:
            out[(b, s)][profile.name] = measured[f"{b}@{s}"]
            sizes[(b, s)][profile.name] = graphs[f"{b}@{s}"].size_bytes
    return {"latency": out, "bytes": sizes}


def search(build: BuildInputs, progress: Progress, workers: int, cache_dir: Path | None, device: str,
           work: Path) -> tuple[BuildRecipe, SearchRecord]:
    """Every configuration tried (see the module docstring): the pinned recipe and the search's record."""
    from . import device_profile

    recipe, s = build.recipe, build.recipe.search
    pairs = space(s)
    dp = device_profile.load(s.device_profile, build.profiles) if s.device_profile is not None else None
    if dp is not None:
        dp.covers(pairs, build.profiles)  # a missing configuration fails now, not after every training
    source = dp.describe() if dp else "measured on the build machine through each target's runtime"
    cache = None if cache_dir is None else cache_dir / "budget"
    fit = train.Fit(device, workers, launch.SINGLE, cache_dir, progress)
    tried = []
    for i, (b, size) in enumerate(pairs):
        progress.stage(f"search {i + 1}/{len(pairs)}: {b} at {size} px (feature-extract)")
        t0 = time.perf_counter()
        trained = _val_accuracy(build, b, size, fit)
        params = sum(p.numel() for p in trained.model.parameters())
        tried.append(Tried(b, size, float(trained.best_val_accuracy), 0.0, parameters=int(params),
                           feature_cache=trained.cache, train_seconds=round(time.perf_counter() - t0, 3)))
    lat = _latencies(build, pairs, cache, work, progress, dp)
    for t in tried:
        t.latency_by_target = lat["latency"][(t.backbone, t.image_size)]
        t.model_bytes = lat["bytes"][(t.backbone, t.image_size)]
        t.latency_ms = max(r["latency_ms"] for r in t.latency_by_target.values())
    chosen, reason = pick(tried, s.latency_ms, source)
    record = SearchRecord(s.latency_ms, tried, chosen, reason, source,
                          {k: dp.data.get(k) for k in ("cpu", "cores", "threads", "runtime_versions", "engine")}
                          if dp else None)
    progress.stage(f"search: {chosen.backbone} at {chosen.image_size} px ({reason})")
    return pinned(recipe, chosen), record

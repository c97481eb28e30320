"""Every check before any heavy work: profiles, what their backends and candidates need, the build's
time stamp, the weights, the data scan, OUT and the disk space. Bad input fails here, fast, with
one line and nothing written."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import backbones, backends, bundle, data, launch, search, space
from .errors import UsageError, require
from .profiles import TargetProfile, load_profile
from .progress import NullProgress, Progress
from .recipe import BuildRecipe
from .refine import refiners

log = logging.getLogger(__name__)
EVIDENCE_COMPARISONS = 2000  # what the search's agreement evidence aims for by default
MAX_EVIDENCE_VIEWS = 16


@dataclass
class BuildInputs:
    """What every configuration of a build shares: the recipe, the targets, the scanned data set."""

    recipe: BuildRecipe
    profiles: list[TargetProfile]
    dataset: data.Dataset
    data_warnings: list[str] = field(default_factory=list)  # class imbalance, classes too small to judge
    evidence_views: int = 0  # augmented views per val image for the INT8 search's agreement evidence


@dataclass(frozen=True)
class Configuration:
    """One choice of model: the backbone, its weights, the pretrained model at an input size, and the
    preprocessing contract that size makes."""

    spec: backbones.BackboneSpec
    weights: backbones.WeightsSource
    model: object  # the pretrained ImageNet model (loaded before any heavy work: a wrong checkpoint fails fast)
    contract: dict

    @property
    def image_size(self) -> int:
        return int(self.contract["input_size"][0])


@dataclass
class Prepared:
    """Build inputs and the configuration chosen for them: everything validated before any heavy
    work starts (so bad input fails fast, writing nothing)."""

    inputs: BuildInputs
    config: Configuration
    needs: space.Needs | None = None  # disk space a build needs (for a full disk's message)

    recipe = property(lambda self: self.inputs.recipe)
    profiles = property(lambda self: self.inputs.profiles)
    dataset = property(lambda self: self.inputs.dataset)
    data_warnings = property(lambda self: self.inputs.data_warnings)
    evidence_views = property(lambda self: self.inputs.evidence_views)
    spec = property(lambda self: self.config.spec)
    weights = property(lambda self: self.config.weights)
    model = property(lambda self: self.config.model)
    contract = property(lambda self: self.config.contract)


def evidence_views(recipe: BuildRecipe, profiles: list[TargetProfile], n_val: int) -> int:
    """Augmented views per val image for the search's agreement evidence (0 when nothing is searched)."""
    if not any("int8" in p.precisions for p in profiles):
        return 0
    if recipe.quantize.evidence_views is not None:
        return recipe.quantize.evidence_views
    return max(2, min(MAX_EVIDENCE_VIEWS, -(-EVIDENCE_COMPARISONS // max(1, n_val)) - 1))


def check_profiles(recipe: BuildRecipe) -> list[TargetProfile]:
    """Every --target loads, names a backend, lists usable candidates, and finds what they import."""
    profiles = [load_profile(t) for t in recipe.targets]
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UsageError(f"--target: two profiles share the name {names}; fix: give each profile a unique name")
    known = refiners()
    for p in profiles:
        backend = backends.get(p)
        quantizers = p.quantization.quantizers if p.quantization else []
        if quantizers:
            search.check_candidates(quantizers, backend, p.source)
        used = quantizers if recipe.quantize.level != "low" else quantizers[:1]
        steps = [s for cand in used for s in search.steps_of(cand)]
        for q in ["*", *(steps if "int8" in p.precisions else [])]:
            needed = backend.requires.get(q) or getattr(known.get(q), "requires", None)  # a quantizer's or a refiner's
            if needed:
                require(*needed)
        backend.check(p)
    return profiles


def prepare(recipe: BuildRecipe, progress: Progress = NullProgress(), ranks: launch.Ranks = launch.SINGLE,
            workers: int = 0) -> Prepared:
    """Every check, then the scan: a Prepared build, or a typed error before any heavy work."""
    profiles = check(recipe)
    config = configure(recipe)  # a wrong checkpoint fails before the scan
    return choose(scan(recipe, profiles, progress, ranks, workers), config, ranks.main)


def configure(recipe: BuildRecipe, backbone: str | None = None, image_size: int | None = None) -> Configuration:
    """The recipe's [model] (or `backbone` at `image_size`): its weights found (the recipe's --weights
    when the backbone is the recipe's), the pretrained model loaded."""
    spec = backbones.get(backbone or recipe.model.backbone)
    mine = backbone is None or backbone == recipe.model.backbone
    weights = backbones.resolve_weights(spec, recipe.model.weights if mine else None)
    size = image_size if backbone is not None else recipe.model.image_size
    model = backbones.load_pretrained(spec, weights, size)
    return Configuration(spec, weights, model, spec.contract(size))


def check(recipe: BuildRecipe, space_of: list[tuple[str, int]] = ()) -> list[TargetProfile]:
    """The targets checked, the build's time stamp, and the weights of every backbone in `space_of`
    (a budget search's (backbone, image size) pairs) found: bad input fails before any scan. --weights
    and a search over other backbones than model.backbone do not mix (the file is for one backbone)."""
    profiles = check_profiles(recipe)
    bundle.created()  # a bad SOURCE_DATE_EPOCH fails now, not after the build
    names = list(dict.fromkeys(b for b, _ in space_of))
    others = [n for n in names if n != recipe.model.backbone]
    if recipe.model.weights is not None and others:
        raise UsageError(f"--weights {recipe.model.weights}: the file is for model.backbone "
                         f"{recipe.model.backbone}, but the latency search also tries {', '.join(others)}; fix: "
                         f"search that backbone only ([search] backbones = [\"{recipe.model.backbone}\"]), "
                         "or drop --weights")
    for name in names:
        backbones.resolve_weights(backbones.get(name), recipe.model.weights if name == recipe.model.backbone else None)
    return profiles


def scan(recipe: BuildRecipe, profiles: list[TargetProfile], progress: Progress = NullProgress(),
         ranks: launch.Ranks = launch.SINGLE, workers: int = 0) -> BuildInputs:
    """The data folder scanned and split: the build's inputs."""
    progress.stage("scan data")
    folder = recipe.data.path
    if folder is None:
        from .synthetic import ensure_shapes

        folder = ensure_shapes()
    dataset = None
    if ranks.main:  # one rank reads the folder; the others get its scan
        dataset = data.scan(folder, val_fraction=recipe.data.val_fraction, test_fraction=recipe.data.test_fraction,
                            seed=recipe.seed, workers=workers + 1)  # + this process's core
        check_out(Path(recipe.out), Path(folder))
    dataset = ranks.broadcast(dataset, waiting=True)
    d = recipe.data
    warnings = data.balance_warnings(dataset, ratio=d.imbalance_ratio, min_judged=d.min_judged_images)
    views = evidence_views(recipe, profiles, len(dataset.split("val")))
    return BuildInputs(recipe, profiles, dataset, warnings, views)


def choose(build: BuildInputs, config: Configuration, main: bool = True) -> Prepared:
    """The build's inputs with one configuration: what it needs on disk (warned about when short)."""
    recipe, dataset, d = build.recipe, build.dataset, build.recipe.data
    n_val = len(dataset.split("val"))
    needs = space.needs(n_crops=n_val * (1 + build.evidence_views) + len(dataset.split("test")) + d.calibration_size,
                        input_size=tuple(config.contract["input_size"]),
                        fp32_bytes=4 * sum(t.numel() for t in config.model.parameters()),
                        precisions=[list(p.precisions) for p in build.profiles], out=Path(recipe.out))
    if main:
        for w in [*build.data_warnings, *space.shortfalls(needs)]:
            log.warning("%s", w)
    return Prepared(build, config, needs)


def check_out(out: Path, data_root: Path) -> None:
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

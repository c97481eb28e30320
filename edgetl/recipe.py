"""The build recipe: one validated object that flows through every stage.

Sources, later wins: defaults -> recipe TOML -> CLI flags. Validated once, here.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UsageError
from .runtime.integrity import one_line  # messages stay one line (shared with the bundle's own check)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _no_nul(p: Path) -> Path:
    if "\x00" in str(p):
        raise ValueError("a path cannot contain a NUL byte")
    return p


# A path field: a NUL byte would only fail later, deep in the build, as an internal error.
FilePath = Annotated[Path, AfterValidator(_no_nul)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSection(_Section):
    path: FilePath | None = Field(None, description="ImageFolder or pre-split folder; empty = built-in data")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of the images for val (when not pre-split)")
    test_fraction: float = Field(0.25, gt=0, lt=0.6, description="share of the images for test (when not pre-split)")
    calibration_size: int = Field(128, ge=8, le=4096, description="class-balanced training images for calibration")
    # Warnings, not failures: a class with fewer images than this share of the largest class, and a
    # class with fewer than min_judged_images in val or test (its recall change cannot be judged).
    imbalance_ratio: float = Field(0.2, ge=0, le=1, description=(
        "warn when a class has fewer images than this share of the largest class"))
    min_judged_images: int = Field(5, ge=1, le=1000, description=(
        "warn, and leave a class out of the per-class judgement, below this many val or test images"))


class ModelSection(_Section):
    backbone: str = Field("mobilenet_v2", description="a registered backbone (`edgetl backbones`)")
    weights: FilePath | None = Field(None, description="local .pth state dict; skips the weights search")
    image_size: int | None = Field(None, ge=32, le=1024, description="None = the backbone's native size")


class TrainSection(_Section):
    strategy: Literal["feature-extract", "fine-tune"] = Field("feature-extract", description=(
        "feature-extract: train the head on frozen backbone features (cached); fine-tune: also the top blocks"))
    epochs: int = Field(40, ge=1, le=1000, description="AdamW epochs, cosine schedule")
    batch_size: int = Field(32, ge=1, le=1024, description="training batch size")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (the head's)")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="fine-tune: backbone learning rate = lr x this")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    patience: int = Field(8, ge=1, description="early stopping: epochs without a better validation accuracy")
    unfreeze_blocks: int = Field(3, ge=-1, description="fine-tune: top N blocks trainable; -1 = all")
    augment_views: int = Field(2, ge=0, le=16, description="augmented copies per training image")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="training and the float reference: auto | cpu | cuda | cuda:N")


class GateSection(_Section):
    """Tolerances. None = take the target profile's value."""

    max_accuracy_drop_pp: float | None = Field(None, ge=0, description=(
        "tolerance on the test split's accuracy drop, percentage points; None = the profile's (1.0)"))
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description=(
        "floor on top-1 agreement with the float model (catches broken quantization); "
        "None = the profile's (0.90)"))
    # How the accuracy drop is judged on the test split (docs/gate-statistics.md). "point": the drop
    # itself must be within the tolerance. "evidence": fail when the drop exceeds the tolerance by more
    # than one test image, or its paired 95 % lower bound is above the tolerance. "auto": "point" when
    # one test image is worth at most half the tolerance, else "evidence". Under every rule a model
    # whose 95 % upper bound is above the tolerance is "published, NOT CERTIFIED".
    rule: Literal["auto", "point", "evidence"] = Field("auto", description=(
        "how the drop is judged: point (the drop itself within the tolerance), evidence (a miss when the drop "
        "exceeds the tolerance by more than one test image or its 95 % lower bound is above it), auto (point "
        "when one test image is worth at most half the tolerance, else evidence); gate-statistics.md"))
    require_certified: bool = Field(False, description=(
        "a model the test split cannot certify (95 % upper bound of the drop above the tolerance) "
        "misses the gate: exit 1, nothing published for its target"))


class QuantizeSection(_Section):
    effort: Literal["low", "default", "max"] | None = Field(None, description=(
        "how much of the profile's candidate list the INT8 search may run (docs/search.md). "
        "low: the first candidate that builds (seconds). default: the cheap (PTQ-based) candidates in order "
        "until one is feasible on val (passes the gate's rule and meets the search target); the "
        "expensive ones (QAT, mixed precision: minutes) only when no fully-INT8 candidate passes "
        "the gate on val or the best fully-INT8 one misses the clear-image target. "
        "max: every candidate, the feasible one with the best agreement ships. "
        "None: default, or low when escalate = false"))
    escalate: bool = Field(True, description="older form of effort: false = effort 'low' (effort wins when set)")
    evidence_views: int | None = Field(None, ge=0, le=64, description=(
        "augmented views per val image for the search's agreement evidence; None = enough for about "
        "2000 comparisons, at most 16"))

    @property
    def level(self) -> str:
        """The effort the search runs at: `effort`, else "default" (or "low" when escalate = false)."""
        return self.effort or ("default" if self.escalate else "low")


class ComputeSection(_Section):
    """How the build uses this machine. None of it changes the results (same seed, same bundle)."""

    workers: int | None = Field(None, ge=0, le=64, description="image decoding workers; None = cores - 1")
    nproc: int = Field(1, ge=1, le=64, description="training processes (torch elastic launch)")
    jobs: int = Field(1, ge=1, le=16, description="targets built at once, the cores shared among them")
    cache: bool = Field(True, description="feature-extract: keep trunk features on disk for the next build")
    cache_dir: FilePath | None = Field(None, description="None = ~/.cache/edgetl/features ($EDGETL_CACHE/features)")
    timeout_s: float = Field(900, gt=0, description="a process waiting on a failed one gives up after this")
    prepare_timeout_s: float = Field(21600, gt=0, description=(
        "--nproc: how long the other processes wait for rank 0's scan and decoding before training"))


class SearchSection(_Section):
    """The latency-budget search (docs/budget.md): every (backbone, image size) of the space trained
    (feature-extract, cached), its val accuracy and its latency through each target's runtime measured;
    the most accurate one that fits `latency_ms` on every target is built. Off while latency_ms is unset."""

    latency_ms: float | None = Field(None, gt=0, description="batch-1 latency budget per image, ms; None = no search")
    backbones: list[str] = Field(default_factory=lambda: ["mobilenet_v2", "efficientnet_lite0"], min_length=1,
                                 description="backbones the search tries (`edgetl backbones`)")
    image_sizes: list[int] = Field(default_factory=lambda: [96, 128, 160, 224], min_length=1, description=(
        "input sizes the search tries, each up to a backbone's native size"))
    device_profile: FilePath | None = Field(None, description=(
        "latencies measured on the device (`edgetl bench --profile`) instead of on this machine"))
    runs: int = Field(60, ge=5, le=10000, description="timed batch-1 runs per configuration (the median is used)")

    @field_validator("backbones")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from . import backbones

        unknown = [b for b in v if b not in backbones.names()]
        if unknown:
            raise ValueError(f"unknown backbone {unknown[0]!r}; choose from {', '.join(backbones.names())}")
        return list(dict.fromkeys(v))

    @field_validator("image_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 32 <= s <= 1024]
        if bad:
            raise ValueError(f"image size {bad[0]} is outside 32..1024")
        return sorted(set(v))

    @property
    def active(self) -> bool:
        return self.latency_ms is not None


class BuildRecipe(_Section):
    seed: int = Field(0, ge=0, lt=2**32, description="split, training, calibration subset, bootstrap")
    out: FilePath = Field(Path("edgetl-out"), description="output folder: bundles at OUT/<target>/, the report beside")
    targets: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1, description=(
        "built-in profile names (`edgetl targets`) or paths to profile TOML files"))
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    gate: GateSection = Field(default_factory=GateSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    search: SearchSection = Field(default_factory=SearchSection)

    @model_validator(mode="after")
    def _search_runs_alone(self) -> BuildRecipe:
        if self.search.device_profile is not None and not self.search.active:
            raise ValueError("search.device_profile needs a budget: set search.latency_ms (--latency-ms)")
        if self.search.active and self.compute.nproc > 1:
            raise ValueError("a budget search (search.latency_ms) runs in one process: set compute.nproc = 1")
        return self

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip() or not t.isprintable()]
        if bad:
            raise ValueError(f"{bad} is not a target name or profile path (empty, or control characters)")
        return list(dict.fromkeys(v))

    def to_toml_dict(self) -> dict[str, Any]:
        """Plain dict for TOML (no None, paths as strings)."""

        def clean(obj):
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items() if v is not None}
            if isinstance(obj, list):
                return [clean(v) for v in obj]
            if isinstance(obj, Path):
                return str(obj)
            return obj

        return clean(self.model_dump())


# CLI flag -> dotted recipe key. The CLI only fills this mapping; validation stays here.
CLI_KEYS = {
    "data": "data.path",
    "backbone": "model.backbone",
    "weights": "model.weights",
    "image_size": "model.image_size",
    "strategy": "train.strategy",
    "epochs": "train.epochs",
    "seed": "seed",
    "out": "out",
    "target": "targets",
    "device": "train.device",
    "workers": "compute.workers",
    "nproc": "compute.nproc",
    "jobs": "compute.jobs",
    "cache_dir": "compute.cache_dir",
    "cache": "compute.cache",
    "require_certified": "gate.require_certified",
    "effort": "quantize.effort",
    "latency_ms": "search.latency_ms",
    "device_profile": "search.device_profile",
}


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_ERRORS = 6


def format_key(loc) -> str:
    """A dotted key as TOML writes it: `train.epochs`, `targets.0`, `runtime.config."a b"`."""
    return ".".join(str(p) if isinstance(p, int) or _BARE_KEY.match(p) else one_line(json.dumps(p, ensure_ascii=False))
                    for p in loc)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: `SOURCE: 'key': what; unknown key 'other' (...)`. Every error names its key."""
    parts = []
    errors = err.errors(include_url=False, include_input=False)
    for e in errors[:_MAX_ERRORS]:
        loc = format_key(e.get("loc") or ()) or "(root)"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msg = re.sub(r" for <class '[\w.]+'>", "", msg)  # "Input is not a valid path for <class 'pathlib.Path'>"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (remove it or check its spelling)")
        else:
            parts.append(f"'{loc}': {msg}")
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more")
    return one_line(f"{source}: " + "; ".join(parts))


def toml_kind(value: Any) -> str:
    """What a TOML value is, in TOML's words (for messages)."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array of tables" if value and all(isinstance(v, dict) for v in value) else "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (dt.date, dt.time)):
        return "a date/time"
    return type(value).__name__


def parse_toml(text: str, source: str, fix: str) -> dict[str, Any]:
    """tomllib.loads, every failure a UsageError naming `source` (the parser raises more than TOMLDecodeError:
    ValueError for an integer past Python's digit limit, RecursionError for arrays nested too deep)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(one_line(f"{source}: not valid TOML ({e}); {fix}")) from None
    except ValueError as e:  # drop Python's "; use sys.set_int_max_str_digits()": not the reader's fix
        raise UsageError(one_line(f"{source}: cannot read the TOML ({str(e).split(';')[0]}); {fix}")) from None
    except RecursionError:
        raise UsageError(one_line(f"{source}: cannot read the TOML (arrays or tables nested too deeply); {fix}")) \
            from None


def _table_model(annotation) -> type[BaseModel] | None:
    """The model a field holds, when it is one table (`DataSection`, `QuantizationProfile | None`)."""
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def check_tables(raw: dict[str, Any], model: type[BaseModel], source: str, prefix: tuple = ()) -> None:
    """Every section the schema has as a table is a table in `raw` (before anything walks into it)."""
    for name, info in model.model_fields.items():
        sub = _table_model(info.annotation)
        if sub is None or name not in raw:
            continue
        value, key = raw[name], format_key((*prefix, name))
        if not isinstance(value, dict):
            header = f"[[{key}]]" if toml_kind(value) == "an array of tables" else f"{key} = ..."
            raise UsageError(one_line(f"{source}: '{key}': is {toml_kind(value)} ({header}), not a table; "
                                      f"fix: write one [{key}] table with its keys under it"))
        check_tables(value, sub, source, (*prefix, name))


def check_json_values(value: dict[str, Any]) -> dict[str, Any]:
    """Tables passed on as JSON (runtime settings): strings, finite numbers, booleans, arrays, tables."""
    queue = collections.deque(((k,), v) for k, v in value.items())  # not recursive: nesting can be deep
    while queue:
        loc, v = queue.popleft()
        if isinstance(v, dict):
            queue.extend(((*loc, k), x) for k, x in v.items())
        elif isinstance(v, list):
            queue.extend(((*loc, i), x) for i, x in enumerate(v))
        elif (isinstance(v, float) and not math.isfinite(v)) or not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"'{format_key(loc)}' is {v if isinstance(v, float) else toml_kind(v)}; "
                             "use strings, finite numbers, booleans, arrays or tables")
    return value


# Paths written in a recipe file are relative to that file (flags stay relative to the working dir).
_PATH_KEYS = (("data", "path"), ("model", "weights"), (None, "out"), ("compute", "cache_dir"),
              ("search", "device_profile"))


def _relative_to(raw: dict, base: Path, source: str) -> None:
    for section, key in _PATH_KEYS:
        node = raw.get(section) if section else raw
        if isinstance(node, dict) and isinstance(node.get(key), str):
            if not node[key]:
                node.pop(key)  # "" means "not set" (e.g. data.path = "" -> built-in data)
                continue
            try:
                value = Path(node[key]).expanduser()  # "~nosuchuser/x": RuntimeError; "~\0": ValueError
            except (RuntimeError, ValueError, OSError) as e:
                name = format_key((section, key) if section else (key,))
                raise UsageError(one_line(f"{source}: '{name}': {node[key]!r} is not a usable path ({e}); "
                                          "fix: give a path relative to the recipe, or an absolute one")) from None
            node[key] = str(value if value.is_absolute() else base / value)
    targets = raw.get("targets")
    if isinstance(targets, list):  # profile files named in the recipe are relative to it too
        raw["targets"] = [str(base / t) if isinstance(t, str) and (t.endswith(".toml") or "/" in t)
                          and not Path(t).is_absolute() else t for t in targets]


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    """raw[a][b][c] = value for "a.b.c", making missing tables; a non-table on the way is a UsageError."""
    node = raw
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            key = format_key(parents[: i + 1])
            raise UsageError(one_line(f"{source}: '{key}': is {toml_kind(node)}, not a table, so the option for "
                                      f"'{format_key(dotted.split('.'))}' cannot be set in it; "
                                      f"fix: write [{key}] as one table"))
    node[leaf] = list(value) if isinstance(value, tuple) else value


def load_recipe(path: Path | None = None, overrides: dict[str, Any] | None = None) -> BuildRecipe:
    """Defaults <- TOML file <- overrides (dotted keys). Raises UsageError with the file and key named."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = one_line(str(path))
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"{source}: recipe file not found; fix: check the path or run `edgetl init`") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise UsageError(one_line(f"{source}: cannot read the recipe ({e}); fix: pass a UTF-8 TOML file")) \
                from None
        raw = parse_toml(text, source, "fix the syntax or run `edgetl init`")
        check_tables(raw, BuildRecipe, source)
        _relative_to(raw, Path(path).resolve().parent, source)
    given = {k: v for k, v in (overrides or {}).items() if v is not None and not (isinstance(v, tuple) and not v)}
    if given:
        source = f"{source} + command-line options"
    for dotted, value in given.items():
        _set_dotted(raw, str(dotted), value, source)
    try:
        return BuildRecipe.model_validate(raw)
    except ValidationError as e:
        raise UsageError(format_validation_error(e, source)) from None


def template() -> str:
    """The commented default recipe written by `edgetl init`."""
    from importlib.resources import files

    return files("edgetl").joinpath("recipe_template.toml").read_text(encoding="utf-8")

"""The build recipe: one validated object that flows through every stage.

Sources, later wins: defaults -> recipe TOML -> CLI flags. Validated once, here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(_Section):
    path: Path | None = Field(None, description="ImageFolder or pre-split folder; empty = built-in data")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0, lt=0.6)
    calibration_size: int = Field(128, ge=8, le=4096)


class ModelSection(_Section):
    backbone: str = "mobilenet_v2"
    weights: Path | None = Field(None, description="local .pth state dict; skips the weights search")
    image_size: int | None = Field(None, ge=32, le=1024, description="None = the backbone's native size")


class TrainSection(_Section):
    strategy: Literal["feature-extract", "fine-tune"] = "feature-extract"
    epochs: int = Field(40, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1024)
    lr: float = Field(3e-3, gt=0)
    backbone_lr_scale: float = Field(0.1, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    patience: int = Field(8, ge=1)
    unfreeze_blocks: int = Field(3, ge=-1, description="fine-tune: top N blocks trainable; -1 = all")
    augment_views: int = Field(2, ge=0, le=16, description="augmented copies per training image")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="training and the float reference: auto | cpu | cuda | cuda:N")


class GateSection(_Section):
    """Tolerances. None = take the target profile's value."""

    max_accuracy_drop_pp: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)


class QuantizeSection(_Section):
    escalate: bool = Field(True, description="try the profile's next quantizers when one misses")


class ComputeSection(_Section):
    """How the build uses this machine. None of it changes the results (same seed, same bundle)."""

    workers: int | None = Field(None, ge=0, le=64, description="image decoding workers; None = cores - 1")
    nproc: int = Field(1, ge=1, le=64, description="training processes (torch elastic launch)")
    jobs: int = Field(1, ge=1, le=16, description="targets built at once, the cores shared among them")
    cache: bool = Field(True, description="feature-extract: keep trunk features on disk for the next build")
    cache_dir: Path | None = Field(None, description="None = ~/.cache/edgetl/features ($EDGETL_CACHE/features)")
    timeout_s: float = Field(900, gt=0, description="a process waiting on a failed one gives up after this")


class BuildRecipe(_Section):
    seed: int = Field(0, ge=0, lt=2**32)
    out: Path = Path("edgetl-out")
    targets: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    gate: GateSection = Field(default_factory=GateSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
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
}


def format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (remove it or check its spelling)")
        else:
            parts.append(f"'{loc}': {e['msg']}")
    return f"{source}: " + "; ".join(parts)


# Paths written in a recipe file are relative to that file (flags stay relative to the working dir).
_PATH_KEYS = (("data", "path"), ("model", "weights"), (None, "out"), ("compute", "cache_dir"))


def _relative_to(raw: dict, base: Path) -> None:
    for section, key in _PATH_KEYS:
        node = raw.get(section) if section else raw
        if isinstance(node, dict) and isinstance(node.get(key), str):
            if not node[key]:
                node.pop(key)  # "" means "not set" (e.g. data.path = "" -> built-in data)
                continue
            value = Path(node[key]).expanduser()
            node[key] = str(value if value.is_absolute() else base / value)
    targets = raw.get("targets")
    if isinstance(targets, list):  # profile files named in the recipe are relative to it too
        raw["targets"] = [str(base / t) if isinstance(t, str) and (t.endswith(".toml") or "/" in t)
                          and not Path(t).is_absolute() else t for t in targets]


def load_recipe(path: Path | None = None, overrides: dict[str, Any] | None = None) -> BuildRecipe:
    """Defaults <- TOML file <- overrides (dotted keys). Raises UsageError with the file and key named."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path}: recipe file not found; fix: check the path or run `edgetl init`") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read the recipe ({e}); fix: pass a UTF-8 TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{path}: not valid TOML ({e}); fix the syntax or run `edgetl init`") from None
        _relative_to(raw, Path(path).resolve().parent)
    for dotted, value in (overrides or {}).items():
        if value is None or value == ():
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
        if overrides:
            source = f"{source} + command-line options" if "command-line" not in source else source
    try:
        return BuildRecipe.model_validate(raw)
    except ValidationError as e:
        raise UsageError(format_validation_error(e, source)) from None


def template() -> str:
    """The commented default recipe written by `edgetl init`."""
    from importlib.resources import files

    return files("edgetl").joinpath("recipe_template.toml").read_text(encoding="utf-8")

"""Target profiles: data in targets/*.toml (or a user's file) validated into TargetProfile."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UsageError
from .recipe import format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizationProfile(_Strict):
    quantizers: list[str] = Field(min_length=1)
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    symmetric_activations: bool = False


class Tolerances(_Strict):
    max_accuracy_drop_pp: float = Field(1.0, ge=0)
    min_top1_agreement: float = Field(0.90, ge=0, le=1)
    # The quantizer search (validation split) aims higher than the gate's floor: a model that
    # flips 6 % of validation images is damaged even when its accuracy happens to hold.
    search_top1_agreement: float = Field(0.97, ge=0, le=1)
    export_atol: float = Field(1e-3, gt=0)


class TargetProfile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="bundle folder name: OUT/<name>/")
    backend: str
    description: str = ""
    opset: int = Field(17, ge=13, le=23)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    quantization: QuantizationProfile
    tolerances: Tolerances = Field(default_factory=Tolerances)
    source: str = Field("", exclude=True)


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in files("edgetl").joinpath("targets").iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> TargetProfile:
    """A built-in name (`cpu`) or a path to a profile TOML."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"--target {name_or_path}: profile file not found; fix: check the path")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--target {name_or_path}: cannot read the profile ({e}); "
                             "fix: pass a UTF-8 TOML file") from None
    else:
        if name_or_path not in builtin_names():
            raise UsageError(
                f"--target {name_or_path}: unknown target; fix: use one of {', '.join(builtin_names())} "
                "or a path to a profile .toml"
            )
        res = files("edgetl").joinpath("targets", f"{name_or_path}.toml")
        text, source = res.read_text(encoding="utf-8"), f"built-in target '{name_or_path}'"
    try:
        data = tomllib.loads(text)
        profile = TargetProfile.model_validate(data)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{source}: not valid TOML ({e})") from None
    except ValidationError as e:
        raise UsageError(format_validation_error(e, source)) from None
    profile.source = source
    return profile

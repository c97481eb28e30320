"""Target profiles: data in targets/*.toml (or a user's file) validated into TargetProfile."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    preset: Literal["mixed", "performance"] | None = None  # NNCF preset; default: from symmetric_activations
    bias_correction: Literal["full", "fast"] = "full"  # NNCF; MobileNetV3/hard-swish nets need "full"
    # NNCF accuracy control (the `mixed_precision` quantizer) stops, and the candidate is dropped,
    # past this many seconds: it is the last resort, not the usual path.
    mixed_precision_budget_s: float = Field(60.0, gt=0)
    # `qat` (quantization-aware training with the float model as teacher): epochs over the
    # training views, AdamW learning rate, and a wall-clock budget (the epoch is chosen on val).
    qat_epochs: int = Field(2, ge=1, le=50)
    qat_lr: float = Field(1e-5, gt=0, le=1e-2)
    qat_budget_s: float = Field(180.0, gt=0)
    # Op types left in float by every quantizer (e.g. ["Gemm"]: a fine-tuned classifier head is
    # tiny but carries the low-margin decision; quantizing it costs agreement and buys no speed).
    float_op_types: list[str] = Field(default_factory=list)


class Tolerances(_Strict):
    max_accuracy_drop_pp: float = Field(1.0, ge=0)
    min_top1_agreement: float = Field(0.90, ge=0, le=1)
    # The quantizer search (validation split) aims higher than the gate's floor: a model that
    # flips 6 % of validation images is damaged even when its accuracy happens to hold.
    search_top1_agreement: float = Field(0.97, ge=0, le=1)
    export_atol: float = Field(1e-3, gt=0)
    # Float (FP16/FP32) models of a target must agree with the float reference almost everywhere.
    float_min_top1_agreement: float = Field(0.995, ge=0, le=1)


class RuntimeSettings(_Strict):
    """Written to the bundle's runtime.json "settings"; the device may override any of them."""

    # OpenVINO device name (case matters): CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU, HETERO:..., MULTI:...
    device: str = Field("CPU", pattern=r"^(CPU|GPU(\.\d+)?|NPU|(AUTO|HETERO|MULTI)(:[A-Z0-9.,]+)?)$")
    performance_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = "LATENCY"
    static_batch: bool = True  # OpenVINO: compile a static-shape model per batch size
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # onnxruntime
    strict_providers: bool = False  # onnxruntime: fail instead of falling back to the CPU provider
    config: dict[str, Any] = Field(default_factory=dict)  # OpenVINO properties


class TargetProfile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="bundle folder name: OUT/<name>/")
    backend: str
    description: str = ""
    opset: int = Field(17, ge=13, le=23)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    # The models a bundle carries, first = default. int8 goes through the quantizer search;
    # fp16/fp32 are conversions. Each one is gated on its own.
    precisions: list[Literal["int8", "fp16", "fp32"]] = Field(default_factory=lambda: ["int8"], min_length=1)
    quantization: QuantizationProfile | None = None  # required when precisions has int8
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    # Where this profile's models are checked at build time, when that differs from where they
    # will run (e.g. GPU models validated on the CPU provider). Recorded in the manifest.
    validate_providers: list[str] | None = Field(None, min_length=1)
    tolerances: Tolerances = Field(default_factory=Tolerances)
    # Speed evidence: every model is timed against the FP32 model at batch 1 and at this batch.
    speed_batch: int = Field(8, ge=1, le=256)
    source: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions {self.precisions} lists one twice")
        if self.quantization and len(set(self.quantization.quantizers)) != len(self.quantization.quantizers):
            raise ValueError(f"quantization.quantizers {self.quantization.quantizers} lists one twice")
        if "int8" in self.precisions and self.quantization is None:
            raise ValueError("precisions has int8: add a [quantization] table with quantizers = [...]")
        return self


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

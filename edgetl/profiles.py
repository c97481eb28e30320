"""Target profiles: data in targets/*.toml (or a user's file) validated into TargetProfile."""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import UsageError
from .recipe import check_json_values, check_tables, format_validation_error, one_line, parse_toml

log = logging.getLogger(__name__)

# Tables passed on to the runtime as JSON (runtime.json): no dates, no nan/inf.
_JsonTable = Annotated[dict[str, Any], AfterValidator(check_json_values)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _once_each(v: list) -> list:
    if len(set(v)) != len(v):
        raise ValueError(f"{v} lists one twice")
    return v


class QuantizationProfile(_Strict):
    quantizers: Annotated[list[str], AfterValidator(_once_each)] = Field(min_length=1, description=(
        "the INT8 search's candidates in order, cheapest first: `quantizer[+refiner...]` (quantizers nncf_ptq, "
        "ort_static (onnxruntime only), mixed_precision; refiner head_refit) or `qat[+head_refit]`; search.md"))
    per_channel: bool = Field(True, description="per-channel weight scales")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description=(
        "INT8 activation type (also shapes NNCF's output: uint8 for CPU, int8 for TensorRT)"))
    weight_type: Literal["int8", "uint8"] = Field("int8", description="onnxruntime static PTQ weight type")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description=(
        "onnxruntime static PTQ calibration"))
    symmetric_activations: bool = Field(False, description=(
        "zero-point-0 activations (TensorRT-style S8S8); also NNCF's default preset"))
    preset: Literal["mixed", "performance"] | None = Field(None, description=(
        "NNCF preset; None = from symmetric_activations"))
    bias_correction: Literal["full", "fast"] = Field("full", description=(
        "NNCF bias correction (MobileNetV3 / hard-swish nets need full)"))
    # x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) multiply u8 x s8 pairs into int16 with
    # saturation (vpmaddubsw): 8-bit weights can overflow there and nowhere else, so the same model
    # computes other numbers on a VNNI CPU or an ARM core. 7-bit weights cannot overflow.
    overflow_fix: Literal["enable", "first_layer", "disable"] = Field("first_layer", description=(
        "7-bit weights against the int16 saturation of x86 CPUs without VNNI: enable = every convolution and "
        "matmul (nncf_ptq, mixed_precision, qat; onnxruntime's reduce_range for ort_static; the head refit keeps "
        "the grid); the model then computes the same numbers on every CPU. first_layer = NNCF's first "
        "convolution only (ort_static, qat: none), disable = none; the pixel-input fold is 7-bit regardless "
        "(measurements.md)"))
    # How NNCF sets each activation quantizer's range from the calibration images (one image at a time):
    # NNCF's default averages each image's min and max; "mean_quantile" averages each image's
    # 0.01 % / 99.99 % quantiles instead. No built-in profile changes the default: measured on the val
    # evidence (docs/measurements.md) mean_quantile lowered the logit error on the real-photo proxy and
    # on digits but raised it on the built-in data, agreement moved either way by a few images, and its
    # statistics cost ~13 s more there.
    activation_range: Literal["mean_minmax", "mean_quantile", "histogram", "minmax"] = Field(
        "mean_minmax", description=(
            "NNCF activation range estimator (nncf_ptq, mixed_precision, qat's initial ranges): mean_minmax = "
            "NNCF's default (per-image min / max, averaged), mean_quantile = per-image 1e-4 quantiles, averaged; "
            "histogram = NNCF's error-minimising histogram; minmax = the extremes over all images (qat's "
            "statistics are per batch of 16, not per image)"))
    # ort_static: biases as INT32 behind DequantizeLinear (onnxruntime's default) or left float.
    # TensorRT's ONNX parser has rejected INT32 bias DQs: its profiles leave biases float.
    quantize_bias: bool = Field(True, description=(
        "ort_static: biases as INT32 behind DequantizeLinear; false leaves them float (TensorRT's ONNX parser "
        "has rejected INT32 bias DequantizeLinear: gpu-int8)"))
    # Work is bounded in steps and evaluations, never in seconds, so that a slow or loaded machine
    # ships the same bytes. `qat`: AdamW steps over the training views (batch 16): qat_epochs epochs,
    # at most qat_max_steps; the checkpoint (step 0, i.e. "no training", or one of qat_checkpoints
    # marks spread over the steps) is the one with the lowest val logit error. qat_loss "mse+kl" adds
    # a KL term on logits softened by qat_temperature. `mixed_precision`: at most 6 restore steps,
    # layer sensitivity ranked on 32 val images.
    qat_epochs: int = Field(2, ge=1, le=50, description="qat: epochs over the training views (batch 16)")
    qat_max_steps: int = Field(96, ge=1, le=100_000, description="qat: at most this many AdamW steps")
    qat_checkpoints: int = Field(4, ge=1, le=64, description=(
        "qat: checkpoints spread over the steps; the one (or step 0) with the lowest val logit error ships"))
    qat_lr: float = Field(1e-5, gt=0, le=1e-2, description="qat: AdamW learning rate")
    qat_loss: Literal["mse", "mse+kl"] = Field("mse", description=(
        "qat: distillation loss on the float model's logits; mse+kl adds a KL term"))
    qat_temperature: float = Field(2.0, gt=0, le=100, description="qat: KL temperature (qat_loss = mse+kl)")
    # Optional wall-clock limits (seconds; none by default). Past one, the *whole* candidate is
    # dropped, loudly (a warning in the manifest says the bundle then depends on the machine's
    # speed); a candidate is never shortened by the clock.
    qat_budget_s: float | None = Field(None, gt=0, description=(
        "optional wall-clock limit on qat, seconds: past it the whole candidate is dropped, with a manifest "
        "warning (never shortened); None = no limit"))
    mixed_precision_budget_s: float | None = Field(None, gt=0, description=(
        "optional wall-clock limit on mixed_precision, as qat_budget_s"))
    # Deprecated, ignored: the search no longer projects a candidate's reach (docs/search.md; the
    # recipe's quantize.effort says what runs). Accepted so that older profiles still load.
    escalate_noise_cut: float | None = Field(None, ge=0, le=1, description="deprecated, ignored (a warning says so)")
    # Op types left in float by every quantizer (e.g. ["Gemm"]: a fine-tuned classifier head is
    # tiny but carries the low-margin decision; quantizing it costs agreement and buys no speed).
    float_op_types: list[str] = Field(default_factory=list, description=(
        "op types every quantizer leaves in float, e.g. [\"Gemm\"]"))

    @field_validator("escalate_noise_cut")
    @classmethod
    def _deprecated(cls, v: float | None):
        if v is not None:
            log.warning("quantization.escalate_noise_cut is deprecated and ignored (the search runs what "
                        "quantize.effort says: docs/search.md); remove it from the profile")
        return v


class Tolerances(_Strict):
    max_accuracy_drop_pp: float = Field(1.0, ge=0, description=(
        "the gate: tolerance on the test split's accuracy drop, percentage points (recipe gate.* overrides)"))
    min_top1_agreement: float = Field(0.90, ge=0, le=1, description=(
        "the gate: floor on top-1 agreement with the float model on the test split"))
    # The quantizer search (validation split) aims higher than the gate's floor: a model that
    # flips 6 % of validation images is damaged even when its accuracy happens to hold.
    search_top1_agreement: float = Field(0.97, ge=0, le=1, description=(
        "the INT8 search's target on the val evidence, overall"))
    # ... and on clear images (float top-1 minus top-2 probability >= parity.MARGIN, 0.2): the flips a
    # user notices. Borderline images flip whatever the quantizer; images the float model is sure of
    # should not. Missing it is also what makes the default effort run the expensive candidates.
    # Judged on the val evidence's estimate (about +-1.5 pp on ~120 images), hence under the 0.99 a
    # release may want on a large test split (docs/search.md).
    search_clear_agreement: float = Field(0.98, ge=0, le=1, description=(
        "the INT8 search's target on the val evidence's clear images (float margin >= 0.2)"))
    export_atol: float = Field(1e-3, gt=0, description="the export check: ONNX logits against torch's")
    # Float (FP16/FP32) models of a target must agree with the float reference almost everywhere.
    float_min_top1_agreement: float = Field(0.995, ge=0, le=1, description=(
        "the gate for FP16/FP32 models: floor on top-1 agreement with the float reference"))


class RuntimeSettings(_Strict):
    """Written to the bundle's runtime.json "settings"; the device may override any of them."""

    # OpenVINO device name (case matters): CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU, HETERO:..., MULTI:...
    device: str = Field("CPU", pattern=r"^(CPU|GPU(\.\d+)?|NPU|(AUTO|HETERO|MULTI)(:[A-Z0-9.,]+)?)$",
                        description="OpenVINO device: CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU, HETERO:..., MULTI:...")
    performance_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = Field(
        "LATENCY", description="OpenVINO performance hint")
    static_batch: bool = Field(True, description="OpenVINO: compile a static-shape model per batch size")
    provider_options: dict[str, _JsonTable] = Field(default_factory=dict, description=(
        "onnxruntime: options per provider name (TensorRT, CUDA)"))
    strict_providers: bool = Field(False, description=(
        "onnxruntime: fail instead of falling back to another provider (checked on the session made; "
        "without it a warning names the provider that runs)"))
    config: _JsonTable = Field(default_factory=dict, description="OpenVINO properties, passed to compile_model")


class TargetProfile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="bundle folder name: OUT/<name>/")
    backend: str = Field(description="onnxruntime or openvino")
    description: str = Field("", description="one line shown by `edgetl targets`")
    opset: int = Field(17, ge=13, le=23, description="ONNX opset of the exported models")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1, description=(
        "onnxruntime execution providers in order, for the device"))
    # The models a bundle carries, first = default. int8 goes through the quantizer search;
    # fp16/fp32 are conversions. Each one is gated on its own.
    precisions: Annotated[list[Literal["int8", "fp16", "fp32"]], AfterValidator(_once_each)] = Field(
        default_factory=lambda: ["int8"], min_length=1, description=(
            "the models in the bundle, first = default; int8 goes through the search, each is gated on its own"))
    # Required when precisions has int8 (checked here, after precisions: an error names `quantization`).
    quantization: QuantizationProfile | None = Field(None, validate_default=True, description=(
        "the INT8 search and its quantizers; required when precisions has int8"))
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    # Where this profile's models are checked at build time, when that differs from where they
    # will run (e.g. GPU models validated on the CPU provider). Recorded in the manifest.
    validate_providers: list[str] | None = Field(None, min_length=1, description=(
        "onnxruntime providers for the build's gate when they differ from the device's; None = providers"))
    tolerances: Tolerances = Field(default_factory=Tolerances)
    # What the models take (model_input.py): "uint8-nhwc" raw RGB pixels at the input size, the
    # normalisation inside the model; "float32-nchw" the normalised tensor of preprocess.json.
    model_input: Literal["uint8-nhwc", "float32-nchw"] = Field("float32-nchw", description=(
        "uint8-nhwc: the models take raw RGB pixels, normalisation inside; float32-nchw: the normalised "
        "tensor of preprocess.json"))
    # The CPU architecture the bundle is for, when it is not the build machine's (e.g. "aarch64"): the
    # gate then says on which architecture it validated.
    arch: str | None = Field(None, pattern=r"^[a-z0-9_]+$", description=(
        "the CPU architecture the bundle is for when not the build machine's (aarch64): the manifest's "
        "validated_with then says where the gate ran"))
    # Speed evidence: every model is timed against the FP32 model at batch 1 and at this batch.
    speed_batch: int = Field(8, ge=1, le=256, description="the speed evidence's batch besides 1")
    source: str = Field("", exclude=True)

    @field_validator("quantization")
    @classmethod
    def _int8_needs_quantization(cls, v: QuantizationProfile | None, info: ValidationInfo):
        if v is None and "int8" in info.data.get("precisions", ()):
            raise ValueError("missing: precisions has int8, so add a [quantization] table with quantizers = [...]")
        return v


def builtin_names() -> list[str]:
    """Names of the profiles shipped in edgetl/targets/."""
    return sorted(p.name[:-5] for p in files("edgetl").joinpath("targets").iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> TargetProfile:
    """A built-in name (`cpu`) or a path to a profile TOML. Raises UsageError with the file and key named."""
    shown = one_line(name_or_path)
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"--target {shown}: profile file not found; fix: check the path")
        try:
            text, source = path.read_text(encoding="utf-8"), shown
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(one_line(f"--target {shown}: cannot read the profile ({e}); "
                                      "fix: pass a UTF-8 TOML file")) from None
    else:
        if name_or_path not in builtin_names():
            raise UsageError(
                f"--target {shown}: unknown target; fix: use one of {', '.join(builtin_names())} "
                "or a path to a profile .toml"
            )
        res = files("edgetl").joinpath("targets", f"{name_or_path}.toml")
        text, source = res.read_text(encoding="utf-8"), f"built-in target '{name_or_path}'"
    data = parse_toml(text, source, "fix the syntax (the built-in profiles in edgetl/targets/ are examples)")
    check_tables(data, TargetProfile, source)
    try:
        profile = TargetProfile.model_validate(data)
    except ValidationError as e:
        raise UsageError(format_validation_error(e, source)) from None
    profile.source = source
    return profile

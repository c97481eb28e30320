"""What a build found, as typed records from the stage that makes them to the report and the manifest.

`QuantizationRecord` (the INT8 search: chosen candidate, attempts, float layers, what refiners
chose), `ModelResult` (one model of a target: metrics, misses, sizes, speed), `TargetResult` (one
target: its models, published or not, its error) and `BuildResult` (the whole build). Each
`to_dict()` is what report.json and manifest.json carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .model_input import FLOAT, RAW
from .parity import ParityReport


@dataclass
class QuantizationRecord:
    """The INT8 search of one model: what shipped, every attempt, the layers left in float."""

    chosen: str | None = None
    attempts: list[dict] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    tolerances: dict | None = None
    judged_on: str | None = None
    refiners: dict = field(default_factory=dict)  # record key (qat, refit) -> what that refiner chose

    def to_dict(self) -> dict:
        d = {"chosen": self.chosen, "attempts": self.attempts, "float_nodes": self.float_nodes}
        if self.tolerances is not None:
            d.update(tolerances=self.tolerances, judged_on=self.judged_on)
        return {**d, **self.refiners}

    @classmethod
    def from_dict(cls, d: dict) -> QuantizationRecord:
        own = {"chosen", "attempts", "float_nodes", "tolerances", "judged_on"}
        return cls(**{k: v for k, v in d.items() if k in own}, refiners={k: v for k, v in d.items() if k not in own})


@dataclass
class ModelResult:
    """One model of a target (one precision), gated on the test split."""

    precision: str
    metrics: ParityReport
    misses: list[str]
    quantization: QuantizationRecord | None
    sizes: dict
    validated_with: str
    files: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    speed: dict = field(default_factory=dict)  # batch_<n>: vs the FP32 model through the same runtime, interleaved
    model_input: str = FLOAT  # what the model takes (model_input.py): RAW, uint8 NHWC pixels
    certified: bool | None = None  # the test split certifies the drop tolerance; None: not recorded (older edgetl)

    def to_dict(self) -> dict:
        return {"precision": self.precision, "model_input": self.model_input, "files": self.files,
                "metrics": self.metrics.to_dict(), "certified": self.certified,
                "misses": self.misses, "quantization": self.quantization.to_dict() if self.quantization else None,
                "sizes": self.sizes, "latency_ms": self.latency_ms, "speed": self.speed,
                "validated_with": self.validated_with}

    @classmethod
    def from_dict(cls, d: dict) -> ModelResult:
        q = d.get("quantization")
        metrics = ParityReport.from_dict(d["metrics"])
        return cls(d["precision"], metrics, d["misses"],
                   QuantizationRecord.from_dict(q) if q is not None else None, d["sizes"], d["validated_with"],
                   d.get("files", []), d.get("latency_ms", 0.0), d.get("speed", {}),
                   d.get("model_input", FLOAT), d.get("certified", metrics.gate_rule.get("certified")))

    def status(self, published: bool) -> str:
        """The report's status column: FAILED (missed its gate), published (", NOT CERTIFIED" when the
        test split cannot certify its drop tolerance) or not published (another model of its target failed)."""
        if self.misses:
            return "FAILED"
        return published_status(published, self.certified) if published else "not published"

    @property
    def takes_pixels(self) -> bool:
        """Does the model take raw uint8 pixels (its normalisation inside)?"""
        return self.model_input == RAW

    def summary(self) -> str:
        """"int8: accuracy 0.9561 (drop +0.88 pp), agreement 0.9693": the one-line form everywhere."""
        m = self.metrics
        return (f"{self.precision}: accuracy {m.accuracy:.4f} (drop {m.accuracy_drop_pp:+.2f} pp), "
                f"agreement {m.top1_agreement:.4f}")


@dataclass
class TargetResult:
    """One target: its models (the default first), published or not, or the error that stopped it."""

    target: str
    published: bool = False
    bundle: str | None = None
    models: list[ModelResult] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: dict | None = None  # the target could not be built (not a gate miss): message, exit code

    @property
    def certified(self) -> bool | None:
        """Every model's drop tolerance certified by the test split (None: not recorded, or no model)."""
        flags = [m.certified for m in self.models]
        return None if not flags or None in flags else all(flags)

    @property
    def status(self) -> str:
        """"published", "published, NOT CERTIFIED", "GATE FAILED, nothing published" or "COULD NOT BE
        BUILT, nothing published": the CLI line, the manifest and --json say the same."""
        if self.error:
            return "COULD NOT BE BUILT, nothing published"
        return published_status(self.published, self.certified) if self.published else "GATE FAILED, nothing published"

    @property
    def quantization(self) -> QuantizationRecord:
        """The INT8 model's search (an empty record when the target has none)."""
        return next((m.quantization for m in self.models if m.quantization), QuantizationRecord())

    def to_dict(self) -> dict:
        """report.json's target entry; metrics, sizes and validated_with are the default model's."""
        default = self.models[0] if self.models else None
        return {"target": self.target, "published": self.published, "status": self.status,
                "certified": self.certified, "bundle": self.bundle,
                "metrics": default.metrics.to_dict() if default else {}, "misses": self.misses,
                "quantization": self.quantization.to_dict(), "sizes": default.sizes if default else {},
                "warnings": self.warnings, "models": [m.to_dict() for m in self.models],
                "validated_with": default.validated_with if default else None, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> TargetResult:
        return cls(d["target"], d["published"], d.get("bundle"), [ModelResult.from_dict(m) for m in d["models"]],
                   d.get("misses", []), d.get("warnings", []), d.get("error"))


NOT_CERTIFIED = "published, NOT CERTIFIED"


def published_status(published: bool, certified: bool | None) -> str:
    """A published model or target's status: NOT CERTIFIED when its test split cannot certify the drop
    tolerance (None, an older record without the flag, reads as published)."""
    if not published:
        return "not published"
    return NOT_CERTIFIED if certified is False else "published"


def failed_target(name: str, message: str, exit_code: int) -> TargetResult:
    """A target that could not be built (an error, not a gate miss)."""
    return TargetResult(name, misses=[message], error={"message": message, "exit_code": exit_code})


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
    search: dict | None = None  # the budget search (budget.py), when one chose the configuration

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["targets"] = [t.to_dict() for t in self.targets]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BuildResult:
        """report.json (or `edgetl build --json`) read back."""
        known = {f.name for f in fields(cls)}
        rest = {k: v for k, v in d.items() if k in known and k != "targets"}
        return cls(targets=[TargetResult.from_dict(t) for t in d["targets"]], **rest)

    @property
    def exit_code(self) -> int:
        """0 all published; 1 a gate failed; the worst error's code when a target could not be built."""
        errors = [t.error["exit_code"] for t in self.targets if t.error]
        return max(errors) if errors else (0 if self.ok else 1)

"""What a build found, as typed records from the stage that makes them to the report and the manifest.

`QuantizationRecord` (the INT8 search: chosen candidate, attempts, float layers, what refiners
chose), `ModelResult` (one model of a target: metrics, misses, sizes, speed), `TargetResult` (one
target: its models, published or not, its error) and `BuildResult` (the whole build). Each
`to_dict()` is what report.json and manifest.json carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class ModelResult:
    """One model of a target (one precision), gated on the test split."""

    precision: str
    metrics: dict
    misses: list[str]
    quantization: QuantizationRecord | None
    sizes: dict
    validated_with: str
    files: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    speed: dict = field(default_factory=dict)  # batch_<n>: vs the FP32 model through the same runtime, interleaved

    def to_dict(self) -> dict:
        return {"precision": self.precision, "files": self.files, "metrics": self.metrics, "misses": self.misses,
                "quantization": self.quantization.to_dict() if self.quantization else None, "sizes": self.sizes,
                "latency_ms": self.latency_ms, "speed": self.speed, "validated_with": self.validated_with}


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
    models: list[dict] = field(default_factory=list)  # ModelResult.to_dict() of each precision
    validated_with: str | None = None
    error: dict | None = None  # the target could not be built (not a gate miss): message, exit code

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def failed_target(name: str, message: str, exit_code: int) -> TargetResult:
    """A target that could not be built (an error, not a gate miss)."""
    return TargetResult(name, False, None, {}, [message], QuantizationRecord().to_dict(), {},
                        error={"message": message, "exit_code": exit_code})


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

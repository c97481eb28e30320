"""Typed hand-offs between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .runtime.integrity import file_sha256

__all__ = ["Artifact", "file_sha256"]


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str  # "onnx-fp32", "onnx-int8", ...
    sha256: str
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, path: Path, kind: str, **meta) -> Artifact:
        return cls(Path(path), kind, file_sha256(path), meta)

    @property
    def files(self) -> list[Path]:
        """The model file and its companions (e.g. an OpenVINO IR's .bin)."""
        return [self.path, *(Path(p) for p in self.meta.get("companions", ()))]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

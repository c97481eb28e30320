"""Progress reporting seam: stages call `progress.track(...)`; the CLI decides how it looks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, iterable: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]: ...

    def stage(self, name: str) -> None: ...


class NullProgress:
    """Quiet: no output. The default for library callers and --quiet."""

    def track(self, iterable, *, total=None, description=""):
        return iter(iterable)

    def stage(self, name: str) -> None:
        pass

"""The build machine: what it is, how much memory a process holds, how long each stage took.

Measurements only (the report's evidence): nothing here may change what a build ships. The bundle
runtime (runtime/predict.py) keeps its own RSS reader, since a bundle carries no edgetl code.
"""

from __future__ import annotations

import os
import platform
import time


def machine_info() -> dict:
    """CPU model, cores (and those this process may use), system and Python: the machine a report's
    figures were measured on."""
    from .threads import allowed

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "cpus_allowed": allowed(), "system": platform.system(),
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB."""
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except ImportError:  # pragma: no cover (Windows)
        return float("nan")


def current_rss_mb() -> float:
    """This process's resident memory now, MB."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):  # pragma: no cover (not Linux)
        return float("nan")


class Clock:
    """Seconds and the process's peak RSS after each stage (evidence for the report)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, float] = {}

    def lap(self, name: str, since: float | None = None) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - (self.last if since is None else since), 3)
        self.peak_rss[name] = peak_rss_mb()
        self.last = now

    def total(self) -> None:
        self.timings["total"] = round(time.perf_counter() - self.start, 3)

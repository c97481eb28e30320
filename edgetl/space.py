"""Disk space: what a build needs where, a warning before the work when it looks short, and one
clear error when a write finds the disk full (the previous bundle stays; nothing is staged)."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskFullError

log = logging.getLogger(__name__)
MB = 1e6
# Bytes of a target's bundle per precision, as a share of the FP32 model, and fixed extras.
_SHARE = {"int8": 0.3, "fp16": 0.55, "fp32": 1.05}
_BUNDLE_EXTRA = 2 * MB  # runtime files, golden images, manifest
_WORK_EXTRA = 64 * MB  # quantizer scratch (NNCF statistics, ORT pre-processed models)


@dataclass(frozen=True)
class Needs:
    """Rough upper figures for one build: the temporary folder and OUT."""

    work_dir: Path
    out_dir: Path
    work_bytes: float
    out_bytes: float

    def line(self) -> str:
        return (f"a build needs about {self.work_bytes / MB:.0f} MB in the temporary folder {self.work_dir} "
                f"(TMPDIR moves it) and {self.out_bytes / MB:.0f} MB in OUT {self.out_dir}")


def needs(*, n_crops: int, input_size: tuple[int, int], fp32_bytes: float, precisions: list[list[str]],
          out: Path) -> Needs:
    """n_crops uint8 crops (val + test + calibration), the exported and quantized models of every
    target (`precisions`: one list per target) in the temporary folder; the bundles in OUT."""
    crops = n_crops * input_size[0] * input_size[1] * 3
    models = sum(sum(_SHARE[p] for p in target) for target in precisions)
    work = crops + fp32_bytes * (3 + 3 * models) + _WORK_EXTRA
    outb = sum(fp32_bytes * sum(_SHARE[p] for p in target) + _BUNDLE_EXTRA for target in precisions)
    return Needs(Path(tempfile.gettempdir()), Path(out).resolve(), work, outb)


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (OUT may not exist yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free(path: Path) -> float | None:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def shortfalls(n: Needs) -> list[str]:
    """Warnings, before any heavy work, where a folder's file system has less free space than needed
    (one line for a shared file system)."""
    work_free, out_free = _free(n.work_dir), _free(n.out_dir)
    same = _device(n.work_dir) == _device(n.out_dir)
    if same and work_free is not None and work_free < n.work_bytes + n.out_bytes:
        return [f"only {work_free / MB:.0f} MB free where the temporary folder and OUT are; {n.line()}"]
    out = []
    if not same and work_free is not None and work_free < n.work_bytes:
        out.append(f"only {work_free / MB:.0f} MB free in the temporary folder {n.work_dir}; {n.line()}")
    if not same and out_free is not None and out_free < n.out_bytes:
        out.append(f"only {out_free / MB:.0f} MB free in OUT {n.out_dir}; {n.line()}")
    return out


def _device(path: Path) -> int | None:
    try:
        return _existing(path).stat().st_dev
    except OSError:
        return None


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT from Python, or the same words from a native library (onnx, OpenVINO, ORT)."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if err is not None and ("No space left on device" in str(err) or "Disk quota exceeded" in str(err)):
            return True
    return False


def _written_path(e: BaseException) -> Path | None:
    """The file a failed write was writing: a copy's destination (filename2) before its source."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and (err.filename2 or err.filename):
            return Path(err.filename2 or err.filename)
    return None


def _where(path: Path | None, n: Needs | None) -> str:
    if n is None:
        return str(path.parent) if path is not None else "the disk"
    places = {f"OUT {n.out_dir}": (n.out_dir, n.out_bytes),
              f"the temporary folder {n.work_dir}": (n.work_dir.resolve(), n.work_bytes)}
    if path is not None:
        resolved = path.resolve()
        for name, (folder, _) in places.items():
            if resolved == folder or folder in resolved.parents:
                return name
        return str(path.parent)
    # No file named (a native library's message): the folder that is short of what it needs.
    short = [name for name, (folder, need) in places.items() if (_free(folder) or 0) < need]
    return " or ".join(short) if short else " or ".join(places)


def explain(e: BaseException, n: Needs | None) -> DiskFullError:
    """One line: which folder filled, how much is free there now, what a build needs, the fix."""
    path = _written_path(e)
    free = _free(path.parent) if path is not None else None
    free_text = f", {free / MB:.0f} MB free there now" if free is not None else ""
    writing = f" (writing {path.name})" if path is not None else ""
    need = f"; {n.line()}" if n is not None else ""
    return DiskFullError(f"no space left on device: {_where(path, n)} filled up{free_text}{writing}{need}; "
                         "nothing was published for the target(s) it stopped; fix: free space, or point "
                         "TMPDIR / --out at a larger disk")

"""The frozen-trunk feature cache: float16 rows in memory-mappable shards on disk.

A row is one image view through the pretrained trunk. Its key is the image's content hash and the
view (clean, or augmented with its seed) within a *namespace*: backbone, weights sha256,
preprocessing contract, the runtime that computed it and the format version. A rebuild with the
same data and backbone reads every row and skips the trunk; a changed image misses its rows only.

Layout: DIR/<namespace digest>/<shard>.npy (float16, rows x features) + <shard>.keys.npy (one hex
key per row) + namespace.json (what the digest stands for). A build writes its misses as one new
shard, atomically (temporary names, then rename: data first, keys last — a shard is visible only
once complete), so concurrent builds and interrupted ones never leave a half-written row. Rows
are always float16, also with the cache off, so a cached build and an uncached one are the same.
A namespace may hold float32 rows instead (`dtype`; its digest says so): the float reference's
trunk rows (edgetl/reference.py), which the float model's logits are computed from exactly.

Default DIR: edgetl's cache folder ($EDGETL_CACHE, else $XDG_CACHE_HOME/edgetl, else ~/.cache/edgetl)
/ features.
Nothing is evicted: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
FORMAT = 1
READ_ROWS = 4096  # rows copied out of a shard per mapping (keeps the mapped pages out of RSS)


def default_dir() -> Path:
    """edgetl's cache folder ($EDGETL_CACHE, else $XDG_CACHE_HOME/edgetl or ~/.cache/edgetl) / features."""
    from .synthetic import default_cache_dir

    return default_cache_dir() / "features"


@dataclass
class CacheStats:
    """What the report says about the feature stage."""

    enabled: bool
    dir: str | None = None
    rows: int = 0
    hits: int = 0
    computed: int = 0
    written: str | None = None  # the shard this build added
    seconds_read: float = 0.0
    seconds_computed: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class FeatureCache:
    """One namespace of the cache (see the module docstring)."""

    def __init__(self, root: Path, namespace: dict, dtype=np.float16):
        self.dtype = np.dtype(dtype)
        if self.dtype != np.float16:  # float16 namespaces keep the digests they always had
            namespace = {**namespace, "dtype": self.dtype.name}
        self.namespace = namespace
        digest = hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(root) / digest

    def row_keys(self, parts: Iterable[str]) -> list[str]:
        return [hashlib.sha256(p.encode()).hexdigest()[:32] for p in parts]

    def _shards(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.keys.npy") if not p.name.startswith("."))

    def find(self, keys: Sequence[str]) -> dict[Path, list[tuple[int, int]]]:
        """shard data file -> [(wanted index, shard row)] for every key the cache holds."""
        wanted: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            wanted.setdefault(k, []).append(i)
        found: dict[Path, list[tuple[int, int]]] = {}
        seen: set[str] = set()
        for keys_file in self._shards():
            data = keys_file.with_name(keys_file.name.removesuffix(".keys.npy") + ".npy")
            try:
                shard_keys = np.load(keys_file, allow_pickle=False)
                shape = np.load(data, mmap_mode="r", allow_pickle=False).shape
                if len(shape) != 2 or shape[0] != len(shard_keys):
                    raise ValueError(f"{len(shard_keys)} keys for rows of shape {shape}")
            except (OSError, ValueError, EOFError) as e:  # EOFError: a zero-length file
                log.warning("feature cache: skipping unreadable shard %s (%s: %s)", data, type(e).__name__, e)
                continue
            for row, k in enumerate(shard_keys.astype(str).tolist()):
                if k in wanted and k not in seen:
                    seen.add(k)
                    found.setdefault(data, []).extend((i, row) for i in wanted[k])
        return found

    @staticmethod
    def read_into(out: np.ndarray, data: Path, pairs: list[tuple[int, int]]) -> None:
        """Copy shard rows into out[wanted index], a block of rows per mapping."""
        pairs = sorted(pairs, key=lambda p: p[1])
        for s in range(0, len(pairs), READ_ROWS):
            block = pairs[s:s + READ_ROWS]
            mm = np.load(data, mmap_mode="r", allow_pickle=False)
            if mm.ndim != 2 or mm.shape[1] != out.shape[1]:
                raise ValueError(f"{data}: shape {mm.shape}, expected rows of {out.shape[1]}")
            out[[i for i, _ in block]] = mm[[r for _, r in block]]
            del mm

    def write(self, keys: Sequence[str], rows: np.ndarray) -> Path:
        """A new shard with these rows, atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "namespace.json"
        if not meta.exists():
            _atomic(meta, lambda f: f.write(json.dumps(self.namespace, indent=1, sort_keys=True).encode()))
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        data = self.dir / f"{name}.npy"
        _atomic(data, lambda f: np.save(f, np.ascontiguousarray(rows, dtype=self.dtype), allow_pickle=False))
        _atomic(self.dir / f"{name}.keys.npy", lambda f: np.save(f, np.asarray(keys, dtype="S32"), allow_pickle=False))
        return data


def _atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


Compute = Callable[[Sequence[int]], Iterable[tuple[Sequence[int], np.ndarray]]]


def rows(parts: Sequence[str], compute: Compute, cache: FeatureCache | None, ranks=None,
         stats: CacheStats | None = None, dtype=None) -> np.ndarray | None:
    """Rows for `parts` (one key part per row; float16 unless `dtype` or the cache's dtype says
    otherwise): cached rows read, the others computed by `compute(indices)` (batches of (indices,
    float32 rows)) — split across ranks when several run — and written to the cache as one shard.
    Returns the rows on the main rank, None on the others."""
    from .launch import SINGLE

    ranks = ranks or SINGLE
    stats = stats or CacheStats(enabled=cache is not None)
    keys = cache.row_keys(parts) if cache is not None else []
    t0 = time.perf_counter()
    found = _find(cache, keys, stats) if ranks.main else {}
    found = ranks.broadcast(found)
    have = {i for pairs in found.values() for i, _ in pairs}
    missing = [i for i in range(len(parts)) if i not in have]
    stats.seconds_read = time.perf_counter() - t0
    t1 = time.perf_counter()
    dtype = cache.dtype if cache is not None else np.dtype(dtype or np.float16)
    mine = [(list(idx), np.asarray(x, dtype=dtype)) for idx, x in compute(ranks.share(missing))] \
        if missing else []
    computed = ranks.gather(mine)
    stats.seconds_computed = time.perf_counter() - t1
    if not ranks.main:
        return None
    computed = [b for part in computed for b in part]
    dim = computed[0][1].shape[1] if computed else _dim(found)
    out = np.empty((len(parts), dim), dtype=dtype)
    t2 = time.perf_counter()
    for data, pairs in found.items():
        FeatureCache.read_into(out, data, pairs)
    for idx, x in computed:
        out[idx] = x
    stats.seconds_read += time.perf_counter() - t2
    stats.rows, stats.hits, stats.computed = len(parts), len(have), len(missing)
    if cache is not None and missing:
        try:
            stats.written = str(cache.write([keys[i] for i in missing], out[missing]))
        except OSError as e:  # a full or read-only cache never fails a build
            stats.notes.append(f"feature cache not written ({cache.dir}: {e.strerror or e})")
            log.warning("%s", stats.notes[-1])
    return out


def _find(cache: FeatureCache | None, keys: list[str], stats: CacheStats) -> dict:
    if cache is None:
        return {}
    try:
        return cache.find(keys)
    except OSError as e:
        stats.notes.append(f"feature cache not read ({cache.dir}: {e.strerror or e})")
        return {}


def _dim(found: dict) -> int:
    data = next(iter(found))
    return int(np.load(data, mmap_mode="r", allow_pickle=False).shape[1])

"""Streamed decoding: images are decoded where they are used, by a torch DataLoader with workers.

- `stream(dataset, order, batch, workers)`: (x, y) numpy batches of any map-style dataset, in the
  order given, whatever the worker count (each sample is a function of its key alone).
- `Split`: an evaluation split (val, test) decoded once by the workers into an on-disk file of
  uint8 crops — the exact input of the contract's normalisation — and normalised per read. It
  slices like the float32 NCHW array it stands for, so the gate, the search and the refiners read
  it in batches while memory stays flat whatever the size of the split (4x smaller on disk than
  float32, and bit-identical to `preprocess` on the image).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import interrupt
from .runtime.preprocess import load_rgb, resize_crop, to_tensor


def default_workers() -> int:
    """Decoding workers when none are asked for: one of the CPUs this process may use is left to the
    model (the workers never change a result)."""
    from .threads import allowed

    return max(0, min(8, allowed() - 1))


def _stack(samples):
    import torch

    xs, ys = zip(*samples, strict=True)
    return torch.from_numpy(np.stack(xs)), torch.as_tensor(np.asarray(ys, dtype=np.int64))


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding is the workers' job; the cores' threads belong to the model
    interrupt.in_worker()  # the parent owns Ctrl-C: it unwinds and stops its workers


def stream(dataset, order: Sequence | None, batch: int, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of dataset[key] for the keys in `order` (default: 0..len-1), as numpy arrays."""
    from torch.utils.data import DataLoader

    keys = list(range(len(dataset))) if order is None else list(order)
    batches = [keys[s:s + batch] for s in range(0, len(keys), batch)]
    if threading.current_thread() is not threading.main_thread():
        # A target built beside others (--jobs): forking from a thread while another runs BLAS or an
        # engine can deadlock the child; this thread decodes itself (same samples, same order).
        workers = 0
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_stack,
                        worker_init_fn=_worker_init if workers else None)
    handler = signal.getsignal(signal.SIGCHLD) if workers else None
    with interrupt.deferred():  # a signal inside torch's iterator set-up leaves a half-made iterator behind
        batches_iter = iter(loader)
        if workers:
            # torch installs a process-wide SIGCHLD handler with its first worker; in a long-lived process
            # (the test suite) it crashed the process when an unrelated child exited later. The loader
            # still notices a dead worker by polling (every few seconds), so the handler is put back.
            signal.signal(signal.SIGCHLD, handler)
    for x, y in batches_iter:
        yield x.numpy(), y.numpy()


class _Crops:
    """Map-style dataset: item i -> (its resized, centre-cropped uint8 HWC image, label)."""

    def __init__(self, items: Sequence, contract: dict):
        self.items, self.contract = items, contract

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return np.asarray(resize_crop(load_rgb(self.items[i].path), self.contract), dtype=np.uint8), \
            self.items[i].label


class Split:
    """A preprocessed split on disk (see the module docstring). split[i], split[a:b], split[[i, j]]
    give float32 arrays exactly as `preprocess` would."""

    def __init__(self, path: Path, n: int, contract: dict):
        self.path, self.n, self.contract = Path(path), n, contract
        h, w = contract["input_size"]
        self._hwc = (h, w, 3)
        self._row = h * w * 3
        self.shape = (n, 3, h, w) if contract.get("layout", "NCHW") == "NCHW" else (n, h, w, 3)
        self.dtype = np.dtype(contract.get("dtype", "float32"))

    @classmethod
    def write(cls, items: Sequence, contract: dict, path: Path, workers: int, progress=None,
              description: str = "", batch: int = 32, samples=None) -> Split:
        """Decode every item once (workers), write the crops to `path`. `samples` (a map-style dataset
        of uint8 HWC crops at the input size) replaces the items' centre crops, e.g. augmented views."""
        path = Path(path)
        samples = _Crops(items, contract) if samples is None else samples
        chunks = stream(samples, None, batch, workers)
        total = -(-len(samples) // batch)
        if progress is not None:
            chunks = progress.track(chunks, total=total, description=description)
        with open(path, "wb") as f:
            for x, _ in chunks:
                f.write(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
        return cls(path, len(samples), contract)

    def __len__(self) -> int:
        return self.n

    def with_contract(self, contract: dict) -> Split:
        """The same crops as another model takes them (e.g. raw uint8 NHWC pixels: model_input.py)."""
        return Split(self.path, self.n, contract)

    def _read(self, start: int, stop: int) -> np.ndarray:
        count = max(0, stop - start)
        with open(self.path, "rb") as f:  # read(), not mmap: pages stay in the OS cache, not in RSS
            f.seek(start * self._row)
            raw = np.frombuffer(f.read(count * self._row), dtype=np.uint8)
        return raw.reshape(count, *self._hwc)

    def crops(self, idx) -> np.ndarray:
        """The uint8 HWC crops of a slice or of a list of indices."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.n)
            if step == 1:
                return self._read(start, stop)
            idx = range(start, stop, step)
        rows = [int(i) + (self.n if int(i) < 0 else 0) for i in np.asarray(idx).reshape(-1)]
        if any(not 0 <= i < self.n for i in rows):
            raise IndexError(f"index out of range for a split of {self.n}")
        return np.concatenate([self._read(i, i + 1) for i in rows]) if rows else self._read(0, 0)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[[int(idx)]][0]
        return to_tensor(self.crops(idx), self.contract)

    def batches(self, size: int) -> Iterator[np.ndarray]:
        for s in range(0, self.n, size):
            yield self[s:s + size]

    def __array__(self, dtype=None, copy=None):  # np.asarray(split): the whole split, on purpose only
        return self[:] if dtype is None else self[:].astype(dtype)

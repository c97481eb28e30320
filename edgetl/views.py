"""Seeded augmentation and the training views.

Every augmented sample is seeded by the build seed and the image's *content* (its sha256) alone —
never by its position in a list or by the worker that decodes it — so that results do not depend
on the worker count, the order of the data, or which other images are in the folder:

- training views (feature-extract, head refit, QAT): view 0 is the clean image, views 1..n are
  augmented with a seed from (seed, view, image);
- fine-tune epochs: the sample of an image in an epoch is augmented with (seed, epoch, image).

`TrainViews` makes any view again on demand, in batches, through a DataLoader with workers
(edgetl/loader.py): nothing holds the decoded images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .runtime.preprocess import load_rgb, preprocess, to_tensor

_VIEW, _EPOCH = 0, 1  # seed domains: training views / fine-tune epochs


def augmenter(contract: dict):
    """Random crop, flip and colour jitter, then the bundle's own tensor conversion."""
    from torchvision import transforms as T

    pipe = T.Compose([T.RandomResizedCrop(tuple(contract["input_size"]), scale=(0.55, 1.0), antialias=True),
                      T.RandomHorizontalFlip(),
                      T.ColorJitter(0.25, 0.25, 0.25, 0.02)])
    return lambda img: to_tensor(pipe(img), contract)


def image_id(sha256: str) -> list[int]:
    """The image's identity for seeding: its content hash as four 32-bit words."""
    return [int(sha256[i:i + 8], 16) for i in range(0, 32, 8)]


def sample_seed(seed: int, domain: int, step: int, sha256: str) -> int:
    """A 63-bit seed of its own for (seed, view or epoch, image content)."""
    words = np.random.SeedSequence([seed, domain, step, *image_id(sha256)]).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> 1)


def seeded(fn, seed: int):
    """fn() with torch's global generator seeded (torchvision's transforms draw from it), restored after."""
    import torch

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return fn()
    finally:
        torch.random.set_rng_state(state)


class _Decoder:
    """Decodes items' files; the last decoded image is kept (consecutive views of an image share it)."""

    def __init__(self, items: Sequence, contract: dict):
        self.items, self.contract = items, contract
        self._last: tuple[int, object] | None = None

    @cached_property
    def augment(self):
        return augmenter(self.contract)

    def image(self, i: int):
        if self._last is None or self._last[0] != i:
            self._last = (i, load_rgb(self.items[i].path))
        return self._last[1]

    def clean(self, i: int) -> np.ndarray:
        return preprocess(self.image(i), self.contract)

    def augmented(self, i: int, domain: int, step: int, seed: int) -> np.ndarray:
        return seeded(lambda: self.augment(self.image(i)), sample_seed(seed, domain, step, self.items[i].sha256))


class _ViewSamples(_Decoder):
    """Map-style dataset: view k of TrainViews -> (CHW float32, label)."""

    def __init__(self, views: TrainViews):
        super().__init__(views.items, views.contract)
        self.per, self.seed = 1 + views.n_augmented, views.seed

    def __len__(self) -> int:
        return len(self.items) * self.per

    def __getitem__(self, k: int):
        i, view = divmod(int(k), self.per)
        x = self.clean(i) if view == 0 else self.augmented(i, _VIEW, view, self.seed)
        return x, self.items[i].label


class EpochSamples(_Decoder):
    """Map-style dataset for fine-tuning: (epoch, i) -> (augmented CHW float32, label)."""

    def __init__(self, items: Sequence, contract: dict, seed: int):
        super().__init__(items, contract)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        return self.augmented(int(i), _EPOCH, int(epoch), self.seed), self.items[int(i)].label


@dataclass
class TrainViews:
    """Clean + augmented views of the training images, image-major: view k is image k // (1 + n)
    in view k % (1 + n), view 0 clean. Made on demand from the files."""

    items: list  # data.Item: path, label, sha256 (the training split)
    contract: dict
    n_augmented: int
    seed: int
    workers: int = 0  # DataLoader workers that decode and augment

    def __len__(self) -> int:
        return len(self.items) * (1 + self.n_augmented)

    @property
    def view_labels(self) -> np.ndarray:
        return np.repeat(np.asarray([it.label for it in self.items], dtype=np.int64), 1 + self.n_augmented)

    def view_keys(self) -> list[str]:
        """A cache key part per view: the image's content and what was done to it."""
        per = 1 + self.n_augmented
        return [f"{it.sha256}:clean" if v == 0 else f"{it.sha256}:view{v}:seed{self.seed}"
                for it in self.items for v in range(per)]

    def make(self, k: int) -> np.ndarray:
        """View k, preprocessed (CHW float32)."""
        return _ViewSamples(self)[k][0]

    def batches(self, size: int = 16, order: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Views in `order` (default: all, in view order), `size` at a time, decoded by the workers."""
        from .loader import stream

        for x, _ in stream(_ViewSamples(self), order, size, self.workers):
            yield x

"""The training views: each training image once clean and `n_augmented` times augmented.

Every augmented view is seeded by (seed, view, image index) alone, so the same views can be made
again later — by the head refit, which must see exactly what training saw — in any order, in
batches, without keeping them in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .runtime.preprocess import preprocess, to_tensor


def augmenter(contract: dict):
    """Random crop, flip and colour jitter, then the bundle's own tensor conversion."""
    from torchvision import transforms as T

    pipe = T.Compose([T.RandomResizedCrop(tuple(contract["input_size"]), scale=(0.55, 1.0), antialias=True),
                      T.RandomHorizontalFlip(),
                      T.ColorJitter(0.25, 0.25, 0.25, 0.02)])
    return lambda img: to_tensor(pipe(img), contract)


def view_seed(seed: int, view: int, index: int) -> int:
    """A 63-bit seed of its own for one augmented view of one image."""
    return int(np.random.SeedSequence([seed, view, index]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


@dataclass
class TrainViews:
    """Clean + augmented views of the training images (view 0 is clean), made on demand."""

    images: list  # decoded RGB PIL images
    labels: np.ndarray
    contract: dict
    n_augmented: int
    seed: int

    def __len__(self) -> int:
        return len(self.images) * (1 + self.n_augmented)

    @cached_property
    def _augment(self):
        return augmenter(self.contract)

    @property
    def view_labels(self) -> np.ndarray:
        return np.tile(np.asarray(self.labels), 1 + self.n_augmented)

    def make(self, k: int) -> np.ndarray:
        """View k (k = view * n_images + image index), preprocessed (CHW float32)."""
        import torch

        n = len(self.images)
        view, i = divmod(k, n)
        if view == 0:
            return preprocess(self.images[i], self.contract)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(view_seed(self.seed, view, i))
            return self._augment(self.images[i])
        finally:
            torch.random.set_rng_state(state)

    def batches(self, size: int = 16) -> Iterator[np.ndarray]:
        for s in range(0, len(self), size):
            yield np.stack([self.make(k) for k in range(s, min(s + size, len(self)))])

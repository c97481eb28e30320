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

import numpy as np

from .runtime.preprocess import load_rgb, preprocess, to_tensor

_VIEW, _EPOCH, _EVIDENCE = 0, 1, 2  # seed domains: training views / fine-tune epochs / val evidence views


# Augmentation: random resized crop (area 0.55-1, aspect 3/4-4/3), horizontal flip, colour jitter
# (brightness, contrast, saturation 0.25, hue 0.02, in a random order). Every parameter is drawn from
# a generator of the sample's own (numpy, local): no process-global state, so target threads
# (--jobs) and DataLoader workers make the same view whatever runs beside them.
AUGMENT_VERSION = 2  # part of the feature cache's namespace: bump when a view's pixels change
CROP_SCALE, CROP_RATIO = (0.55, 1.0), (3 / 4, 4 / 3)
JITTER, HUE = 0.25, 0.02


def _crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of CROP_SCALE of the area and CROP_RATIO aspect."""
    area, lo, hi = width * height, np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])
    for _ in range(10):
        target, aspect = area * rng.uniform(*CROP_SCALE), float(np.exp(rng.uniform(lo, hi)))
        w, h = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(width, height)  # no fit in ten draws (extreme aspect): the centred square
    return (height - side) // 2, (width - side) // 2, side, side


def augment_image(img, contract: dict, seed: int):
    """The augmented PIL image (at the model's input size) of `img` for a sample seed."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(seed)
    top, left, h, w = _crop_box(rng, *img.size)
    out = F.resized_crop(img, top, left, h, w, list(contract["input_size"]), InterpolationMode.BILINEAR,
                         antialias=True)
    if rng.random() < 0.5:
        out = F.hflip(out)
    factors = rng.uniform(1 - JITTER, 1 + JITTER, 3).tolist()
    hue = float(rng.uniform(-HUE, HUE))
    ops = (lambda im: F.adjust_brightness(im, factors[0]), lambda im: F.adjust_contrast(im, factors[1]),
           lambda im: F.adjust_saturation(im, factors[2]), lambda im: F.adjust_hue(im, hue))
    for k in rng.permutation(4).tolist():
        out = ops[k](out)
    return out


def image_id(sha256: str) -> list[int]:
    """The image's identity for seeding: its content hash as four 32-bit words."""
    return [int(sha256[i:i + 8], 16) for i in range(0, 32, 8)]


def sample_seed(seed: int, domain: int, step: int, sha256: str) -> int:
    """A 63-bit seed of its own for (seed, view or epoch, image content)."""
    words = np.random.SeedSequence([seed, domain, step, *image_id(sha256)]).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> 1)


class _Decoder:
    """Decodes items' files; the last decoded image is kept (consecutive views of an image share it)."""

    def __init__(self, items: Sequence, contract: dict):
        self.items, self.contract = items, contract
        self._last: tuple[int, object] | None = None

    def image(self, i: int):
        if self._last is None or self._last[0] != i:
            self._last = (i, load_rgb(self.items[i].path))
        return self._last[1]

    def clean(self, i: int) -> np.ndarray:
        return preprocess(self.image(i), self.contract)

    def augmented_image(self, i: int, domain: int, step: int, seed: int):
        return augment_image(self.image(i), self.contract, sample_seed(seed, domain, step, self.items[i].sha256))

    def augmented(self, i: int, domain: int, step: int, seed: int) -> np.ndarray:
        return to_tensor(self.augmented_image(i, domain, step, seed), self.contract)


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


class EvidenceCrops(_Decoder):
    """Map-style dataset: row k -> (uint8 HWC crop, label) of val image k // n in its augmented view
    k % n + 1 (seeded by seed, view and image content): more images for the search's agreement
    evidence, which needs no labels. What `loader.Split.write` stores."""

    def __init__(self, items: Sequence, contract: dict, n_views: int, seed: int):
        super().__init__(items, contract)
        self.n_views, self.seed = n_views, seed

    def __len__(self) -> int:
        return len(self.items) * self.n_views

    def keys(self) -> list[str]:
        """A cache key part per row: the image's content and its evidence view."""
        return [f"{it.sha256}:evidence{v + 1}:seed{self.seed}" for it in self.items for v in range(self.n_views)]

    def __getitem__(self, k: int):
        i, view = divmod(int(k), self.n_views)
        img = self.augmented_image(i, _EVIDENCE, view + 1, self.seed)
        return np.asarray(img, dtype=np.uint8), self.items[i].label


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

"""Stage 1: scan an image folder, decode-check every file, split, pick the calibration subset."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import file_sha256
from .errors import DataError
from .runtime.preprocess import ImageDecodeError, load_rgb

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    sha256: str

    def rel(self, root: Path) -> str:
        return self.path.relative_to(root).as_posix()


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    splits: dict[str, list[Item]]
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}
    presplit: bool = False

    def split(self, name: str) -> list[Item]:
        return self.splits[name]

    @property
    def sha256(self) -> str:
        """Identity of the data as used: every file's hash, its label and its split."""
        h = hashlib.sha256()
        for name in SPLITS:
            for it in sorted(self.splits[name], key=lambda i: i.rel(self.root)):
                h.update(f"{name}\t{self.classes[it.label]}\t{it.rel(self.root)}\t{it.sha256}\n".encode())
        return h.hexdigest()

    def report(self) -> dict:
        counts = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for s in SPLITS:
            for it in self.splits[s]:
                counts[s][self.classes[it.label]] += 1
        return {"root": str(self.root), "classes": self.classes, "presplit": self.presplit,
                "counts": counts, "skipped": self.skipped, "sha256": self.sha256}


def balance_warnings(ds: Dataset, *, ratio: float, min_judged: int) -> list[str]:
    """Class imbalance, said out loud: a class with far fewer images than the largest one (below
    `ratio` of it), and a class with fewer than `min_judged` images in val or test (the search and
    the gate cannot judge its recall: one image moves it by 100/n pp)."""
    counts = ds.report()["counts"]
    total = {c: sum(counts[s][c] for s in SPLITS) for c in ds.classes}
    largest = max(total, key=total.get)
    out = [f"class '{c}' has {n} images, '{largest}' has {total[largest]} ({100 * n / total[largest]:.0f} % of the "
           f"largest, under data.imbalance_ratio {ratio:g}): the model will seldom predict it and the gate "
           f"can hardly judge it; fix: add images of '{c}'"
           for c, n in total.items() if n < ratio * total[largest]]
    for split in ("val", "test"):
        few = [f"'{c}' ({counts[split][c]})" for c in ds.classes if counts[split][c] < min_judged]
        if few:
            out.append(f"{split} split: too few images to judge the recall of {', '.join(few)} "
                       f"(under data.min_judged_images {min_judged}); fix: add images of "
                       f"{'that class' if len(few) == 1 else 'those classes'}")
    return out


def items_sha256(items: list[Item], root: Path) -> str:
    """One hash of a list of items (relative path, label, content): the calibration set's identity."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.rel(root)}\t{it.sha256}\n".encode())
    return h.hexdigest()


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_file(f: Path) -> tuple[str | None, str | None]:
    """(sha256, None) for a usable image, (None, reason) otherwise. Decodes fully (catches truncation)."""
    try:
        load_rgb(f)
    except ImageDecodeError as e:
        return None, str(e)
    return file_sha256(f), None


def _scan_classes(folder: Path, classes: list[str], skipped: list[dict], root: Path, workers: int = 0) -> list[Item]:
    files = []
    for label, name in enumerate(classes):
        cdir = folder / name
        if not cdir.is_dir():
            continue
        files += [(f, label) for f in sorted(cdir.rglob("*"))
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(cdir).parts)]
    # Pillow and hashlib release the GIL: threads check files in parallel; results keep the file order.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checked = list(pool.map(lambda fl: _check_file(fl[0]), files))
    items = []
    for (f, label), (sha, reason) in zip(files, checked, strict=True):
        if reason is not None:
            skipped.append({"file": f.relative_to(root).as_posix(), "reason": reason})
        else:
            items.append(Item(f, label, sha))
    return items


def _drop_duplicates(items: list[Item], seen: dict[str, str], skipped: list[dict], root: Path) -> list[Item]:
    """Keep the first file of each content hash: a copy in another split would leak it into training."""
    kept = []
    for it in items:
        first = seen.setdefault(it.sha256, it.rel(root))
        if first == it.rel(root):
            kept.append(it)
        else:
            skipped.append({"file": it.rel(root), "reason": f"duplicate of {first}"})
    return kept


def _stratified(items: list[Item], fractions: dict[str, float], rng: np.random.Generator) -> dict[str, list[Item]]:
    """Split every class by the fractions, at least one item of each class in each split."""
    out = {k: [] for k in fractions}
    labels = sorted({it.label for it in items})
    for label in labels:
        cls = [it for it in items if it.label == label]
        order = rng.permutation(len(cls))
        cls = [cls[i] for i in order]
        n = len(cls)
        sizes = {k: max(1, round(n * f)) for k, f in fractions.items() if k != "train"}
        start = 0
        for k, size in sizes.items():
            out[k].extend(cls[start:start + size])
            start += size
        out["train"].extend(cls[start:])
    return out


def scan(folder: Path, *, val_fraction: float = 0.15, test_fraction: float = 0.25, seed: int = 0,
         workers: int = 0) -> Dataset:
    """Scan `folder` (ImageFolder or pre-split train/[val]/test) into a seeded, stratified Dataset.
    `workers` threads decode-check the files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; fix: pass --data DIR with DIR/<class>/<image> files")
    rng = np.random.default_rng(seed)
    skipped: list[dict] = []
    top = {p.name for p in _class_dirs(folder)}
    presplit = {"train", "test"} <= top
    if presplit:
        classes = sorted({p.name for s in SPLITS if (folder / s).is_dir() for p in _class_dirs(folder / s)})
    else:
        classes = sorted(top)
    if not classes:
        raise DataError(f"{folder}: no class sub-folders; fix: arrange images as {folder}/<class>/<image>")
    if len(classes) < 2:
        raise DataError(f"{folder}: only one class ('{classes[0]}'); fix: add a sub-folder per class, at least two")
    if presplit:
        seen: dict[str, str] = {}
        splits = {s: _drop_duplicates(_scan_classes(folder / s, classes, skipped, folder, workers), seen, skipped,
                                           folder)
                  if (folder / s).is_dir() else [] for s in SPLITS}
        if not splits["val"]:
            carved = _stratified(splits["train"], {"train": 0, "val": val_fraction}, rng)
            splits["train"], splits["val"] = carved["train"], carved["val"]
    else:
        items = _drop_duplicates(_scan_classes(folder, classes, skipped, folder, workers), {}, skipped, folder)
        if items:
            _check_counts(folder, classes, {"all": items}, minimum=3)
        splits = _stratified(items, {"train": 0, "val": val_fraction, "test": test_fraction}, rng)
    if not any(splits.values()):
        raise DataError(f"{folder}: no readable images ({len(skipped)} files skipped); fix: add JPEG/PNG images")
    _check_counts(folder, classes, splits, minimum=1)
    return Dataset(folder, classes, {s: splits[s] for s in SPLITS}, skipped, presplit)


def _check_counts(folder: Path, classes: list[str], splits: dict[str, list[Item]], minimum: int) -> None:
    problems = []
    for s, items in splits.items():
        have = np.bincount([it.label for it in items], minlength=len(classes))
        problems += [f"'{classes[i]}' has {n} readable image(s) in {s}" for i, n in enumerate(have) if n < minimum]
    if problems:
        need = "at least 3 readable images per class" if minimum == 3 else "every class in every split"
        raise DataError(f"{folder}: {'; '.join(problems[:5])}; fix: add images ({need})")


def calibration_subset(items: list[Item], n_classes: int, size: int, seed: int) -> list[Item]:
    """Seeded, class-balanced subset of the training items: round-robin over the classes in a seeded
    shuffled order (each class's images shuffled too), so that with more classes than `size` the
    classes left out are a seeded draw, not always the last labels."""
    rng = np.random.default_rng(seed + 7919)
    per_class = [[it for it in items if it.label == c] for c in range(n_classes)]
    for lst in per_class:
        order = rng.permutation(len(lst))
        lst[:] = [lst[i] for i in order]
    per_class = [per_class[c] for c in rng.permutation(n_classes)]
    out: list[Item] = []
    depth = 0
    while len(out) < size and any(depth < len(lst) for lst in per_class):
        for lst in per_class:
            if depth < len(lst) and len(out) < size:
                out.append(lst[depth])
        depth += 1
    return out


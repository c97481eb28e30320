"""The built-in data set: 'shapes', rendered deterministically so `edgetl build` works offline.

Six classes (circle, hexagon, square, triangle, star, cross) drawn with random colour, size,
position and rotation on cluttered, noisy, textured backgrounds, with distractor strokes and
partial occlusion. Small hexagons look like circles and heavy clutter hides edges, so float
accuracy is well below 100 %. Written once as PNGs into a cache folder and then used like any
user folder, so it goes through exactly the same scan/decode path.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "hexagon", "square", "star", "triangle")
VERSION = 5
SIZE = 96
_SS = 2  # supersampling factor


def _polygon(cx, cy, r, n, rot, inner=None):
    corners = n * 2 if inner else n
    step = 2 * math.pi / corners
    return [(cx + (inner if inner and k % 2 else r) * math.cos(rot + k * step),
             cy + (inner if inner and k % 2 else r) * math.sin(rot + k * step)) for k in range(corners)]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, rot, fill):
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fill)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.05, 4, rot), fill=fill)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.1, 3, rot), fill=fill)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r * 1.1, 5, rot, inner=r * 0.5), fill=fill)
    elif name == "cross":
        w = r * 0.38
        arms = [(-r, -w, r, w), (-w, -r, w, r)]
        c, s = math.cos(rot), math.sin(rot)
        for x0, y0, x1, y1 in arms:
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=fill)


def render(label: int, index: int, seed: int = 0) -> Image.Image:
    """One built-in image of class `label`, a function of (label, index, seed) alone."""
    rng = np.random.default_rng([seed, label, index, VERSION])
    big = SIZE * _SS
    # textured background: two-colour gradient + low-frequency blobs + pixel noise
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, big)[None, :, None]
    angle = rng.uniform(0, 1)
    grad = (t * angle + t.transpose(1, 0, 2) * (1 - angle))
    bg = c0 * (1 - grad) + c1 * grad
    blobs = rng.normal(0, 1, (8, 8, 3))
    blobs = np.asarray(Image.fromarray(((blobs - blobs.min()) / np.ptp(blobs) * 255).astype(np.uint8))
                       .resize((big, big), Image.Resampling.BICUBIC), dtype=np.float64)
    bg = np.clip(bg * 0.7 + blobs * 0.3, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    # distractor strokes and small shapes of any class
    for _ in range(rng.integers(0, 3)):
        xy = rng.uniform(0, big, 4)
        draw.line(tuple(xy), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(2, 8)))
    for _ in range(rng.integers(0, 2) if rng.uniform() < 0.5 else 0):
        other = CLASSES[int(rng.integers(len(CLASSES)))]
        _draw_shape(draw, other, *rng.uniform(0, big, 2), rng.uniform(4, 9) * _SS / 2, rng.uniform(0, 6.3),
                    tuple(int(v) for v in rng.integers(0, 256, 3)))
    # the labelled shape: random colour (contrasting the local background a little), size, pose
    r = rng.uniform(0.22, 0.40) * big
    cx, cy = rng.uniform(r, big - r, 2)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    _draw_shape(draw, CLASSES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    # partial occlusion by a bar
    if rng.uniform() < 0.1:
        ox, oy = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
        draw.rectangle((ox, oy, ox + rng.uniform(0.2, 0.6) * r, oy + rng.uniform(0.5, 1.5) * r),
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))).resize((SIZE, SIZE), Image.Resampling.BOX)
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, rng.uniform(3, 12), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def default_cache_dir() -> Path:
    """Where the built-in data is kept ($EDGETL_CACHE, else ~/.cache/edgetl)."""
    base = os.environ.get("EDGETL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "edgetl")
    return Path(base).expanduser()


def ensure_shapes(root: Path | None = None, per_class: int = 150, seed: int = 0) -> Path:
    """Render the data set once (idempotent); returns the ImageFolder path."""
    folder = (root or default_cache_dir()) / f"shapes-v{VERSION}-n{per_class}-s{seed}"
    stamp = folder / ".complete"
    if stamp.exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    for label, name in enumerate(CLASSES):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(label, i, seed).save(tmp / name / f"{name}_{i:04d}.png", optimize=False)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(tmp.rglob("*.png")))).hexdigest()
    (tmp / ".complete").write_text(digest + "\n")
    if folder.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    os.replace(tmp, folder)
    return folder

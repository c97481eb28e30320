"""Image decoding and the preprocessing contract, shared by training and every bundle.

This file is copied verbatim into each bundle next to predict.py, so the device runs the
exact code the model was trained and validated with. It imports only numpy and Pillow.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageDecodeError(ValueError):
    """The file is not a usable image; str(e) is the reason."""


def _to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: scale to 8 bits (never clamp: clamping turns 16-bit images white).
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif mode == "I" and arr.size and arr.max() > 65535:
            arr = arr * (255.0 / arr.max())
        elif mode != "F" or (arr.size and np.nanmax(arr) > 255):
            arr = arr / 257.0
        arr = np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (catches truncation), apply EXIF orientation, return an 8-bit RGB image.

    Raises ImageDecodeError with a short reason for zero-byte, truncated, non-image and
    decompression-bomb files.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_crlf_ppm(path) or path) as img:
                img.load()  # full decode: Image.verify() misses truncated data
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img).copy()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated image" if "truncated" in str(e) else f"cannot decode ({e})"
        raise ImageDecodeError(reason) from None


_PPM_TOKEN = re.compile(rb"(?:\s|#[^\r\n]*[\r\n])*([0-9]{1,10})")


def _crlf_ppm(path: Path) -> io.BytesIO | None:
    """A binary PPM whose header ends "maxval\r\n" and whose size says the "\r\n" is one line ending:
    Pillow takes the "\r" as the one whitespace that ends the header and the "\n" as the first pixel
    byte (the channels rotate). Its bytes with that "\r" removed; None for every other file. The C++
    consumer reads such files the same way (image_io.hpp)."""
    with open(path, "rb") as f:
        if f.read(2) != b"P6":
            return None
        raw = b"P6" + f.read()
    pos, values = 2, []
    for _ in range(3):
        m = _PPM_TOKEN.match(raw, pos)
        if m is None:
            return None
        values.append(int(m.group(1)))
        pos = m.end()
    w, h, maxval = values
    need = w * h * 3 * (2 if maxval > 255 else 1)
    if raw[pos:pos + 2] == b"\r\n" and len(raw) - pos - 2 == need:
        return io.BytesIO(raw[:pos] + raw[pos + 1:])
    return None


def resize_crop(img: Image.Image, contract: dict) -> Image.Image:
    """Resize the shorter side to contract['resize_size'], then centre-crop contract['input_size']."""
    h, w = contract["input_size"]
    short = contract["resize_size"]
    iw, ih = img.size
    scale = short / min(iw, ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), _RESAMPLE[contract.get("interpolation", "bilinear")])
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img, contract: dict) -> np.ndarray:
    """RGB uint8 image of the input size (or a batch of them, NHWC uint8) -> the model's input: float32
    CHW (NCHW) normalised per the contract, or, for a model that normalises inside
    (contract "dtype": "uint8"), the pixels themselves, uint8 HWC (NHWC)."""
    if contract.get("dtype") == "uint8":  # RGB NHWC (model_input.py refuses anything else)
        arr = np.ascontiguousarray(img, dtype=np.uint8)
        return arr if arr.flags.writeable else arr.copy()  # a runtime may share (and so need) its memory
    arr = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(contract["mean"], dtype=np.float32)
    std = np.asarray(contract["std"], dtype=np.float32)
    arr = (arr - mean) / std
    if contract.get("channel_order", "RGB") == "BGR":
        arr = arr[..., ::-1]
    if contract.get("layout", "NCHW") == "NCHW":
        arr = np.moveaxis(arr, -1, -3)
    return np.ascontiguousarray(arr, dtype=np.float32)


def input_dtype(contract: dict) -> np.dtype:
    """The element type the model takes (float32 unless it takes raw uint8 pixels)."""
    return np.dtype(contract.get("dtype", "float32"))


def sample_crops(n: int, contract: dict, seed: int = 0) -> np.ndarray:
    """n random uint8 RGB crops at the model's input size (timing inputs for any contract)."""
    h, w = contract["input_size"]
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def preprocess(img: Image.Image, contract: dict) -> np.ndarray:
    return to_tensor(resize_crop(img, contract), contract)


def load_contract(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))

"""The C++ consumer's image path (edgetl/runtime/cpp/image_io.hpp) against Pillow, and under fuzzing.

One small harness program includes image_io.hpp and is compiled once, with AddressSanitizer and
UndefinedBehaviorSanitizer where the compiler has them; each test feeds it many files in one process:
  - a few hundred random PNG and PPM images (RGB, grey, grey+alpha, RGBA, palette with and without
    transparency, 16-bit grey, 1-bit; tiny sizes and extreme aspect ratios) give exactly the uint8
    tensor of preprocess.py's load_rgb + resize_crop (max abs difference 0), bilinear and bicubic;
  - a few thousand mutated PPM and PNG headers (fixed seed) never crash it or trip a sanitizer, and
    every refusal is one printable line.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from edgetl.runtime.preprocess import load_rgb, resize_crop

CPP = Path(__file__).resolve().parents[1] / "edgetl" / "runtime" / "cpp"
PILLOW = int(PIL.__version__.split(".")[0])

# argv: resize_size height width interpolation OUT pillow-major. Reads "<path>" lines on stdin; per file
# prints "ok" (and appends the tensor to OUT) or "error: ...".
HARNESS = r"""
#include <fstream>
#include <iostream>
#include "image_io.hpp"
int main(int argc, char** argv) {
  if (argc != 7) return 2;
  edgetl::Contract c;
  c.resize_size = std::atoi(argv[1]), c.height = std::atoi(argv[2]), c.width = std::atoi(argv[3]);
  c.filter = edgetl::filter_named(argv[4], "harness");
  c.pillow_major = std::atoi(argv[6]);
  std::ofstream out(argv[5], std::ios::binary);
  for (std::string path; std::getline(std::cin, path);) {
    try {
      const edgetl::Image x = edgetl::resize_crop(edgetl::load_rgb(path), c);
      out.write(reinterpret_cast<const char*>(x.rgb.data()), static_cast<std::streamsize>(x.rgb.size()));
      std::cout << "ok" << std::endl;
    } catch (const edgetl::InputError& e) {
      std::cout << "error: " << edgetl::printable(e.what()) << std::endl;
    }
  }
  return 0;
}
"""


def _compile(where: Path, flags: list[str]) -> Path | None:
    src = where / "harness.cpp"
    src.write_text(HARNESS)
    exe = where / "harness"
    proc = subprocess.run(["c++", "-std=c++17", "-O1", "-g", "-ffp-contract=off", *flags, "-I", str(CPP), str(src),
                           "-o", str(exe)], capture_output=True, text=True)
    return exe if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> tuple[Path, bool]:
    """(program, sanitized): with -fsanitize=address,undefined,float-cast-overflow where the compiler links it."""
    if shutil.which("c++") is None:
        pytest.fail("no C++ compiler: the C++ image tests need one (Debian: apt install g++)")
    where = tmp_path_factory.mktemp("harness")
    exe = _compile(where, ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
                           "-fno-omit-frame-pointer"])
    if exe is not None:
        return exe, True
    exe = _compile(where, [])
    assert exe is not None, "the harness does not compile"
    return exe, False


def _run(harness, files: list[Path], contract: dict, out: Path, pillow: int = PILLOW) -> list[str]:
    exe, _ = harness
    h, w = contract["input_size"]
    proc = subprocess.run([str(exe), str(contract["resize_size"]), str(h), str(w), contract["interpolation"], str(out),
                           str(pillow)],
                          input="".join(f"{f}\n" for f in files), capture_output=True, text=True, timeout=600,
                          env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                               "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert proc.returncode == 0 and "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, \
        proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files), proc.stdout[-2000:]
    return lines


def _random_image(rng: np.random.Generator, k: int) -> Image.Image:
    shapes = [(1, 1), (1, 2), (3, 1), (2, 3), (1, 700), (900, 1), (3, 1200), (640, 480), (5, 4), (97, 13)]
    w, h = shapes[k] if k < len(shapes) else (int(rng.integers(1, 180)), int(rng.integers(1, 180)))
    smooth = rng.random() < 0.5  # noise, or a gradient with noise (resampling of both)
    base = rng.integers(0, 256, (h, w, 4)).astype(np.float64)
    if smooth:
        yy, xx = np.mgrid[:h, :w]
        base = (base * 0.2 + 200 * np.stack([xx / max(w, 1), yy / max(h, 1), (xx + yy) / (w + h), xx * 0 + 0.5], -1))
    arr = np.clip(base, 0, 255).astype(np.uint8)
    mode = ["RGB", "RGB", "L", "RGBA", "LA", "P", "PT", "I;16", "1"][k % 9]
    if mode == "RGB":
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    if mode == "L":
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]))
    if mode == "RGBA":
        alpha = arr[..., 3].copy()
        alpha[: h // 2] = 255 * (rng.random() < 0.5)  # fully opaque / transparent rows too
        return Image.fromarray(np.dstack([arr[..., :3], alpha]))
    if mode == "LA":
        return Image.fromarray(np.ascontiguousarray(arr[..., 0])).convert("LA")  # its alpha: _la
    if mode in ("P", "PT"):
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3])).quantize(int(rng.integers(2, 256)))
        if mode == "PT":
            img.info["transparency"] = bytes(rng.integers(0, 256, len(img.getpalette()) // 3).tolist())
        return img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    return Image.fromarray(arr[..., 0] > 127).convert("1")


def _la(rng, img: Image.Image) -> Image.Image:
    grey = np.asarray(img.convert("L"))
    alpha = rng.integers(0, 256, grey.shape).astype(np.uint8)
    return Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])


CONTRACTS = [{"input_size": [64, 64], "resize_size": 73, "interpolation": "bilinear"},
             {"input_size": [224, 224], "resize_size": 256, "interpolation": "bilinear"},
             {"input_size": [28, 40], "resize_size": 33, "interpolation": "bicubic"}]


@pytest.mark.parametrize("contract", CONTRACTS, ids=["64-bilinear", "224-bilinear", "28x40-bicubic"])
def test_cpp_preprocessing_equals_pillow(harness, tmp_path, contract):
    """Random PNG/PPM files of random sizes and modes: the C++ tensor is preprocess.py's, byte for byte."""
    rng = np.random.default_rng(len(contract["interpolation"]) + contract["resize_size"])
    files = []
    for k in range(110):
        img = _random_image(rng, k)
        if img.mode == "LA":
            img = _la(rng, img)
        if k % 4 == 3 and img.mode == "RGB":
            path = tmp_path / f"{k:03d}.ppm"
            img.save(path)
        else:
            path = tmp_path / f"{k:03d}.png"
            img.save(path, transparency=img.info["transparency"]) if "transparency" in img.info else img.save(path)
        files.append(path)
    out = tmp_path / "tensors.bin"
    lines = _run(harness, files, contract, out)
    refused = [(f.name, line) for f, line in zip(files, lines, strict=True) if line != "ok"]
    assert not refused, refused[:5]
    h, w = contract["input_size"]
    got = np.fromfile(out, dtype=np.uint8).reshape(len(files), h, w, 3)
    want = np.stack([np.asarray(resize_crop(load_rgb(f), contract)) for f in files])
    diff = np.abs(got.astype(int) - want.astype(int)).reshape(len(files), -1).max(axis=1)
    assert diff.max() == 0, [(f.name, Image.open(f).mode, Image.open(f).size, int(d))
                             for f, d in zip(files, diff, strict=True) if d][:10]
    modes = {Image.open(f).mode for f in files}
    assert {"RGB", "L", "RGBA", "LA", "P", "1"} <= modes and ({"I;16", "I"} & modes), modes


def _png(w: int, h: int, depth: int, colour: int, raw: bytes, extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(k, d) for k, d in extra)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_cpp_reads_what_pillow_reads_and_refuses_what_it_cannot_match(harness, tmp_path):
    """16-bit colour PNGs (the high byte, as Pillow), tRNS colour keys, a PPM whose header ends
    "255\\r\\n", comments in PPM headers; refused in one line: EXIF orientation 6, trailing bytes,
    maxval 65535, a JPEG, a bad CRC."""
    rng = np.random.default_rng(5)
    contract = CONTRACTS[0]
    rgb16 = rng.integers(0, 65536, (9, 7, 3)).astype(">u2")
    def exif(orientation: int) -> list[tuple[bytes, bytes]]:  # a big-endian TIFF IFD0 with one tag, 0x0112
        return [(b"eXIf", b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0" + bytes([orientation]) + bytes(6))]

    good = {"rgb16.png": _png(7, 9, 16, 2, b"".join(b"\0" + row.tobytes() for row in rgb16)),
            "la16.png": _png(7, 9, 16, 4, b"".join(b"\0" + row.tobytes() for row in rgb16[..., :2])),
            "exif1.png": _png(1, 1, 8, 2, b"\0abc", exif(1)),
            "comments.ppm": b"P6 # a comment\n# another\r\n3 # w\n2\n255\n" + bytes(range(18))}
    for mode, key in (("RGB", (7, 8, 9)), ("L", 7)):  # a tRNS colour key: ignored, as Pillow ignores it
        keyed = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
        keyed[:10] = 7, 8, 9
        buf = io.BytesIO()
        Image.fromarray(keyed).convert(mode).save(buf, "PNG", transparency=key)
        good[f"key-{mode}.png"] = buf.getvalue()
    pixels = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    crlf = b"P6\r\n4 5\r\n255\r\n" + pixels.tobytes()
    good["crlf.ppm"] = crlf
    bad = {"exif6.png": (_png(1, 1, 8, 2, b"\0abc", exif(6)),
                         "EXIF orientation 6"),
           "trailing.ppm": (b"P6\n2 1\n255\n" + bytes(7), "7 bytes after the PPM header, 2x1x3 = 6 expected (trailing"),
           "short.ppm": (b"P6\n2 1\n255\n" + bytes(5), "(truncated)"),
           "maxval.ppm": (b"P6\n1 1\n65535\n" + bytes(6), "only 8-bit PPM (maxval 255)"),
           "long.ppm": (b"P6\n" + b"9" * 5000 + b" 1\n255\n", "too long"),
           "comment.ppm": (b"P6\n#" + b"x" * 10000 + b"\n1 1\n255\n\0\0\0", "a comment longer than"),
           "control.ppm": (b"P6\n\x1b[31mred 1\n255\n", "width '\\x1b[31mred'"),
           "photo.jpg": (b"\xff\xd8\xff\xe0" + bytes(20), "JPEG is not read here"),
           "crc.png": (_png(1, 1, 8, 2, b"\0abc")[:-4] + b"\0\0\0\0", "broken PNG (CRC of chunk 'IEND')"),
           "bomb.ppm": (b"P6\n10000 10000\n255\n", "over the 89478485-pixel limit")}
    files = []
    for name, data in good.items():
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    for name, (data, _) in bad.items():
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    lines = _run(harness, files, contract, tmp_path / "t.bin")
    assert lines[: len(good)] == ["ok"] * len(good), lines
    for line, (name, (_, needle)) in zip(lines[len(good):], bad.items(), strict=True):
        assert line.startswith("error: ") and needle in line and len(line) < 600, (name, line)
    got = np.fromfile(tmp_path / "t.bin", dtype=np.uint8).reshape(len(good), 64, 64, 3)
    for k, name in enumerate(good):  # predict.py's reader, "255\r\n" PPM included (read as one line end)
        assert np.array_equal(got[k], np.asarray(resize_crop(load_rgb(tmp_path / name), contract))), name
    ref = tmp_path / "ref.png"
    Image.fromarray(pixels).save(ref)  # the "\r\n" PPM's pixels, read right
    assert np.array_equal(got[list(good).index("crlf.ppm")], np.asarray(resize_crop(load_rgb(ref), contract)))


def _mutate(rng: np.random.Generator, data: bytes, png: bool) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        op = rng.integers(0, 5)
        at = int(rng.integers(0, min(len(b), 60) if rng.random() < 0.6 else len(b))) if b else 0
        if op == 0 and b:
            b[at] = int(rng.integers(0, 256))
        elif op == 1:
            b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 8))).tolist())
        elif op == 2 and b:
            del b[at: at + int(rng.integers(1, 8))]
        elif op == 3:
            b[at:at] = rng.choice([b"\r\n", b"#", b" 255 ", b"\n", b"99999999", b"-1", b"\0", b"IHDR", b"tRNS"])
        else:
            b = b[: int(rng.integers(0, len(b) + 1))]
    if png and rng.random() < 0.7:  # most mutations keep valid CRCs: the decoder behind them gets fuzzed
        b = _fix_crcs(bytes(b))
    return bytes(b)


def _fix_crcs(data: bytes) -> bytes:
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        n = struct.unpack(">I", data[pos: pos + 4])[0]
        if pos + 12 + n > len(data):
            break
        body = data[pos + 4: pos + 8 + n]
        out += data[pos: pos + 4] + body + struct.pack(">I", zlib.crc32(body))
        pos += 12 + n
    return bytes(out + data[pos:])


def test_cpp_image_reader_survives_fuzzing(harness, tmp_path):
    """3000 mutated PPM and PNG files (fixed seed; benchmarks/fuzz.sh runs more, freshly seeded): no
    crash, no sanitizer report, one-line errors."""
    n, seed = int(os.environ.get("EDGETL_CPP_FUZZ", "3000")), int(os.environ.get("EDGETL_CPP_FUZZ_SEED", "2024"))
    rng = np.random.default_rng(seed)
    seeds = [b"P6\n4 3\n255\n" + bytes(range(36)), b"P6 #c\r\n2 2\r\n255\r\n" + bytes(12)]
    for mode in ("RGB", "RGBA", "L", "P", "LA"):
        path = tmp_path / f"seed-{mode}.png"
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).convert(mode).save(path)
        seeds.append(path.read_bytes())
    seeds.append(_png(3, 2, 16, 0, b"\0" + bytes(6) + b"\0" + bytes(6), [(b"tRNS", b"\0\0")]))
    files = []
    for k in range(n):
        seed = seeds[k % len(seeds)]
        path = tmp_path / f"f{k:04d}"
        path.write_bytes(_mutate(rng, seed, seed.startswith(b"\x89PNG")))
        files.append(path)
    lines = _run(harness, files, {"input_size": [8, 8], "resize_size": 9, "interpolation": "bicubic"},
                 tmp_path / "t.bin")
    errors = [line for line in lines if line != "ok"]
    assert all(line.startswith("error: ") and line.isprintable() and len(line) < 700 for line in errors)
    assert n // 10 < len(errors) < len(lines), len(errors)  # both kinds happen: the mutations reach the decoders


def test_cpp_resize_follows_the_pass_order_of_the_pillow_that_made_the_bundle(harness, tmp_path):
    """Pillow 13 runs the vertical pass first when the height shrinks by over twice the pixels the width
    does; Pillow <= 12 ran the horizontal one first (images over 100x taller than wide aside). Each
    order, rebuilt here from one-axis resizes (unambiguous in any Pillow), is what the C++ gives when
    manifest.json names that Pillow: the two orders differ by a level on some pixels."""
    bilinear = Image.Resampling.BILINEAR
    rng = np.random.default_rng(9)
    contract = {"input_size": [64, 64], "resize_size": 64, "interpolation": "bilinear"}
    sizes = [(71, 160), (160, 71), (90, 100), (64, 300), (2, 300), (300, 300)]  # resized to 64 x ..., then cropped
    files, want = [], {12: [], 13: []}
    for k, (w, h) in enumerate(sizes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        files.append(tmp_path / f"{k}.png")
        img.save(files[-1])
        scale = 64 / min(w, h)
        nw, nh = max(64, round(w * scale)), max(64, round(h * scale))
        h_first = img.resize((nw, h), bilinear).resize((nw, nh), bilinear)
        v_first = img.resize((w, nh), bilinear).resize((nw, nh), bilinear)
        for major, vertical in ((13, h - nh > 0 and h - nh > (w - nw) * 2), (12, h > w * 100 and nh < h)):
            big = np.asarray(v_first if vertical else h_first)
            left, top = (nw - 64) // 2, (nh - 64) // 2
            want[major].append(big[top: top + 64, left: left + 64])
    for major in (12, 13):
        assert _run(harness, files, contract, tmp_path / f"{major}.bin", pillow=major) == ["ok"] * len(files)
        got = np.fromfile(tmp_path / f"{major}.bin", dtype=np.uint8).reshape(len(files), 64, 64, 3)
        assert np.array_equal(got, np.stack(want[major])), major
    assert not np.array_equal(np.stack(want[12]), np.stack(want[13]))  # the orders differ on these sizes


def test_cpp_refuses_a_resize_beyond_the_pixel_limit_in_one_line(harness, tmp_path):
    """A 1-pixel-wide strip scaled so its short side becomes resize_size: a side beyond INT_MAX (1x300000
    at resize_size 8192: 2.46e9 rows), or a resized image over the 89478485-pixel limit (1x1460000 at 73:
    73x106580000 pixels), is refused in one line before any cast or allocation."""
    for name, height, resize in (("int.ppm", 300_000, 8192), ("limit.ppm", 1_460_000, 73)):
        (tmp_path / name).write_bytes(b"P6\n1 %d\n255\n" % height + bytes(3 * height))
        contract = {"input_size": [8, 8], "resize_size": resize, "interpolation": "bilinear"}
        lines = _run(harness, [tmp_path / name], contract, tmp_path / "t.bin")
        assert lines[0].startswith(f"error: an image: 1x{height}, resized to {resize}x") and \
            "over the 89478485-pixel limit" in lines[0], lines

import io

import numpy as np
import pytest
from PIL import Image

from edgetl import data
from edgetl.errors import DataError
from edgetl.runtime.preprocess import ImageDecodeError, load_rgb, preprocess
from tests.conftest import make_image_folder


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    gray = load_rgb(_save(Image.new("L", (4, 4), 100), tmp_path / "g.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_rgb(_save(pal, tmp_path / "p.png")).getpixel((0, 0)) == (10, 20, 30)
    cmyk = load_rgb(_save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "c.jpg"))
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((0, 0))) > 240


def test_alpha_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> background
    out = load_rgb(_save(img, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_16bit_scaled_not_clamped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    out = load_rgb(_save(Image.fromarray(arr), tmp_path / "d.png"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image"),
])
def test_bad_bytes(tmp_path, content, reason):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        load_rgb(tmp_path / "x.png")


def test_truncated_and_bomb(tmp_path, monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_rgb(tmp_path / "t.jpg")
    _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_rgb(tmp_path / "big.png")


def test_preprocess_contract():
    c = {"input_size": [8, 8], "resize_size": 10, "interpolation": "bilinear", "mean": [0.5] * 3,
         "std": [0.5] * 3, "layout": "NCHW"}
    x = preprocess(Image.new("RGB", (30, 20), (255, 0, 0)), c)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], -1.0)


def test_scan_splits_and_skips(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10)
    (root / "red" / "empty.jpg").write_bytes(b"")
    (root / "green" / "notes.txt").write_text("hi")
    ds = data.scan(root, seed=1)
    assert ds.classes == ["blue", "green", "red"]
    assert {s["file"] for s in ds.skipped} == {"red/empty.jpg", "green/notes.txt"}
    for split in data.SPLITS:
        assert {it.label for it in ds.split(split)} == {0, 1, 2}
    all_paths = [it.path for s in data.SPLITS for it in ds.split(s)]
    assert len(all_paths) == len(set(all_paths)) == 30
    again = data.scan(root, seed=1)
    assert again.sha256 == ds.sha256 and data.scan(root, seed=2).sha256 != ds.sha256


def test_presplit(tmp_path):
    make_image_folder(tmp_path / "p" / "train", per_class=8)
    make_image_folder(tmp_path / "p" / "test", per_class=3, seed=5)
    ds = data.scan(tmp_path / "p")
    assert ds.presplit and len(ds.split("test")) == 9
    assert len(ds.split("train")) + len(ds.split("val")) == 24 and ds.split("val")


def test_bad_folders(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        data.scan(tmp_path / "nope")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    _save(Image.new("RGB", (8, 8)), tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(DataError, match="only one class"):
        data.scan(tmp_path / "one")
    root = make_image_folder(tmp_path / "e", per_class=4)
    (root / "purple").mkdir()
    (root / "purple" / "broken.png").write_bytes(b"xx")
    with pytest.raises(DataError, match="'purple' has 0 readable image"):
        data.scan(root)
    (tmp_path / "none" / "a").mkdir(parents=True)
    (tmp_path / "none" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="readable image"):
        data.scan(tmp_path / "none")


def test_calibration_subset_balanced_from_train(tmp_path):
    ds = data.scan(make_image_folder(tmp_path / "d", per_class=12))
    train = ds.split("train")
    sub = data.calibration_subset(train, 3, 6, seed=0)
    assert np.bincount([it.label for it in sub]).tolist() == [2, 2, 2]
    assert set(sub) <= set(train)
    assert data.calibration_subset(train, 3, 6, seed=0) == sub


def test_calibration_over_more_classes_than_images_is_a_seeded_draw_of_classes():
    """200 classes, 128 calibration images: one image each from 128 classes in a seeded shuffled order
    (the same for a seed), not always the first 128 labels; over seeds every class is drawn, each
    about equally often (128/200 of the seeds)."""
    from pathlib import Path

    items = [data.Item(Path(f"c{c}/{i}.png"), c, f"{c}-{i}") for c in range(200) for i in range(3)]
    sub = data.calibration_subset(items, 200, 128, seed=0)
    labels = [it.label for it in sub]
    assert len(sub) == 128 and len(set(labels)) == 128  # one per class: as balanced as it can be
    assert max(labels) >= 128  # later labels are not left out by construction
    assert data.calibration_subset(items, 200, 128, seed=0) == sub  # deterministic for a seed
    assert data.calibration_subset(items, 200, 128, seed=1) != sub
    counts = np.zeros(200)
    for seed in range(200):
        counts[[it.label for it in data.calibration_subset(items, 200, 128, seed=seed)]] += 1
    assert counts.min() > 0  # every class is calibrated on under some seed
    # each class is drawn in 128/200 = 64 % of seeds: binomial(200, 0.64), sd 6.8; 5 sd either side
    assert 128 - 34 < counts.min() and counts.max() < 128 + 34
    # with enough images the round-robin still covers every class once before any twice
    sub = data.calibration_subset(items, 200, 300, seed=0)
    assert sorted(np.bincount([it.label for it in sub], minlength=200).tolist()) == [1] * 100 + [2] * 100


def test_duplicate_files_never_cross_splits(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    import shutil

    shutil.copyfile(root / "red" / "red_00.png", root / "red" / "copy_of_red_00.png")
    ds = data.scan(root)
    assert {"file": "red/red_00.png", "reason": "duplicate of red/copy_of_red_00.png"} in ds.skipped
    pre = tmp_path / "p"
    make_image_folder(pre / "train", per_class=6)
    make_image_folder(pre / "test", per_class=3, seed=9)
    shutil.copyfile(pre / "train" / "blue" / "blue_00.png", pre / "test" / "blue" / "leak.png")
    ds = data.scan(pre)
    assert any(s["file"] == "test/blue/leak.png" and "duplicate of train/" in s["reason"] for s in ds.skipped)
    hashes = [{it.sha256 for it in ds.split(s)} for s in data.SPLITS]
    assert not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])


def test_a_ppm_whose_header_ends_with_crlf_is_read_right(tmp_path):
    """"255\r\n" with one byte too many for "\r" alone: a line ending (Pillow alone would start the pixels
    at the "\n" and rotate the channels); with the size of "\r" + pixels, the "\n" is the first pixel."""
    import numpy as np

    from edgetl.runtime.preprocess import load_rgb

    px = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    (tmp_path / "crlf.ppm").write_bytes(b"P6\n# a comment\n7 5\n255\r\n" + px.tobytes())
    assert (np.asarray(load_rgb(tmp_path / "crlf.ppm")) == px).all()
    first_is_lf = px.copy()
    first_is_lf[0, 0, 0] = 10
    (tmp_path / "cr.ppm").write_bytes(b"P6 7 5 255\r" + first_is_lf.tobytes())
    assert (np.asarray(load_rgb(tmp_path / "cr.ppm")) == first_is_lf).all()

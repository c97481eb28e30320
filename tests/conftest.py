"""Shared fixtures: tiny generated image folders and one real pipeline run reused by many tests."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("EDGETL_OFFLINE", "1")  # tests never download
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_image_folder(root: Path, per_class: int = 12, size: int = 48, seed: int = 0) -> Path:
    """Easy, deterministic 3-class data: a coloured disc on a noisy grey background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.normal(128, 20, (size, size, 3))
            cx, cy, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.2, size * 0.35)]
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            bg[mask] = np.asarray(colour) + rng.normal(0, 10, 3)
            Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory):
    """Builds in the tests cache features in a folder of their own, never in ~/.cache."""
    os.environ["EDGETL_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))


def preprocessed(items, contract: dict) -> np.ndarray:
    """The evaluation tensors of data items (what loader.Split gives, held in memory)."""
    from edgetl.runtime.preprocess import load_rgb, preprocess

    return np.stack([preprocess(load_rgb(it.path), contract) for it in items])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs")


FAST_FLAGS = ["--image-size", "64", "--epochs", "15", "--seed", "0", "-q"]


@pytest.fixture(scope="session")
def build_data(tmp_path_factory) -> Path:
    """The shared build's data: tiny_data's kind, 16 images a class (12 test images: one is 8 pp)."""
    return make_image_folder(tmp_path_factory.mktemp("build-data") / "imgs", per_class=16)


@pytest.fixture(scope="session")
def built(tmp_path_factory, build_data) -> dict:
    """One real build of every built-in target (tests parametrize over them): real MobileNetV2 ImageNet
    weights, real NNCF/ORT/OpenVINO."""
    from click.testing import CliRunner

    from edgetl.cli import cli
    from edgetl.profiles import builtin_names

    out = tmp_path_factory.mktemp("out") / "build"
    targets = [arg for name in builtin_names() for arg in ("--target", name)]
    shared, cache = os.environ["EDGETL_CACHE"], tmp_path_factory.mktemp("built-cache")
    os.environ["EDGETL_CACHE"] = str(cache)  # cold, whatever ran before
    try:
        with _test_split_poisoned_while_searching() as searches:
            res = CliRunner().invoke(cli, ["build", "--data", str(build_data), "--out", str(out), "--json",
                                           *targets, *FAST_FLAGS])
    finally:
        os.environ["EDGETL_CACHE"] = shared
    assert res.exit_code == 0, res.output
    return {"out": out, "bundle": out / "cpu", "openvino": out / "openvino", "gpu": out / "gpu-int8",
            "bundles": {name: out / name for name in builtin_names()}, "result": json.loads(res.stdout),
            "poisoned_searches": len(searches), "cache": cache}


class ReadBeforeTheGate(BaseException):
    """Not an Exception: no `except Exception` on the way (a search records a crashing candidate and
    goes on) can swallow it; it ends the build."""


class Poison:
    """Stands in for a test-split array: any use (indexing, len, iteration, numpy, attributes) fails."""

    def _fail(self, *a, **k):
        raise ReadBeforeTheGate("the test split was read before the gate")

    __getitem__ = __len__ = __iter__ = __array__ = __bool__ = __float__ = _fail

    def __getattr__(self, name):
        self._fail()


@contextlib.contextmanager
def _test_split_poisoned_while_searching():
    """While each target's INT8 search (quantizers + refiners) runs, every field of the build's gate
    evidence is a Poison; the gate reads it as usual afterwards. Yields the searches made."""
    from edgetl import pipeline, target

    made, searches = [], []
    real_evidence, real_search = pipeline.GateEvidence, target.search_int8

    def record(*args, **kwargs):
        made.append(real_evidence(*args, **kwargs))
        return made[-1]

    def guarded(*args, **kwargs):
        assert len(made) == 1, "one gate evidence per build"
        saved = dict(vars(made[0]))
        for k in saved:
            setattr(made[0], k, Poison())
        try:
            searches.append(real_search(*args, **kwargs))
            return searches[-1]
        finally:
            vars(made[0]).update(saved)

    pipeline.GateEvidence, target.search_int8 = record, guarded
    try:
        yield searches
    finally:
        pipeline.GateEvidence, target.search_int8 = real_evidence, real_search

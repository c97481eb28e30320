"""The float reference (edgetl/reference.py): onnxruntime FP32, cached trunk rows, the same bytes either way."""

import dataclasses

import numpy as np
import pytest
import torch

from edgetl import backbones, loader
from edgetl.prepare import prepare
from edgetl.progress import NullProgress
from edgetl.recipe import BuildRecipe
from edgetl.reference import float_logits
from edgetl.train import forward_batches
from edgetl.views import EvidenceCrops


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    recipe = BuildRecipe.model_validate({"data": {"path": str(tiny_data)}, "model": {"image_size": 64}, "seed": 0})
    p = prepare(recipe)
    assert p.evidence_views >= 2
    torch.manual_seed(0)
    trunk = backbones.trunk_of(p.model).eval()
    head = torch.nn.Linear(1280, len(p.dataset.classes))
    net = torch.nn.Sequential(trunk, head).eval()
    tmp = tmp_path_factory.mktemp("reference")
    ds = p.dataset
    x = {s: loader.Split.write(ds.split(s), p.contract, tmp / f"{s}.crops", 0) for s in ("val", "test")}
    x["evidence"] = loader.Split.write(ds.split("val"), p.contract, tmp / "evidence.crops", 0,
                                       samples=EvidenceCrops(ds.split("val"), p.contract, p.evidence_views, 0))
    return p, net, x, tmp


def test_cached_rows_give_the_same_bytes_as_computed_ones_and_the_float_model(setup):
    p, net, x, tmp = setup
    cache = tmp / "cache"
    cold = float_logits(net, x, p, tmp / "cold", cache_dir=cache)
    assert (tmp / "cold" / "float-reference").is_dir()  # the trunk's twin computed the rows
    assert len(list(cache.glob("*/*.keys.npy"))) == 3  # one float32 shard per split
    warm = float_logits(net, x, p, tmp / "warm", cache_dir=cache)
    assert not (tmp / "warm" / "float-reference").exists()  # every row read: no twin, no trunk
    uncached = float_logits(net, x, p, tmp / "none", cache_dir=None)
    for s in x:
        assert cold[s].dtype == np.float32 and cold[s].shape == (len(x[s]), len(p.dataset.classes))
        assert cold[s].tobytes() == warm[s].tobytes() == uncached[s].tobytes(), s
        eager = forward_batches(net, x[s], 8, NullProgress(), s).numpy()  # the float model in torch
        np.testing.assert_allclose(cold[s], eager, atol=1e-4, rtol=0)
        assert (cold[s].argmax(1) == eager.argmax(1)).all()


def test_another_split_or_head_is_never_read_from_rows_of_another(setup):
    """The rows are the trunk's, keyed by image content and view: a new head gives new logits from the
    same rows; a split the cache has no key scheme for is computed."""
    p, net, x, tmp = setup
    cache = tmp / "cache2"
    first = float_logits(net, x, p, tmp / "a", cache_dir=cache)
    other = torch.nn.Sequential(net[0], torch.nn.Linear(1280, len(p.dataset.classes))).eval()
    second = float_logits(other, x, p, tmp / "b", cache_dir=cache)
    assert not (tmp / "b" / "float-reference").exists()
    assert not np.allclose(first["val"], second["val"])
    eager = forward_batches(other, x["test"], 8, NullProgress(), "test").numpy()
    np.testing.assert_allclose(second["test"], eager, atol=1e-4, rtol=0)
    extra = float_logits(net, {"calibration": x["val"][:5]}, p, tmp / "c", cache_dir=cache)
    assert (tmp / "c" / "float-reference").is_dir()
    assert extra["calibration"].tobytes() == first["val"][:5].tobytes()


def test_fine_tuned_models_run_whole_in_onnxruntime(setup):
    p, net, x, tmp = setup
    tuned = dataclasses.replace(p, inputs=dataclasses.replace(p.inputs, recipe=p.recipe.model_copy(update={
        "train": p.recipe.train.model_copy(update={"strategy": "fine-tune"})})))
    got = float_logits(net, {"test": x["test"]}, tuned, tmp / "ft", cache_dir=tmp / "cache3")
    assert not (tmp / "cache3").exists()  # nothing cached: the trunk is not frozen
    eager = forward_batches(net, x["test"], 8, NullProgress(), "test").numpy()
    np.testing.assert_allclose(got["test"], eager, atol=1e-4, rtol=0)

import numpy as np
import pytest
import torch

from edgetl import backbones, data, train
from edgetl.recipe import TrainSection

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ds(tiny_data):
    return data.scan(tiny_data)


def _trunk():
    spec = backbones.get("mobilenet_v2")
    return backbones.trunk_of(backbones.load_pretrained(spec, backbones.resolve_weights(spec), 64)), spec.contract(64)


def test_feature_extract_learns_and_is_seeded(ds, tmp_path):
    cfg = TrainSection(epochs=15, augment_views=1)
    runs = []
    for workers in (0, 2):  # and the worker count changes nothing
        trunk, contract = _trunk()
        runs.append(train.fit_feature_extract(train.Job(trunk, 3, ds.split("train"), ds.split("val"), contract, cfg,
                                                        seed=3), fit=train.Fit(workers=workers)))
    assert runs[0].best_val_accuracy >= 0.8
    assert runs[0].history == runs[1].history  # fully seeded
    head0, head1 = runs[0].model[1].weight, runs[1].model[1].weight
    assert torch.equal(head0, head1)


def test_fine_tune_updates_only_the_top_blocks_bit_identically_for_any_worker_count(ds, tmp_path):
    from edgetl.loader import Split

    runs = []
    for workers in (0, 2):
        trunk, contract = _trunk()
        before = {k: v.clone() for k, v in trunk.state_dict().items()}
        val_x = Split.write(ds.split("val"), contract, tmp_path / f"val{workers}", workers)
        cfg = TrainSection(strategy="fine-tune", epochs=2, unfreeze_blocks=2, batch_size=8, patience=5)
        runs.append(train.fit_fine_tune(train.Job(trunk, 3, ds.split("train"), ds.split("val"), contract, cfg, seed=0,
                                                  val_x=val_x), fit=train.Fit(workers=workers)))
    after = runs[0].model[0].state_dict()
    n_blocks = len(trunk.features)
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k]) and k.startswith("features.")}
    assert changed and changed <= {str(n_blocks - 2), str(n_blocks - 1)}
    assert len(runs[0].history) >= 1 and np.isfinite(runs[0].history[0]["train_loss"])
    assert runs[0].history == runs[1].history
    second = runs[1].model.state_dict()
    assert all(torch.equal(v, second[k]) for k, v in runs[0].model.state_dict().items())


def test_training_views_are_seeded_per_image_not_by_order(ds):
    """The head refit regenerates the views training used: same seed -> same arrays, in any order,
    whatever the global RNG state or the worker count; an image's views follow its content, not its
    position."""
    from edgetl.views import TrainViews

    items = ds.split("train")
    contract = backbones.get("mobilenet_v2").contract(64)
    a = TrainViews(items, contract, 2, seed=3)
    b = TrainViews(items, contract, 2, seed=3, workers=2)
    forward = np.concatenate(list(a.batches(5)))
    torch.manual_seed(123)
    backward = np.concatenate(list(b.batches(4, order=list(reversed(range(len(b)))))))[::-1]
    assert len(a) == 3 * len(items) and np.array_equal(forward, backward)
    other = TrainViews(items, contract, 2, seed=4)
    aug = [k for k in range(len(a)) if k % 3]
    assert not np.array_equal(forward[aug], np.concatenate(list(other.batches(8, order=aug))))
    assert np.array_equal(forward[::3], np.concatenate(list(other.batches(8, order=range(0, len(a), 3)))))  # clean
    shifted = TrainViews(items[1:], contract, 2, seed=3)  # one image fewer: the others' views are unchanged
    assert np.array_equal(forward[3:], np.concatenate(list(shifted.batches(8))))


def test_split_on_disk_reads_exactly_what_preprocess_gives(ds, tmp_path):
    from edgetl.loader import Split
    from edgetl.runtime.preprocess import load_rgb, preprocess

    contract = backbones.get("mobilenet_v2").contract(64)
    items = ds.split("test")
    split = Split.write(items, contract, tmp_path / "test.crops", workers=2)
    want = np.stack([preprocess(load_rgb(it.path), contract) for it in items])
    assert split.shape == want.shape and len(split) == len(items)
    assert np.array_equal(split[:], want) and np.array_equal(split[2:5], want[2:5])
    assert np.array_equal(split[3], want[3]) and np.array_equal(split[[4, 0]], want[[4, 0]])
    assert np.array_equal(np.concatenate(list(split.batches(4))), want)
    assert (tmp_path / "test.crops").stat().st_size == want.nbytes // 4  # uint8 crops, 4x smaller than float32

"""Scale: the feature cache, streamed data (flat memory), and several processes (torch elastic, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl import backbones, data, features, launch, train
from edgetl.errors import EdgetlError
from edgetl.recipe import TrainSection

pytestmark = pytest.mark.integration


def _trunk(size: int = 64):
    spec = backbones.get("mobilenet_v2")
    model = backbones.load_pretrained(spec, backbones.resolve_weights(spec), size)
    return backbones.trunk_of(model), spec.contract(size)


def _extract(ds, fit, augment_views=1):
    trunk, contract = _trunk()
    ns = train.feature_namespace("mobilenet_v2", "test-weights", contract)
    return train.fit_feature_extract(train.Job(trunk, len(ds.classes), ds.split("train"), ds.split("val"), contract,
                                               TrainSection(epochs=5, augment_views=augment_views), 0,
                                               cache_namespace=ns), fit)


def test_a_warm_cache_skips_the_trunk_and_changes_nothing(tiny_data, tmp_path, monkeypatch):
    ds = data.scan(tiny_data)
    cold = _extract(ds, train.Fit(cache_dir=tmp_path / "cache"))
    assert cold.cache["hits"] == 0 and cold.cache["computed"] == cold.cache["rows"] == 2 * 21 + 6
    uncached = _extract(ds, train.Fit())  # rows are float16 with or without the cache

    def no_trunk(*a, **k):
        raise AssertionError("the trunk ran although every row was cached")

    monkeypatch.setattr(train, "trunk_rows", no_trunk)
    warm = _extract(ds, train.Fit(cache_dir=tmp_path / "cache"))
    assert warm.cache["hits"] == warm.cache["rows"] and warm.cache["computed"] == 0 and not warm.cache["written"]
    for other in (warm, uncached):
        assert torch.equal(cold.model[1].weight, other.model[1].weight) and cold.history == other.history


def test_a_changed_image_recomputes_its_row_only(tiny_data, tmp_path):
    folder = shutil.copytree(tiny_data, tmp_path / "data")
    cache = tmp_path / "cache"
    first = _extract(data.scan(folder), train.Fit(cache_dir=cache), augment_views=0)
    ds = data.scan(folder)
    changed = ds.split("train")[0].path
    img = np.asarray(Image.open(changed)).copy()
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(changed)
    second = _extract(data.scan(folder), train.Fit(cache_dir=cache), augment_views=0)
    assert first.cache["computed"] == first.cache["rows"]
    assert second.cache["computed"] == 1 and second.cache["hits"] == second.cache["rows"] - 1
    assert len(list(cache.rglob("*.keys.npy"))) == 3  # the train and val shards of the first build + one row


def test_cache_shards_are_written_atomically_and_bad_ones_skipped(tmp_path):
    cache = features.FeatureCache(tmp_path, {"ns": 1})
    keys = cache.row_keys(["a", "b", "c"])
    cache.write(keys, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".tmp")]
    out = np.zeros((2, 4), np.float16)
    [(data_file, pairs)] = cache.find([keys[2], keys[0]]).items()
    features.FeatureCache.read_into(out, data_file, pairs)
    assert out.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    data_file.write_bytes(b"not an array")  # a damaged shard is skipped (its rows recomputed), never fatal
    assert cache.find(keys) == {}
    data_file.write_bytes(b"")  # zero bytes: np.load raises EOFError, skipped the same way
    assert cache.find(keys) == {}


def test_a_cache_of_zero_length_files_is_recomputed_not_fatal(tiny_data, tmp_path):
    """Every cache file truncated to 0 bytes (np.load raises EOFError): the build recomputes the rows."""
    cache = tmp_path / "cache"
    first = _extract(data.scan(tiny_data), train.Fit(cache_dir=cache), augment_views=0)
    for f in cache.rglob("*.npy"):
        f.write_bytes(b"")
    again = _extract(data.scan(tiny_data), train.Fit(cache_dir=cache), augment_views=0)
    assert again.cache["hits"] == 0 and again.cache["computed"] == again.cache["rows"] == first.cache["rows"]


MEMORY_SCRIPT = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
from edgetl import data, loader, train
from edgetl.recipe import TrainSection
from edgetl.backbones import get

root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for c in range(4):
    (root / f"c{c}").mkdir(parents=True)
    for i in range(n // 4):
        px = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        px[..., c % 3] = 200
        Image.fromarray(px).save(root / f"c{c}" / f"{i:05d}.png")
contract = get("mobilenet_v2").contract(64)
ds = data.scan(root)
splits = {s: loader.Split.write(ds.split(s), contract, root.parent / f"{s}.crops", 1) for s in ("val", "test")}
# A stub trunk (per-channel means -> 64 features): everything but the network itself is real.
train.trunk_rows = lambda *a, **k: (lambda x: np.repeat(x.mean(axis=(2, 3)), 22, axis=1)[:, :64])
res = train.fit_feature_extract(train.Job(__import__("torch").nn.Identity(), 4, ds.split("train"), ds.split("val"),
                                          contract, TrainSection(epochs=2, augment_views=2), 0), train.Fit(workers=1))
ref = np.concatenate([res.model[1](__import__("torch").from_numpy(
    np.repeat(b.mean(axis=(2, 3)), 22, axis=1)[:, :64])).detach().numpy() for b in splits["test"].batches(64)])
print(json.dumps({"n": n, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": len(res.view_logits), "test": len(ref)}))
"""


def test_memory_stays_flat_from_500_to_5k_images_on_a_stubbed_trunk(tmp_path):
    """Nothing holds the decoded data: peak RSS of scan + decode + streamed views + head training
    grows by < 15 % from 500 to 5,000 images (the trunk is a stub; its rows are 64 numbers);
    benchmarks/scale.py measures 1k to 20k photos with the real trunk."""
    peaks = {}
    for n in (500, 5000):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / f"d{n}" / "imgs"), str(n)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks[5000]["rows"] == 10 * peaks[500]["rows"]
    assert peaks[5000]["rss_mb"] <= 1.15 * peaks[500]["rss_mb"], peaks


def _fit_in_ranks(folder: str, strategy: str, tmp: str):
    """Run by every launched process: the same training, this rank's share of it."""
    from edgetl.loader import Split

    ranks, device = launch.join("cpu", 120)
    ds = ranks.broadcast(data.scan(folder) if ranks.main else None)
    trunk, contract = _trunk()
    cfg = TrainSection(strategy=strategy, epochs=3, augment_views=1, batch_size=8, unfreeze_blocks=1)
    val_x = Split.write(ds.split("val"), contract, f"{tmp}/val", 0) if ranks.main else None
    res = train.STRATEGIES[strategy](train.Job(trunk, 3, ds.split("train"), ds.split("val"), contract, cfg, 0,
                                               val_x=val_x), train.Fit(device, 0, ranks))
    launch.leave()
    return None if res.model is None else {k: v.numpy() for k, v in res.model.state_dict().items()}


def _fit_here(folder, strategy: str, tmp_path):
    from edgetl.loader import Split

    ds = data.scan(folder)
    trunk, contract = _trunk()
    cfg = TrainSection(strategy=strategy, epochs=3, augment_views=1, batch_size=8, unfreeze_blocks=1)
    val_x = Split.write(ds.split("val"), contract, tmp_path / "val", 0)
    res = train.STRATEGIES[strategy](train.Job(trunk, 3, ds.split("train"), ds.split("val"), contract, cfg, 0,
                                               val_x=val_x), train.Fit())
    return {k: v.numpy() for k, v in res.model.state_dict().items()}


@pytest.mark.parametrize("strategy", ["feature-extract", "fine-tune"])
def test_two_gloo_processes_train_what_one_process_trains(tiny_data, tmp_path, strategy):
    two = launch.launch(2, _fit_in_ranks, (str(tiny_data), strategy, str(tmp_path)))
    one = _fit_here(tiny_data, strategy, tmp_path)
    assert set(two) == set(one)
    diff = {k: float(np.abs(two[k].astype(np.float64) - one[k]).max()) for k in one if one[k].size}
    if strategy == "feature-extract":  # rank 0 trains the head on the ranks' rows, as one process does
        assert max(diff.values()) == 0, diff
    # Fine-tune: each rank's half-batch gradient, summed by the all-reduce, rounds otherwise than one
    # process's whole-batch sum, and the steps compound it (here 1e-6; with the numerics' thread
    # count fixed, threads.py, that rounding is all that differs): the same steps, not the same bits.
    assert max(diff["1.weight"], diff["1.bias"]) <= 1e-5, diff  # the head
    assert max(diff.values()) <= 1e-4, diff  # fine-tuned blocks


def _fails_on_rank_1(hang: bool, timeout_s: float, pid_file: str):
    if hang and os.environ.get("RANK") == "1":
        Path(pid_file).write_text(str(os.getpid()))  # before joining: whatever happens next, the test finds it
    ranks, _ = launch.join("cpu", timeout_s)
    if ranks.rank == 1:
        if hang:
            time.sleep(600)  # never joins the collective below
        raise RuntimeError("rank 1 cannot read its data")
    ranks.broadcast("waiting for everyone")
    ranks.gather("done")
    launch.leave()


def _gone(pid: int, within_s: float = 30) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_failing_rank_is_named_as_the_cause(tmp_path):
    """Rank 1 fails at once; rank 0 then fails in the collective (an echo). The first failure, on the
    machine's monotonic clock, is the cause (a generous timeout: a loaded machine must not time rank 0
    out before rank 1 has even started)."""
    with pytest.raises(EdgetlError) as e:
        launch.launch(2, _fails_on_rank_1, (False, 120, str(tmp_path / "pid")))
    assert str(e.value) == "rank 1 of 2 failed: RuntimeError: rank 1 cannot read its data"
    assert e.value.exit_code == 3


def test_a_stuck_rank_ends_the_run_and_is_killed(tmp_path):
    """Rank 1 never joins: rank 0's collective times out (6 s) and ends the run; the launcher stops the
    sleeping rank."""
    pid_file = tmp_path / "pid"
    with pytest.raises(EdgetlError, match="rank 0 of 2 failed"):
        launch.launch(2, _fails_on_rank_1, (True, 6, str(pid_file)))
    assert _gone(int(pid_file.read_text())), "the stuck rank is still running"

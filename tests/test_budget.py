"""The latency-budget search (edgetl/budget.py, latency.py, device_profile.py): real training on the
built-in data and on scikit-learn's digits, real onnxruntime latency models timed on this machine,
real device profiles. Small on purpose: two backbones at 32 and 48 px, feature-extract, effort low."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl import budget, device_profile, prepare
from edgetl.cli import cli
from edgetl.errors import UsageError
from edgetl.progress import NullProgress
from edgetl.recipe import load_recipe

SPACE = {"backbones": ["mobilenet_v2", "efficientnet_lite0"], "image_sizes": [32, 48], "runs": 5}
RECIPE = """targets = ["cpu"]
seed = 0
[data]
calibration_size = 16
[train]
epochs = 5
augment_views = 0
[quantize]
effort = "low"
[gate]
max_accuracy_drop_pp = 100
min_top1_agreement = 0
[search]
backbones = ["mobilenet_v2", "efficientnet_lite0"]
image_sizes = [32, 48]
runs = 5
"""


def _recipe(tmp: Path, extra: str = "") -> Path:
    path = tmp / "search.toml"
    path.write_text(RECIPE + extra, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """This module's feature cache (never the user's): shared by its searches, so a repeat reads it."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """A device profile of THIS machine over the space (`edgetl bench --profile`, real timings) and the
    graphs for a torch-free device; the budget sits between its second and third fastest configurations."""
    tmp = tmp_path_factory.mktemp("profile")
    res = CliRunner().invoke(cli, ["bench", "--profile", str(tmp / "here.json"), "--target", "cpu",
                                   "--backbones", "mobilenet_v2,efficientnet_lite0", "--image-sizes", "32,48",
                                   "--runs", "5", "--graphs", str(tmp / "graphs"), "--json"])
    assert res.exit_code == 0, res.output
    prof = json.loads((tmp / "here.json").read_text())
    lat = sorted(r["latency_ms"] for r in prof["latencies"])
    return {"path": tmp / "here.json", "profile": prof, "graphs": tmp / "graphs", "budget": (lat[1] + lat[2]) / 2,
            "tmp": tmp}


def _reversed(prof: dict, path: Path) -> Path:
    """The same profile with the latencies' order reversed: the fastest configuration is now the slowest."""
    rows = sorted(prof["latencies"], key=lambda r: r["latency_ms"])
    values = [r["latency_ms"] for r in rows][::-1]
    rev = {**prof, "latencies": [{**r, "latency_ms": v} for r, v in zip(rows, values, strict=True)]}
    path.write_text(json.dumps(rev), encoding="utf-8")
    return path


def _search(recipe_path: Path, data: Path | None, budget_ms: float, profile: Path | None, tmp: Path,
            cache: Path):
    overrides = {"search.latency_ms": budget_ms, "search.device_profile": profile, "out": tmp / "out"}
    if data is not None:
        overrides["data.path"] = data
    recipe = load_recipe(recipe_path, overrides)
    build = prepare.scan(recipe, prepare.check(recipe, budget.space(recipe.search)))
    return budget.search(build, NullProgress(), 0, cache, "cpu", tmp)


def _most_accurate_that_fits(search: dict) -> dict:
    fits = [c for c in search["configurations"] if c["latency_ms"] <= search["latency_ms"]]
    return min(fits, key=lambda c: (-c["val_accuracy"], c["latency_ms"]))


def _key(c: dict) -> tuple:
    return c["backbone"], c["image_size"]


def test_profile_records_the_device(measured):
    prof = measured["profile"]
    assert prof["format"] == device_profile.FORMAT and prof["engine"] == "ort"
    assert prof["cpu"] and prof["threads"] >= 1 and "onnxruntime" in prof["runtime_versions"]
    assert {(r["backbone"], r["image_size"]) for r in prof["latencies"]} == \
        {(b, s) for b in SPACE["backbones"] for s in SPACE["image_sizes"]}
    assert all(r["latency_ms"] > 0 and r["runs"] == 5 and r["precision"] == "int8" for r in prof["latencies"])
    index = json.loads((measured["graphs"] / "index.json").read_text())
    assert len(index["graphs"]) == 4 and all((measured["graphs"] / g["folder"] / g["files"][0]).is_file()
                                             for g in index["graphs"])


@pytest.fixture(scope="module")
def searched(measured, cache, tmp_path_factory) -> dict:
    """Two identical search builds on the built-in data, picking by the measured device profile."""
    tmp = tmp_path_factory.mktemp("searched")
    recipe = _recipe(tmp)
    outs = []
    for name in ("one", "two"):
        res = CliRunner().invoke(cli, ["build", str(recipe), "--latency-ms", str(measured["budget"]),
                                       "--device-profile", str(measured["path"]), "--out", str(tmp / name),
                                       "--cache-dir", str(cache), "--json", "-q"])
        assert res.exit_code == 0, res.output
        outs.append(tmp / name)
    return {"outs": outs, "result": json.loads(res.stdout), "tmp": tmp}


def test_search_build_picks_the_most_accurate_that_fits(searched, measured):
    manifest = json.loads((searched["outs"][0] / "cpu" / "manifest.json").read_text())
    s = manifest["search"]
    assert s["latency_ms"] == pytest.approx(measured["budget"])
    assert len(s["configurations"]) == 4
    assert {"backbone", "image_size", "val_accuracy", "latency_ms"} <= set(s["configurations"][0])
    lat = {(r["backbone"], r["image_size"]): r["latency_ms"] for r in measured["profile"]["latencies"]}
    assert all(c["latency_ms"] == lat[_key(c)] for c in s["configurations"])  # the profile's, not measured here
    assert min(lat.values()) < s["latency_ms"] < max(lat.values())
    chosen = s["chosen"]
    assert chosen["latency_ms"] <= s["latency_ms"] and chosen["fits"]
    assert _key(chosen) == _key(_most_accurate_that_fits(s))
    assert s["reason"] and "device profile" in s["latency_source"]
    # the bundle is the chosen configuration, and its recipe rebuilds it without searching
    assert manifest["backbone"]["name"] == chosen["backbone"]
    assert manifest["preprocess"]["input_size"] == [chosen["image_size"]] * 2
    pinned = load_recipe(searched["outs"][0] / "cpu" / "recipe.toml")
    assert (pinned.model.backbone, pinned.model.image_size) == _key(chosen) and not pinned.search.active


def test_search_build_is_deterministic_and_reported(searched):
    one, two = (json.loads((o / "cpu" / "manifest.json").read_text()) for o in searched["outs"])
    assert one["digest"] == two["digest"] and one["search"] == two["search"]
    page = (searched["outs"][0] / "report.html").read_text()
    assert "<h2>Budget search</h2>" in page and 'alt="budget search: val accuracy vs latency"' in page
    assert "## Budget search" in (searched["outs"][0] / "report.md").read_text()
    assert _key(searched["result"]["search"]["chosen"]) == _key(one["search"]["chosen"])


def test_bundle_takes_a_device_profile_without_torch(searched, measured, tmp_path):
    """The bundle's own predict.py times the exported graphs (torch is blocked in that process)."""
    block = "import sys, os, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; " \
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')"
    out = tmp_path / "device.json"
    res = subprocess.run([sys.executable, "-c", block, str(searched["outs"][0] / "cpu" / "predict.py"), "--profile",
                          str(measured["graphs"]), "--runs", "5", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    prof = json.loads(out.read_text())
    assert prof["taken_by"] == "predict.py --profile" and prof["engine"] == "ort" and len(prof["latencies"]) == 4
    dp = device_profile.load(out, [prepare.check_profiles(load_recipe(None, {"targets": ["cpu"]}))[0]])
    assert dp.latency("mobilenet_v2", 32, dp_profile("cpu"))["latency_ms"] > 0
    for extra, says in ((["--runs", "3"], "--runs 3: below the 5 rounds"),
                        (["--out", str(tmp_path / "missing" / "d.json")], "cannot write")):
        res = subprocess.run([sys.executable, str(searched["outs"][0] / "cpu" / "predict.py"), "--profile",
                              str(measured["graphs"]), "--runs", "5", *extra], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 2 and res.stderr.startswith("predict.py: error: ") and says in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "missing").exists()


def dp_profile(name: str):
    from edgetl.profiles import load_profile

    return load_profile(name)


def test_budget_below_the_fastest_exits_2_naming_it(measured, cache, tmp_path):
    fastest = min(measured["profile"]["latencies"], key=lambda r: r["latency_ms"])
    res = CliRunner().invoke(cli, ["build", str(_recipe(tmp_path)), "--latency-ms", "0.0001", "--device-profile",
                                   str(measured["path"]), "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
                                   "-q"])
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("edgetl: error: --latency-ms 0.0001: no configuration fits")
    assert f"the fastest is {fastest['backbone']} at {fastest['image_size']} px" in line
    assert not (tmp_path / "out").exists()


def test_a_profile_of_another_runtime_or_target_is_refused(measured, tmp_path):
    res = CliRunner().invoke(cli, ["build", str(_recipe(tmp_path)), "--target", "openvino", "--latency-ms", "5",
                                   "--device-profile", str(measured["path"]), "--out", str(tmp_path / "out"),
                                   "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert res.exit_code == 2
    assert "measured with the ort runtime, but target openvino runs openvino" in res.output
    # same runtime, precision and input, another device: an x86 profile is not an ARM64 one
    res = CliRunner().invoke(cli, ["build", str(_recipe(tmp_path)), "--target", "cpu", "--target", "cpu-arm64",
                                   "--latency-ms", "5", "--device-profile", str(measured["path"]), "--out",
                                   str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert line.startswith(f"edgetl: error: --device-profile {measured['path']}: taken for target cpu, but the "
                           "build applies it to target cpu-arm64") and "fix:" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_reversed_device_latencies_change_the_choice(measured, cache, tmp_path):
    recipe = _recipe(tmp_path)
    _, here = _search(recipe, None, measured["budget"], measured["path"], tmp_path, cache)
    _, there = _search(recipe, None, measured["budget"], _reversed(measured["profile"], tmp_path / "rev.json"),
                       tmp_path, cache)
    a, b = here.to_dict(), there.to_dict()
    assert _key(a["chosen"]) == _key(_most_accurate_that_fits(a))
    assert _key(b["chosen"]) == _key(_most_accurate_that_fits(b))
    # the budget lies between the 2nd and 3rd fastest: reversed, the configurations that fit are the others
    assert {_key(c) for c in a["configurations"] if c["fits"]}.isdisjoint(
        {_key(c) for c in b["configurations"] if c["fits"]})
    assert _key(a["chosen"]) != _key(b["chosen"])


def test_search_on_digits_measured_on_this_machine(cache, tmp_path):
    """scikit-learn's digits, latencies measured here (no profile): the pick is the most accurate that
    fits by the recorded table; a repeated search reads the cached measurements and picks the same."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from digits import write_digits

    data = write_digits(tmp_path / "digits")
    recipe = _recipe(tmp_path)
    _, first = _search(recipe, data, 1e9, None, tmp_path, cache)
    lat = sorted(c.latency_ms for c in first.configurations)
    budget_ms = (lat[1] + lat[2]) / 2
    pinned, record = _search(recipe, data, budget_ms, None, tmp_path, cache)
    s = record.to_dict()
    assert min(lat) < budget_ms < max(lat)
    assert [c["latency_ms"] for c in s["configurations"]] == [c.latency_ms for c in first.configurations]  # cached
    assert _key(s["chosen"]) == _key(_most_accurate_that_fits(s)) and s["chosen"]["latency_ms"] <= budget_ms
    assert (pinned.model.backbone, pinned.model.image_size) == _key(s["chosen"])
    assert "build machine" in s["latency_source"]
    # no profile: the same inputs and the same cached measurements choose the same configuration
    _, again = _search(recipe, data, budget_ms, None, tmp_path, cache)
    assert again.to_dict()["configurations"] == s["configurations"] and _key(again.to_dict()["chosen"]) == \
        _key(s["chosen"])


def _tried(name: str, size: int, acc: float, ms: float) -> budget.Tried:
    return budget.Tried(name, size, acc, ms, latency_by_target={"cpu": {"latency_ms": ms}})


def test_pick_ties_go_to_the_faster_and_nothing_fitting_names_the_fastest():
    tried = [_tried("a", 96, 0.9, 3.0), _tried("b", 96, 0.9, 2.0), _tried("c", 96, 0.95, 9.0)]
    chosen, reason = budget.pick(tried, 5.0, "measured")
    assert chosen.backbone == "b" and "tied with a@96" in reason and "more accurate" in reason
    with pytest.raises(UsageError, match=r"the fastest is b at 96 px, 2\.000 ms on target cpu"):
        budget.pick(tried, 1.0, "measured")


def test_search_recipe_is_validated(tmp_path):
    with pytest.raises(UsageError, match="search.latency_ms"):
        load_recipe(None, {"search.device_profile": tmp_path / "p.json"})
    with pytest.raises(UsageError, match="nproc"):
        load_recipe(None, {"search.latency_ms": 4, "compute.nproc": 2})
    with pytest.raises(UsageError, match="unknown backbone 'resnet'"):
        load_recipe(None, {"search.backbones": ["resnet"]})
    with pytest.raises(UsageError, match="every size is above the native size"):
        budget.space(load_recipe(None, {"search.image_sizes": [300]}).search)
    assert budget.space(load_recipe(None, {"search.backbones": ["efficientnet_lite2"],
                                           "search.image_sizes": [96, 240, 260, 300]}).search) == \
        [("efficientnet_lite2", 96), ("efficientnet_lite2", 240), ("efficientnet_lite2", 260)]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UsageError, match="not an edgetl device profile"):
        device_profile.load(bad, [])


def _profile_json(tmp: Path, name: str = "p", **changes) -> Path:
    """A hand-written profile of the test space for target cpu (what load() checks, not timings)."""
    rows = [{"backbone": b, "image_size": s, "precision": "int8", "model_input": "uint8-nhwc", "latency_ms": 1.0 + i}
            for i, (b, s) in enumerate((b, s) for b in SPACE["backbones"] for s in SPACE["image_sizes"])]
    data = {"format": device_profile.FORMAT, "engine": "ort", "backend": "onnxruntime", "target": "cpu",
            "latencies": rows, **changes}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}), encoding="utf-8")
    return path


def test_a_malformed_profile_is_one_line_naming_the_file(tmp_path):
    cpu = [dp_profile("cpu")]
    good = json.loads(_profile_json(tmp_path).read_text())
    cases = {"engine": _profile_json(tmp_path, "a", engine=None),
             "latencies.0.image_size": _profile_json(tmp_path, "b", latencies=[
                 {k: v for k, v in good["latencies"][0].items() if k != "image_size"}]),
             "latencies.1.latency_ms": _profile_json(tmp_path, "c", latencies=[
                 good["latencies"][0], {**good["latencies"][1], "latency_ms": "fast"}]),
             "target": _profile_json(tmp_path, "d", target=None)}
    for where, path in cases.items():
        with pytest.raises(UsageError) as e:
            device_profile.load(path, cpu)
        assert str(e.value).startswith(f"--device-profile {path}: {where}: ") and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="taken for target cpu, but the build applies it to target cpu-arm64"):
        device_profile.load(_profile_json(tmp_path), [dp_profile("cpu"), dp_profile("cpu-arm64")])
    dp = device_profile.load(_profile_json(tmp_path), cpu)
    dp.covers([(b, s) for b in SPACE["backbones"] for s in SPACE["image_sizes"]], cpu)
    with pytest.raises(UsageError, match="no latency of mobilenet_v2 at 64 px"):
        dp.covers([("mobilenet_v2", 32), ("mobilenet_v2", 64)], cpu)


def test_a_profile_missing_a_configuration_fails_before_any_training(tmp_path):
    """The coverage check runs before the first configuration is trained: nothing reaches the cache."""
    good = json.loads(_profile_json(tmp_path).read_text())
    path = _profile_json(tmp_path, latencies=good["latencies"][:-1])
    with pytest.raises(UsageError, match=r"no latency of efficientnet_lite0 at 48 px"):
        _search(_recipe(tmp_path), None, 5.0, path, tmp_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_weights_are_kept_for_their_backbone_and_refused_across_backbones(tmp_path):
    from edgetl import backbones

    mine = tmp_path / "my_mobilenet.pth"
    mine.write_bytes(backbones.resolve_weights(backbones.get("mobilenet_v2")).path.read_bytes())
    one = load_recipe(None, {"model.weights": mine, "search.latency_ms": 5, "search.backbones": ["mobilenet_v2"],
                             "search.image_sizes": [32]})
    prepare.check(one, budget.space(one.search))
    config = prepare.configure(one, "mobilenet_v2", 32)  # what the search trains with
    assert config.weights.path == mine and config.weights.origin == "--weights"
    chosen = budget.Tried("mobilenet_v2", 32, 1.0, 1.0)
    assert budget.pinned(one, chosen).model.weights == mine and not budget.pinned(one, chosen).search.active
    both = load_recipe(None, {"model.weights": mine, "search.latency_ms": 5, "search.image_sizes": [32]})
    with pytest.raises(UsageError, match=r"--weights .*my_mobilenet.pth: the file is for model.backbone mobilenet_v2, "
                                         r"but the latency search also tries efficientnet_lite0; fix: "):
        prepare.check(both, budget.space(both.search))
    assert budget.pinned(both, budget.Tried("efficientnet_lite0", 32, 1.0, 1.0)).model.weights is None


def test_predict_profile_refuses_bad_input_in_one_line(measured, tmp_path):
    """predict.py --profile's errors (bad --runs, a malformed index entry, a graph the engine cannot
    load, graphs of another target) are BundleErrors: one line, exit 2 in main(); --runs is exact."""
    from edgetl.runtime.predict import BundleError
    from edgetl.runtime.predict import device_profile as time_graphs

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "runtime.json").write_text(json.dumps({"engine": "ort", "settings": {}}), encoding="utf-8")
    graphs = measured["graphs"]
    with pytest.raises(BundleError, match=r"--runs 3: below the 5 rounds"):
        time_graphs(graphs, bundle, runs=3)
    index = json.loads((graphs / "index.json").read_text())
    one = {**index, "graphs": index["graphs"][:1]}
    prof = time_graphs(_graph_copy(graphs, tmp_path / "g1", one), bundle, runs=7, warmup=1)
    assert [r["runs"] for r in prof["latencies"]] == [7]
    bad = {**index, "graphs": [{k: v for k, v in index["graphs"][0].items() if k != "contract"}]}
    with pytest.raises(BundleError, match=r"index.json: graph entry 0 is malformed \(KeyError"):
        time_graphs(_graph_copy(graphs, tmp_path / "g2", bad), bundle, runs=5)
    broken = _graph_copy(graphs, tmp_path / "g3", one)
    (broken / one["graphs"][0]["folder"] / one["graphs"][0]["files"][0]).write_bytes(b"not onnx")
    with pytest.raises(BundleError, match=r"the ort engine cannot load it .*fix: copy the graph folder"):
        time_graphs(broken, bundle, runs=5)
    (bundle / "manifest.json").write_text(json.dumps({"target": "cpu-arm64"}), encoding="utf-8")
    with pytest.raises(BundleError, match=r"graphs for target cpu, this bundle is target cpu-arm64"):
        time_graphs(graphs, bundle, runs=5)


def _graph_copy(graphs: Path, to: Path, index: dict) -> Path:
    import shutil

    shutil.copytree(graphs, to)
    (to / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return to

"""End-to-end behaviour of `edgetl build`: exit codes, JSON, nothing half-written, the gate."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetl.backends.onnxruntime import OnnxRuntimeBackend, ort_static
from edgetl.cli import cli
from tests.conftest import FAST_FLAGS

pytestmark = pytest.mark.integration


def test_build_json_result(built):
    r = built["result"]
    assert r["ok"] and r["targets"][0]["published"]
    t = r["targets"][0]
    assert t["quantization"]["attempts"][0]["quantizer"] == "nncf_ptq+head_refit"  # the cpu profile's first
    assert t["metrics"]["n_test"] == sum(r["data"]["counts"]["test"].values())
    assert set(r["timings"]) >= {"prepare", "train", "total"}
    report = json.loads((built["out"] / "report.json").read_text())
    assert report["targets"][0]["metrics"] == json.loads(json.dumps(t["metrics"]))


# `edgetl build ...` in a process that may run on one CPU only (its affinity mask, as `taskset -c 0`)
ON_ONE_CPU = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from edgetl.cli import main; sys.argv[0] = 'edgetl'; main()")


def test_build_is_reproducible(built, build_data, tmp_path, monkeypatch):
    """Same data and seed again, later, into another folder, as a one-target build (its features now
    come from the shared build's feature cache) in a process that may use ONE CPU while another
    process keeps a core busy: the same numbers, the same chosen candidate, and the same bundle, byte
    for byte, file by file, as the cpu target of the every-target build (made with every CPU of the
    machine). Nothing that ships may depend on the machine's load, its CPU count or the other
    targets: torch's thread count is fixed for the numerics (edgetl/threads.py)."""
    import subprocess
    import sys

    monkeypatch.setenv("EDGETL_CACHE", str(built["cache"]))  # warm: the shared build's rows, whatever ran before

    out = tmp_path / "again"
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        res = subprocess.run([sys.executable, "-c", ON_ONE_CPU, "build", "--data", str(build_data), "--out", str(out),
                              "--json", *FAST_FLAGS], capture_output=True, text=True, timeout=1800)
    finally:
        spinner.kill()
        spinner.wait()
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout)
    assert r["machine"]["cpus_allowed"] == 1 and r["training"]["device_info"]["threads"] == 2  # numerics: 2
    assert r["targets"][0]["quantization"]["chosen"] == built["result"]["targets"][0]["quantization"]["chosen"]
    assert r["targets"][0]["metrics"] == built["result"]["targets"][0]["metrics"]
    cache = r["training"]["feature_cache"]
    assert cache["computed"] == 0 and cache["hits"] == cache["rows"] > 0
    assert f"feature cache: {cache['rows']} of {cache['rows']} rows read, 0 computed" in (out / "report.md").read_text()
    m1 = json.loads((built["bundle"] / "manifest.json").read_text())
    m2 = json.loads((out / "cpu" / "manifest.json").read_text())
    assert m1["data_sha256"] == m2["data_sha256"] and m1["calibration_sha256"] == m2["calibration_sha256"]
    assert m2["numerics"] == {"torch_threads": 2, "blas_threads": 1}
    files = sorted(p.relative_to(out / "cpu").as_posix() for p in (out / "cpu").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(built["bundle"]).as_posix() for p in built["bundle"].rglob("*")
                           if p.is_file())
    for name in files:
        assert (out / "cpu" / name).read_bytes() == (built["bundle"] / name).read_bytes(), name


def _corrupt_scales(fp32, data, profile, workdir):
    """A real ORT INT8 model whose weight scales are then scrambled (a broken quantizer)."""
    art = ort_static(fp32, data, profile, workdir)
    model = onnx.load(str(art.path))
    inits = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in inits:
            t = inits[node.input[1]]
            arr = onnx.numpy_helper.to_array(t)
            if arr.ndim == 1 and arr.size > 1:  # per-channel weight scales
                t.CopyFrom(onnx.numpy_helper.from_array(
                    (arr * rng.uniform(0.05, 20, arr.shape)).astype(arr.dtype), t.name))
    onnx.save(model, str(art.path))
    return type(art).of(art.path, art.kind, **art.meta)


def test_broken_quantization_fails_the_gate_and_publishes_nothing(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(OnnxRuntimeBackend.quantizers, "ort_static", _corrupt_scales)
    profile = tmp_path / "only-ort.toml"
    profile.write_text('name = "cpu"\nbackend = "onnxruntime"\n[quantization]\nquantizers = ["ort_static"]\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(out), "--target",
                                   str(profile), "--json", *FAST_FLAGS])
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    t = r["targets"][0]
    assert not r["ok"] and not t["published"] and t["misses"]
    assert any("agreement" in m or "accuracy drop" in m for m in t["misses"])
    assert not (out / "cpu").exists() and not list(out.glob(".staging-*"))


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/folder"], "not a directory"),
    (["--backbone", "mobilenet_v9"], "unknown backbone"),
    (["--target", "tpu"], "unknown target"),
    (["--epochs", "0"], "train.epochs"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_data, args, needle):
    out = tmp_path / "out"
    base = ["build", "--out", str(out), "--data", str(tiny_data)]
    res = CliRunner().invoke(cli, base + args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and res.output.count("\n") <= 2
    assert not out.exists()


def test_bad_recipe_key_exits_2(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("[model]\nbackbon = 'x'\n")
    res = CliRunner().invoke(cli, ["build", str(f)])
    assert res.exit_code == 2 and "unknown key 'model.backbon'" in res.output


def test_init_writes_a_valid_recipe(tmp_path):
    runner = CliRunner()
    f = tmp_path / "edgetl.toml"
    assert runner.invoke(cli, ["init", str(f)]).exit_code == 0
    assert runner.invoke(cli, ["init", str(f)]).exit_code == 2  # no silent overwrite
    from edgetl.recipe import load_recipe

    assert load_recipe(f).train.strategy == "feature-extract"


def _published_with(data: Path, tmp_path: Path, quantization: str) -> dict:
    """A cpu build with a profile of this [quantization] table; the published bundle's manifest."""
    profile = tmp_path / "profile.toml"
    profile.write_text('name = "cpu"\nbackend = "onnxruntime"\nmodel_input = "uint8-nhwc"\n' + quantization)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["build", "--data", str(data), "--out", str(out), "--target", str(profile),
                                   "--json", *FAST_FLAGS])
    assert res.exit_code == 0, res.output
    return json.loads((out / "cpu" / "manifest.json").read_text())


def test_escalation_recovers_from_a_bad_first_quantizer(tiny_data, tmp_path, monkeypatch):
    """The first quantizer misses on the validation split; NNCF PTQ (real) is tried next and ships."""
    monkeypatch.setitem(OnnxRuntimeBackend.quantizers, "ort_static", _corrupt_scales)
    manifest = _published_with(tiny_data, tmp_path, '[quantization]\nquantizers = ["ort_static", "nncf_ptq"]\n')
    q = manifest["quantization"]
    assert [a["quantizer"] for a in q["attempts"]] == ["ort_static", "nncf_ptq"]
    assert q["attempts"][0]["val_misses"] and not q["attempts"][1]["val_misses"]
    assert q["chosen"] == "nncf_ptq" and q["float_nodes"] == []


def test_a_time_limit_that_drops_a_candidate_is_a_manifest_warning(tiny_data, tmp_path):
    """qat_budget_s set (none by default): QAT passes it and the whole candidate is dropped, the next
    one ships, and the manifest says the bundle now depends on the build machine's speed."""
    m = _published_with(tiny_data, tmp_path, '[quantization]\nquantizers = ["qat", "nncf_ptq"]\n'
                                             'qat_budget_s = 0.000001\n')
    q = m["quantization"]
    assert [a["quantizer"] for a in q["attempts"]] == ["qat", "nncf_ptq"] and q["chosen"] == "nncf_ptq"
    assert q["attempts"][0]["dropped_by_time_limit"] is True
    assert any(w.startswith("a time limit dropped qat on this machine") and "unset the limit" in w
               for w in m["warnings"]), m["warnings"]


def test_fine_tune_build(tiny_data, tmp_path):
    out = tmp_path / "ft"
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(out), "--strategy", "fine-tune",
                                   "--image-size", "64", "--epochs", "2", "--json", "-q"])
    # What this tests is fine-tuning and its export, not the gate: after 2 epochs the model has borderline
    # images, and on 9 test images one INT8 flip is under the 0.90 agreement floor (exit 1, as it should)
    assert res.exit_code in (0, 1), res.output
    r = json.loads(res.stdout)
    assert r["ok"] == (res.exit_code == 0) and (r["ok"] or r["targets"][0]["misses"])
    assert r["targets"][0]["metrics"]["reference_accuracy"] >= 0.8
    assert r["training"]["strategy"] == "fine-tune" and r["training"]["epochs_run"] == 2
    assert r["targets"][0]["metrics"]["export_max_abs_diff"] < 1e-3


def test_unusable_profile_name_and_out_inside_data(tmp_path, tiny_data):
    bad = tmp_path / "p.toml"
    bad.write_text('name = "../escape"\nbackend = "onnxruntime"\n[quantization]\nquantizers = ["ort_static"]\n')
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--target", str(bad),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "name" in res.output and not (tmp_path / "o").exists()
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(tiny_data / "out")])
    assert res.exit_code == 2 and "inside the data folder" in res.output and not (tiny_data / "out").exists()


def test_wrong_weights_file_exits_2(tmp_path, tiny_data):
    import torch

    w = tmp_path / "w.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, w)
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--weights", str(w),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not fit backbone" in res.output and not (tmp_path / "o").exists()


def test_targets_built_side_by_side_give_the_same_results(built, build_data, tmp_path):
    """--jobs 2: targets gated in parallel (cores shared), speed and bundles one after another;
    every parity number is what the one-at-a-time build made, and every bundle is byte for byte the
    same (OpenVINO's counter-made node names are renamed by graph position before an IR is saved)."""
    out = tmp_path / "jobs"
    res = CliRunner().invoke(cli, ["build", "--data", str(build_data), "--out", str(out), "--json", "--jobs", "2",
                                   "--target", "cpu", "--target", "openvino", "--target", "gpu-int8", *FAST_FLAGS])
    assert res.exit_code == 0, res.output
    first = {t["target"]: t for t in built["result"]["targets"]}
    for t in json.loads(res.stdout)["targets"]:
        assert t["metrics"] == first[t["target"]]["metrics"]
        assert t["quantization"]["chosen"] == first[t["target"]]["quantization"]["chosen"]
        a = json.loads((Path(t["bundle"]) / "manifest.json").read_text())["files"]
        b = json.loads((Path(first[t["target"]]["bundle"]) / "manifest.json").read_text())["files"]
        assert a == b, sorted(f for f in a if a[f] != b.get(f))  # every file's sha256
        assert (Path(t["bundle"]) / "manifest.json").read_bytes() == \
            (Path(first[t["target"]]["bundle"]) / "manifest.json").read_bytes()


def test_a_two_process_build_publishes_the_same_bundle_from_rank_0(built, build_data, tmp_path):
    """--nproc 2 (torch elastic launch, gloo): feature rows split across the ranks (each with half the
    engine threads), rank 0 trains the head, quantizes, gates and publishes with the numerics' thread
    counts of one process; the parity numbers and every bundle file are the one-process build's."""
    out = tmp_path / "two"
    res = CliRunner().invoke(cli, ["build", "--data", str(build_data), "--out", str(out), "--json", "--nproc", "2",
                                   "--no-cache", "--target", "cpu", *FAST_FLAGS])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["training"]["processes"] == 2 and r["training"]["feature_cache"]["enabled"] is False
    assert r["targets"][0]["metrics"] == built["result"]["targets"][0]["metrics"]  # to the last bit
    # the same bundle files: every file's sha256 in the manifests
    a = json.loads((out / "cpu" / "manifest.json").read_text())["files"]
    b = json.loads((built["bundle"] / "manifest.json").read_text())["files"]
    assert a == b, sorted(f for f in b if a.get(f) != b[f])
    assert sorted(p.name for p in out.iterdir()) == ["cpu", "report.html", "report.json", "report.md"]

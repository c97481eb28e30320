"""The published CPU bundle: contents, manifest, verify, the torch-free runtime."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from edgetl.cli import cli
from edgetl.profiles import builtin_names, load_profile

pytestmark = pytest.mark.integration


def test_bundle_layout_and_manifest(built):
    b = built["bundle"]
    for f in ("model.onnx", "labels.txt", "preprocess.json", "recipe.toml", "manifest.json", "predict.py",
              "README.md", "runtime.json", "golden/expected.json"):
        assert (b / f).is_file(), f
    m = json.loads((b / "manifest.json").read_text())
    assert m["target"] == "cpu" and set(m["files"]) == {
        p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != "manifest.json"}
    for key in ("edgetl", "torch", "onnx", "onnxruntime"):
        assert m["versions"][key]
    assert len(m["data_sha256"]) == 64 and len(m["calibration_sha256"]) == 64 and m["seed"] == 0
    met = m["metrics"]
    assert 0 <= met["accuracy"] <= 1 and 0 <= met["reference_accuracy"] <= 1 and met["n_test"] > 0
    assert met["accuracy_drop_pp"] <= m["quantization"]["tolerances"]["max_accuracy_drop_pp"]
    assert met["top1_agreement"] >= m["quantization"]["tolerances"]["min_top1_agreement"]
    assert m["sizes"]["ratio"] <= 0.35
    assert (b / "labels.txt").read_text().split() == ["blue", "green", "red"]
    assert 'image_size = 64' in (b / "recipe.toml").read_text()
    assert not list(built["out"].glob(".staging-*"))


def test_int8_model_is_per_channel_qdq(built):
    g = onnx.load(str(built["bundle"] / "model.onnx")).graph
    inits = {i.name: i for i in g.initializer}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert dq, "no QDQ nodes: the model is not quantized"
    conv_weights = {n.input[1] for n in g.node if n.op_type == "Conv"}
    per_channel = [n for n in dq if n.output[0] in conv_weights and len(inits[n.input[1]].dims) == 1
                   and inits[n.input[1]].dims[0] > 1]
    assert len(per_channel) >= 0.9 * len(conv_weights)
    meta = {p.key: p.value for p in onnx.load(str(built["bundle"] / "model.onnx")).metadata_props}
    assert json.loads(meta["edgetl.labels"]) == ["blue", "green", "red"]
    assert json.loads(meta["edgetl.preprocess"])["input_size"] == [64, 64]
    manifest = json.loads((built["bundle"] / "manifest.json").read_text())
    steps = [meta["edgetl.quantizer"]] + ([meta["edgetl.refiner"]] if "edgetl.refiner" in meta else [])
    assert "+".join(steps) == manifest["quantization"]["chosen"]


def _torchless_env(tmp_path):
    """PYTHONPATH with `torch` and `edgetl` packages that refuse to import."""
    blocker = tmp_path / "blocker"
    for name in ("torch", "edgetl", "torchvision"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not allowed in a bundle')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    return env


def _on_a_bare_device(bundle: Path, runtime: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The bundle's predict.py as on a device with only numpy, Pillow and the runtime installed: an
    isolated interpreter (`-I -S`: no site-packages, no PYTHONPATH, no user site) that sees the
    standard library, the bundle and an allow-list of those packages, nothing else."""
    import numpy

    site = Path(numpy.__file__).parents[1]
    allow = tmp_path / "allowed-packages"
    allow.mkdir(exist_ok=True)
    for name in ("numpy", "numpy.libs", "PIL", "pillow.libs", runtime, f"{runtime}.libs"):
        if (site / name).exists() and not (allow / name).exists():
            (allow / name).symlink_to(site / name)
    code = (f"import runpy, sys; sys.path[:0] = [{str(bundle)!r}, {str(allow)!r}]; "
            f"sys.argv = ['predict.py', *{args!r}]; runpy.run_path(sys.path[0] + '/predict.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,runtime", [("cpu", "onnxruntime"), ("openvino", "openvino")])
def test_predict_py_runs_on_a_bare_device(built, tmp_path, tiny_data, name, runtime):
    bundle = tmp_path / "copied"
    shutil.copytree(built["bundles"][name], bundle)  # runs from anywhere: nothing refers back to edgetl
    st = _on_a_bare_device(bundle, runtime, "--selftest", tmp_path=tmp_path)
    assert st.returncode == 0, st.stderr
    assert "selftest passed" in st.stdout
    img = sorted((tiny_data / "red").glob("*.png"))[0]
    out = _on_a_bare_device(bundle, runtime, "--json", str(img), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    pred = json.loads(out.stdout)["predictions"][0]
    assert pred["label"] == "red" and 0 < pred["probability"] <= 1


def test_selftest_catches_a_wrong_model(built, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(built["bundle"], bundle)
    exp = json.loads((bundle / "golden" / "expected.json").read_text())
    for item in exp["models"]["int8"]["items"]:
        item["index"] = (item["index"] + 1) % 3
    (bundle / "golden" / "expected.json").write_text(json.dumps(exp))
    st = subprocess.run([sys.executable, "predict.py", "--selftest"], cwd=bundle, capture_output=True, text=True,
                        timeout=120)
    assert st.returncode == 1 and "golden/expected.json: changed since the build" in st.stderr  # refused at load
    st = subprocess.run([sys.executable, "predict.py", "--selftest", "--no-verify"], cwd=bundle,
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 1 and "FAILED" in st.stdout


def test_verify_detects_tampering(built, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["verify", str(built["bundle"]), "--selftest"]).exit_code == 0
    for change in ("changed", "added", "missing"):
        b = tmp_path / change
        shutil.copytree(built["bundle"], b)
        if change == "changed":
            with open(b / "model.onnx", "r+b") as f:
                f.seek(200)
                byte = f.read(1)
                f.seek(200)
                f.write(bytes([byte[0] ^ 0xFF]))
        elif change == "added":
            (b / "extra.txt").write_text("x")
        else:
            (b / "labels.txt").unlink()
        res = runner.invoke(cli, ["verify", str(b), "--json"])
        assert res.exit_code == 1, change
        assert any(p.startswith(change) for p in json.loads(res.stdout)["details"])


def test_predict_and_info_commands(built, tiny_data):
    runner = CliRunner()
    imgs = [str(sorted((tiny_data / c).glob("*.png"))[0]) for c in ("blue", "green")]
    res = runner.invoke(cli, ["predict", str(built["bundle"]), *imgs, "--json"])
    assert res.exit_code == 0, res.output
    assert [p["label"] for p in json.loads(res.stdout)["predictions"]] == ["blue", "green"]
    info = runner.invoke(cli, ["info", str(built["bundle"])])
    assert info.exit_code == 0 and "mobilenet_v2" in info.output and "blue, green, red" in info.output


def test_info_on_an_edited_manifest_says_so_in_one_line(built, tmp_path):
    """`models` edited into a list: not a traceback but 'not intact' (exit 1); re-sealed with a
    recomputed digest (a forger's edit), the shape is refused in one line too."""
    from edgetl.runtime.integrity import digest

    copy = shutil.copytree(built["bundle"], tmp_path / "b")
    m = json.loads((copy / "manifest.json").read_text())
    m["models"] = list(m["models"].values())
    (copy / "manifest.json").write_text(json.dumps(m))
    res = CliRunner().invoke(cli, ["info", str(copy)])
    assert res.exit_code == 1 and "does not match its digest" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["info", str(copy), "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["exit_code"] == 1
    m["digest"] = digest(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    res = CliRunner().invoke(cli, ["info", str(copy)])
    assert res.exit_code == 1 and "not shaped as edgetl writes it" in res.output


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_target_publishes_a_bundle_that_checks_itself(built, name):
    """Every built-in profile (as timm's tests run every registered model): its bundle is published with
    one model per precision the profile names, each within the gate, and `edgetl verify --selftest`
    runs the golden inputs through the bundle's own runtime."""
    profile = load_profile(name)
    b = built["bundles"][name]
    m = json.loads((b / "manifest.json").read_text())
    runtime = json.loads((b / "runtime.json").read_text())
    assert m["target"] == name and list(runtime["models"]) == profile.precisions
    entry = next(t for t in built["result"]["targets"] if t["target"] == name)
    assert entry["published"] and [x["precision"] for x in entry["models"]] == profile.precisions
    for model in entry["models"]:
        assert model["misses"] == [] and model["files"] and all((b / f).is_file() for f in model["files"])
    res = CliRunner().invoke(cli, ["verify", str(b), "--selftest", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["selftest"]["n"] >= 1


def test_a_bundle_for_another_architecture_allows_its_int8_kernels_drift(built):
    """cpu-arm64 (built on x86_64): expected.json records how far onnxruntime's unfused execution of the
    shipped graph lands from the build's fused logits, and logit_atol covers 1.5 times that (measured
    here again, independently); a bundle for this machine's architecture keeps the plain 5 % rule."""
    import platform

    import numpy as np
    import onnxruntime as ort

    from edgetl.runtime.preprocess import load_contract, load_rgb, preprocess

    if platform.machine().lower() == "aarch64":
        pytest.skip("the build machine is aarch64: cpu-arm64 is this machine's architecture")
    bundle = built["bundles"]["cpu-arm64"]
    exp = json.loads((bundle / "golden" / "expected.json").read_text())["models"]["int8"]
    contract = load_contract(bundle / "preprocess.json")
    batch = np.stack([preprocess(load_rgb(bundle / it["file"]), contract) for it in exp["items"]])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    unfused = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[None]})[0] for x in batch])
    drift = float(np.max(np.abs(unfused - np.array([it["logits"] for it in exp["items"]]))))
    assert exp["x86_unfused_drift"] == pytest.approx(drift, abs=1e-5) and drift > 0
    assert exp["logit_atol"] >= 1.5 * drift - 1e-6
    cpu = json.loads((built["bundles"]["cpu"] / "golden" / "expected.json").read_text())["models"]["int8"]
    assert "x86_unfused_drift" not in cpu
    scale = max(abs(v) for it in cpu["items"] for v in it["logits"])
    assert cpu["logit_atol"] == pytest.approx(max(1e-3, 0.05 * scale), abs=1e-6)

"""The openvino and gpu targets of the shared build, the parity report, `edgetl bench`, and a
failing target beside passing ones."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetl.cli import cli
from tests.conftest import FAST_FLAGS
from tests.test_bundle import _torchless_env
from tests.test_pipeline import _corrupt_scales

pytestmark = pytest.mark.integration


def test_openvino_bundle(built, tmp_path):
    b = built["openvino"]
    for f in ("model.xml", "model.bin", "predict.py", "preprocess.py", "engine_openvino.py", "runtime.json",
              "labels.txt", "preprocess.json", "golden/expected.json", "manifest.json"):
        assert (b / f).is_file(), f
    assert not (b / "engine_ort.py").exists()
    m = json.loads((b / "manifest.json").read_text())
    # the CPU plugin runs the float ops in f32, also where it would pick bf16 (AMX): the engine pins it
    assert m["backend"] == "openvino" and m["validated_with"] == "OpenVINO CPU (f32)" and m["versions"]["openvino"]
    assert m["quantization"]["chosen"] == "nncf_ptq+head_refit"  # the easy data needs no escalation
    assert m["quantization"]["float_nodes"] == []  # fully INT8: every Convolution/MatMul has INT8 weights
    assert m["metrics"]["accuracy_drop_pp"] <= 1.0 and m["sizes"]["ratio"] < 0.4  # xml + bin vs FP32 ONNX
    rt = json.loads((b / "runtime.json").read_text())
    assert rt["settings"]["device"] == "CPU" and rt["settings"]["performance_hint"] == "LATENCY"
    assert rt["requires"] == ["numpy", "pillow", "openvino"]
    import openvino as ov

    model = ov.Core().read_model(str(b / "model.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())  # INT8 IR
    assert json.loads(model.get_rt_info(["edgetl", "labels"]).astype(str)) == ["blue", "green", "red"]
    # The runtime needs only numpy, pillow and openvino; the device can override the settings.
    copy = tmp_path / "ov"
    shutil.copytree(b, copy)
    env = _torchless_env(tmp_path)
    for extra in ([], ["--set", "performance_hint=THROUGHPUT", "--set", "static_batch=false"]):
        st = subprocess.run([sys.executable, "predict.py", "--selftest", *extra], cwd=copy, env=env,
                            capture_output=True, text=True, timeout=300)
        assert st.returncode == 0 and "selftest passed" in st.stdout and "OpenVINO CPU" in st.stdout, st.stderr


def test_gpu_bundle_fp16_and_symmetric_int8(built):
    b = built["gpu"]
    m = json.loads((b / "manifest.json").read_text())
    rt = json.loads((b / "runtime.json").read_text())
    assert rt["models"] == {"fp16": "model.onnx", "int8": "model.int8.onnx"} and rt["default_model"] == "fp16"
    assert rt["settings"]["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider"]
    assert rt["settings"]["provider_options"]["TensorrtExecutionProvider"]["trt_int8_enable"] is True
    # No GPU here: both models were validated on the CPU provider, and the manifest says so.
    assert m["validated_with"] == "CPUExecutionProvider"
    assert {k: v["validated_with"] for k, v in m["models"].items()} == {"fp16": "CPUExecutionProvider",
                                                                         "int8": "CPUExecutionProvider"}
    assert m["models"]["fp16"]["metrics"]["top1_agreement"] >= 0.995
    fp16 = onnx.load(str(b / "model.onnx"))
    io_types = {v.type.tensor_type.elem_type for v in [*fp16.graph.input, *fp16.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    int8 = onnx.load(str(b / "model.int8.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in int8.graph.initializer}
    zps = [inits[n.input[2]] for n in int8.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
    assert zps and all(z.dtype in (np.int8, np.int32) and not z.any() for z in zps)  # TensorRT: signed, zp 0
    res = CliRunner().invoke(cli, ["verify", str(b), "--selftest", "--json"])
    assert res.exit_code == 0, res.output
    assert [r["model"] for r in json.loads(res.stdout)["selftest"]["models"]] == ["fp16", "int8"]


@pytest.mark.parametrize("name,activations", [("cpu", onnx.TensorProto.UINT8), ("cpu-arm64", onnx.TensorProto.INT8)])
def test_cpu_int8_runs_fused(built, name, activations):
    """The shipped model takes uint8 NHWC pixels and its activations are all of one type (U8S8 for x86,
    S8S8 for ARM). The x86 model: every Conv becomes QLinearConv in onnxruntime (the reason it is fast),
    the input ops in front included. The ARM model is not for this CPU: onnxruntime's x86 kernels take
    no signed depthwise convolution, so its fusion here says nothing about the board."""
    import onnxruntime as ort

    model = onnx.load(str(built["bundles"][name] / "model.onnx"))
    tensor = model.graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8 and [d.dim_value for d in tensor.shape.dim][1:] == [64, 64, 3]
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {activations}
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(built["out"] / f"opt-{name}.onnx")
    ort.InferenceSession(str(built["bundles"][name] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    (built["out"] / f"opt-{name}.onnx").unlink()
    if name == "cpu":
        assert ops.count("QLinearConv") == 52 and "Conv" not in ops and "FusedConv" not in ops


def test_report_table_and_plots(built):
    out, r = built["out"], built["result"]
    md = (out / "report.md").read_text()
    models = [f"{t['target']} {m['precision']}" for t in r["targets"] for m in t["models"]]
    assert len(models) == 6  # cpu, cpu-arm64, gpu (fp16), gpu-int8 (fp16, int8), openvino
    for row in ("float reference (FP32)", *models):
        assert f"| {row} |" in md
    page = (out / "report.html").read_text()
    # the float reference's confusion matrix, one difference matrix per model, the accuracy/latency/size plot
    assert page.count('<figure><img alt="') == 1 + len(models) + 1
    assert r["reference"]["latency_ms"] > 0 and r["machine"]["cores"] >= 1
    for t in r["targets"]:
        for m in t["models"]:
            assert m["latency_ms"] > 0 and m["sizes"]["model_bytes"] > 0
            conf = np.asarray(m["metrics"]["confusion"])
            assert conf.shape == (3, 3) and conf.sum() == m["metrics"]["n_test"]
            assert np.trace(conf) / conf.sum() == pytest.approx(m["metrics"]["accuracy"])


def test_bench_command(built):
    res = CliRunner().invoke(cli, ["bench", str(built["bundle"]), str(built["openvino"]), "--runs", "12",
                                   "--rounds", "2", "--batch", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["bundles"]
    assert [v["executed_by"] for v in out.values()] == ["CPUExecutionProvider", "OpenVINO CPU (f32)"]
    for v in out.values():
        assert v["batch1_p50_ms"] > 0 and v["throughput_ips"] > 0 and v["cold_load_ms"] > 0 and v["batch"] == 4
        # the bundle's predict.py in a fresh process: no torch there (importing torch alone is ~510 MB here)
        assert 20 < v["standalone_peak_rss_mb"] < 400


def test_failing_and_crashing_targets_do_not_stop_the_others(tiny_data, tmp_path, monkeypatch):
    """One build, four targets: `bad` misses its gate (scrambled scales), `cpu` crashes while its bundle
    is written (an internal error), openvino (with an FP16 IR too) and gpu are published. Exit 3: the
    worst outcome, and only after every target had its turn."""
    from edgetl import bundle_contents
    from edgetl.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setitem(OnnxRuntimeBackend.quantizers, "ort_static", _corrupt_scales)
    real_write = bundle_contents.write

    def write(stage, **kw):
        if kw["profile"].name == "cpu":
            raise RuntimeError("disk on fire")
        return real_write(stage, **kw)

    monkeypatch.setattr(bundle_contents, "write", write)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nbackend = "onnxruntime"\n[quantization]\nquantizers = ["ort_static"]\n')
    ov16 = tmp_path / "openvino.toml"  # the built-in openvino profile asking for an FP16 IR too
    from importlib.resources import files

    ov16.write_text(files("edgetl").joinpath("targets", "openvino.toml").read_text().replace(
        'precisions = ["int8"]', 'precisions = ["int8", "fp16"]'))
    out = tmp_path / "out"
    (out / "bad").mkdir(parents=True)  # an earlier build's bundle for the target that will fail now
    (out / "bad" / "manifest.json").write_text('{"created": "2026-01-01T00:00:00Z"}')
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(out), "--target", str(bad),
                                   "--target", "cpu", "--target", str(ov16), "--target", "gpu", "--json",
                                   *FAST_FLAGS])
    assert res.exit_code == 3, res.output  # internal error, but only after every target had its turn
    r = json.loads(res.stdout)
    by = {t["target"]: t for t in r["targets"]}
    assert by["cpu"]["error"]["exit_code"] == 3 and "disk on fire" in by["cpu"]["misses"][0]
    assert not (out / "cpu").exists() and not list(out.glob(".staging-*"))
    assert "disk on fire" in (out / "report.md").read_text()
    assert by["bad"]["error"] is None
    assert not by["bad"]["published"] and by["bad"]["misses"]
    assert sorted(p.name for p in (out / "bad").iterdir()) == ["manifest.json"]  # untouched, and said so:
    assert any("earlier build" in w and "2026-01-01" in w for w in by["bad"]["warnings"])
    assert "earlier build" in (out / "report.md").read_text()
    assert by["openvino"]["published"] and (out / "openvino" / "manifest.json").is_file()
    rt = json.loads((out / "openvino" / "runtime.json").read_text())
    assert rt["models"] == {"int8": "model.xml", "fp16": "model.fp16.xml"}
    import openvino as ov

    fp16 = ov.Core().read_model(str(out / "openvino" / "model.fp16.xml"))
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f16 for op in fp16.get_ops())
    assert by["openvino"]["models"][1]["precision"] == "fp16"
    assert by["openvino"]["models"][1]["metrics"]["top1_agreement"] >= 0.995
    assert "Failed targets" in (out / "report.md").read_text() and "FAILED" in (out / "report.html").read_text()
    # The built-in gpu profile: one FP16 model, no quantization at all.
    assert by["gpu"]["published"] and by["gpu"]["quantization"]["chosen"] is None
    assert json.loads((out / "gpu" / "runtime.json").read_text())["models"] == {"fp16": "model.onnx"}
    info = CliRunner().invoke(cli, ["info", str(out / "gpu")])
    assert info.exit_code == 0 and "fp16 (validated with CPUExecutionProvider)" in info.output


def test_unsigned_reencoding_is_exact(tmp_path):
    """int8 activation Q/DQ -> uint8 with zero point + 128 gives identical outputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgetl.backends.onnxruntime import _unsigned_activations

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(-7, np.int8), "z")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], inits,
        value_info=[helper.make_tensor_value_info("q", TensorProto.INT8, [64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.linspace(-10, 10, 64).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert _unsigned_activations(model) == 1
    assert {i.name: i.data_type for i in model.graph.initializer}["z"] == TensorProto.UINT8
    np.testing.assert_array_equal(run(model), before)


@pytest.mark.parametrize("text,needle", [
    ('precisions = ["fp16", "fp16"]\n[quantization]\nquantizers = ["ort_static"]\n', "twice"),
    ('precisions = ["int8"]\n', "quantization"),
    ('[quantization]\nquantizers = ["ort_static"]\n[runtime]\nperformance_hint = "FAST"\n', "performance_hint"),
    ('[quantization]\nquantizers = ["ort_static"]\n[runtime]\ndevice = "gpu"\n', "device"),
    ('providers = ["CUDAExecutionProviders"]\n[quantization]\nquantizers = ["ort_static"]\n', "unknown to onnxruntime"),
    ('[quantization]\nquantizers = ["ort_static", "ort_static"]\n', "twice"),
])
def test_profile_validation(tmp_path, tiny_data, text, needle):
    p = tmp_path / "p.toml"
    p.write_text('name = "x"\nbackend = "onnxruntime"\n' + text)
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--target", str(p), "--out",
                                   str(tmp_path / "o"), *FAST_FLAGS])
    assert res.exit_code == 2 and needle in res.output and not (tmp_path / "o").exists()


def _benchmark_app():
    from pathlib import Path

    exe = Path(sys.executable).with_name("benchmark_app")
    return str(exe) if exe.is_file() else shutil.which("benchmark_app")


@pytest.mark.skipif(_benchmark_app() is None, reason="OpenVINO's benchmark_app is not installed")
def test_openvino_ir_loads_in_benchmark_app(built):
    res = subprocess.run([_benchmark_app(), "-m", str(built["openvino"] / "model.xml"), "-d", "CPU", "-t", "1",
                          "-hint", "latency", "-shape", "input[1,64,64,3]"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Throughput" in res.stdout
    assert "input (node: input) : u8 / [N,H,W,C] / [?,64,64,3]" in res.stdout  # pixels in, layout in the IR


def test_targets_command_lists_every_builtin_profile():
    res = CliRunner().invoke(cli, ["targets"])
    assert res.exit_code == 0
    names = [line.split()[0] for line in res.output.splitlines()]
    assert names == ["cpu", "cpu-arm64", "gpu", "gpu-int8", "openvino"]


def test_bundles_in_one_process_run_their_own_engine_files(built, tmp_path):
    from edgetl.bundle import load_predictor

    other = tmp_path / "other"
    shutil.copytree(built["bundle"], other)
    first, second, again = (load_predictor(b) for b in (built["bundle"], other, built["bundle"]))
    files = [sys.modules[type(p.engine).__module__].__file__ for p in (first, second, again)]
    assert files == [str(built["bundle"] / "engine_ort.py"), str(other / "engine_ort.py"),
                     str(built["bundle"] / "engine_ort.py")]


def test_bench_and_predict_refuse_bad_requests(built, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", str(built["bundle"]), "--model", "fp16"])
    assert res.exit_code == 2 and "int8" in res.output  # names the models the bundle has
    assert runner.invoke(cli, ["bench", str(built["bundle"]), "--rounds", "0"]).exit_code == 2
    st = subprocess.run([sys.executable, str(built["bundle"] / "predict.py"), "--model", "fp16", "--selftest"],
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 2 and "choose one of int8" in st.stderr
    damaged = tmp_path / "ov"
    shutil.copytree(built["openvino"], damaged)
    (damaged / "model.bin").unlink()
    img = next(iter((damaged / "golden").glob("*.png")))
    res = runner.invoke(cli, ["predict", str(damaged), str(img)])
    assert res.exit_code == 1 and f"{damaged / 'model.bin'}: missing" in res.output  # checked before loading
    res = runner.invoke(cli, ["predict", "--no-verify", str(damaged), str(img)])
    assert res.exit_code == 1 and "edgetl verify" in res.output  # the runtime could not load it


def test_report_survives_odd_class_names(built, tmp_path):
    """Class names are folder names: `$...$` must not reach TeX, `|` and `<` must not break tables."""
    from edgetl import report
    from edgetl.results import BuildResult

    r = json.loads(json.dumps(built["result"]))
    odd = ["$\\frac$", "a|b", "<x>"]
    r["data"]["classes"] = odd
    for t in r["targets"]:
        for m in t["models"]:
            for pc in m["metrics"]["per_class"]:
                pc["class"] = "$\\frac$ a|b <x>"  # whichever class is worst, its name is odd
    result = BuildResult.from_dict(r)
    report.write(tmp_path, result)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "$\\\\frac$ a\\|b &lt;x>" in md and "$\\frac$ a|b &lt;x&gt;" in page and "<x>" not in page
    n_models = sum(len(t.models) for t in result.targets)
    assert page.count('<figure><img alt="') == 1 + n_models + 1 and json.loads((tmp_path / "report.json").read_text())
    for line in md.splitlines():
        if line.startswith("| ") and "reference" not in line:
            assert line.count(" | ") == len(report.HEADER) - 1  # every cell, whatever the class names


def test_openvino_gpu_profile_validates_on_cpu_without_gpu_properties(tmp_path):
    import openvino as ov

    from edgetl.backends.openvino import OpenVinoBackend
    from edgetl.profiles import load_profile

    if "GPU" in ov.Core().available_devices:
        pytest.skip("this machine has an OpenVINO GPU: validation runs there")
    p = tmp_path / "ovgpu.toml"
    p.write_text('name = "ovgpu"\nbackend = "openvino"\n[quantization]\nquantizers = ["nncf_ptq"]\n'
                 '[runtime]\ndevice = "GPU"\nconfig = {GPU_HOST_TASK_PRIORITY = "HIGH"}\n')
    profile = load_profile(str(p))
    backend = OpenVinoBackend()
    backend.check(profile)  # GPU properties are not judged by the CPU plugin
    assert backend.settings(profile)["device"] == "GPU" and backend.settings(profile)["config"]
    validating = backend.settings(profile, validating=True)
    assert validating["device"] == "CPU" and "config" not in validating

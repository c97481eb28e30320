"""The C++ consumer every pixel-input bundle carries (cpp/), built exactly as the bundle's README says:
configured out of the bundle against a folder laid out like onnxruntime's release archive (made here
from the wheel's library and the third_party/ headers) or the OpenVINO wheel's CMake package, built,
installed, the installed folder moved elsewhere and run. Its golden mode, its answers next to the
bundle's own predict.py, and its refusals (a changed logit, a changed model, paths that leave the
bundle, loose indices, a missing device)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetl.cli import cli
from edgetl.runtime.preprocess import load_contract, load_rgb, resize_crop

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ORT_HEADERS = ROOT / "third_party" / "onnxruntime-1.21" / "include"
RUNTIMES = {"cpu": "ort", "openvino": "openvino"}


def readme_commands(bundle: Path) -> list[str]:
    """The first indented block of the README's "## C++ (cpp/)" section: the build-and-run commands."""
    text = (bundle / "README.md").read_text().split("## C++ (cpp/)", 1)[1]
    block = text.split("\n\n    ", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in ("    " + block).splitlines()]


@pytest.fixture(scope="module")
def ort_archive(tmp_path_factory) -> Path:
    """include/ + lib/libonnxruntime.so -> .so.1 -> .so.1.x.y, as onnxruntime's release archive lays them out."""
    import onnxruntime

    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the C++ consumer test needs cmake and a C++17 compiler "
                        "(Debian: apt install cmake g++)")
    root = tmp_path_factory.mktemp("onnxruntime-linux-x64")
    shutil.copytree(ORT_HEADERS, root / "include")
    (root / "lib").mkdir()
    library = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1.*"))[-1]
    shutil.copy2(library, root / "lib" / library.name)
    (root / "lib" / "libonnxruntime.so.1").symlink_to(library.name)
    (root / "lib" / "libonnxruntime.so").symlink_to("libonnxruntime.so.1")
    return root


@pytest.fixture(scope="module")
def installed(built, ort_archive, tmp_path_factory) -> dict[str, Path]:
    """Per runtime: the README's commands run in a copy of the bundle (only the onnxruntime folder
    filled in), then the installed folder moved elsewhere and the build folders deleted."""
    out = {}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name, cpp in RUNTIMES.items():
        work = tmp_path_factory.mktemp(f"readme-{name}")
        bundle = shutil.copytree(built["bundles"][name], work / "bundle")
        commands = readme_commands(bundle)
        if cpp == "ort":
            assert commands[0].startswith("ORT=/path/to/onnxruntime-linux-x64-")
            commands[0] = f"ORT={ort_archive}"
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=bundle, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "golden self-test passed: 8 of 8" in proc.stdout, proc.stdout[-2000:]
        moved = shutil.move(str(work / f"edgetl-{cpp}"), str(tmp_path_factory.mktemp("elsewhere") / name))
        shutil.rmtree(work / f"build-{cpp}")
        out[name] = Path(moved)
        out[f"{name}-bundle"] = bundle
    return out


def _run(program: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_the_readme_builds_an_installed_folder_that_runs_anywhere(installed, name):
    """The moved install passes --golden (top-1 and logits within logit_atol); its run path is $ORIGIN's;
    the runtime library sits beside it; the bundle it was built from, and the installed copy, verify."""
    home = installed[name]
    proc = _run(home / "bin" / "edgetl_classify", home / "bundle", "--golden")
    assert proc.returncode == 0 and "golden self-test passed: 8 of 8" in proc.stdout, proc.stdout + proc.stderr
    dynamic = subprocess.run(["readelf", "-d", str(home / "bin" / "edgetl_classify")], capture_output=True, text=True)
    if dynamic.returncode == 0:
        assert "$ORIGIN/../lib" in dynamic.stdout and "/tmp" not in dynamic.stdout.split("RUNPATH", 1)[-1][:300]
    assert any((home / "lib").glob("libonnxruntime.so.1*" if name == "cpu" else "libopenvino.so*"))
    for bundle in (installed[f"{name}-bundle"], home / "bundle"):
        res = CliRunner().invoke(cli, ["verify", str(bundle)])
        assert res.exit_code == 0, res.output


def test_the_arm64_bundle_passes_golden_on_this_machine(installed, built):
    """The x86 build of the onnxruntime consumer runs the cpu-arm64 bundle's model within its tolerance."""
    proc = _run(installed["cpu"] / "bin" / "edgetl_classify", built["bundles"]["cpu-arm64"], "--golden")
    assert proc.returncode == 0 and "golden self-test passed: 8 of 8" in proc.stdout, proc.stdout + proc.stderr


def test_a_build_folder_inside_the_bundle_is_refused_in_one_line(built, tmp_path):
    bundle = shutil.copytree(built["bundles"]["cpu"], tmp_path / "b")
    proc = subprocess.run(["cmake", "-S", "cpp", "-B", "build"], cwd=bundle, capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if "is inside the bundle" in line]
    assert proc.returncode != 0 and len(lines) == 1 and "fix: rm -r" in lines[0], proc.stderr
    assert not (bundle / "build" / "Makefile").exists()  # nothing was generated, let alone compiled


def _scene(rng: np.random.Generator, colour) -> np.ndarray:
    """A 640x480 camera-like frame: noisy grey, a coloured disc."""
    yy, xx = np.mgrid[:480, :640]
    img = rng.normal(128, 20, (480, 640, 3))
    img[(xx - 300) ** 2 + (yy - 250) ** 2 < 150 ** 2] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_a_640x480_png_is_classified_as_predict_py_does(installed, name, tmp_path):
    """PNG (RGB and RGBA) and a PPM whose header ends "255\\r\\n": the C++ probabilities are predict.py's
    within 1e-5 (the PPM, read right, gives the PNG's)."""
    home, bundle = installed[name], installed[f"{name}-bundle"]
    rng = np.random.default_rng(0)
    images = []
    for k, colour in enumerate([(220, 40, 40), (40, 60, 220), (40, 200, 60)]):
        pixels = _scene(rng, colour)
        images.append(tmp_path / f"{k}.png")
        Image.fromarray(pixels).save(images[-1])
        if k == 0:
            crlf = tmp_path / "crlf.ppm"
            crlf.write_bytes(b"P6\r\n640 480\r\n255\r\n" + pixels.tobytes())
    rgba = tmp_path / "rgba.png"
    alpha = rng.integers(0, 256, (480, 640), dtype=np.uint8)
    Image.fromarray(np.dstack([_scene(rng, (40, 60, 220)), alpha])).save(rgba)
    images.append(rgba)
    proc = _run(home / "bin" / "edgetl_classify", home / "bundle", "--probs", *images, crlf)
    assert proc.returncode == 0, proc.stderr
    cpp = {Path(line.split("\t")[0]).name: [float(v) for v in line.split("\t")[1].split()]
           for line in proc.stdout.splitlines()}
    py = subprocess.run([sys.executable, str(bundle / "predict.py"), "--json", *map(str, images)],
                        capture_output=True, text=True, timeout=300)
    assert py.returncode == 0, py.stderr
    labels = (bundle / "labels.txt").read_text().splitlines()
    for result in json.loads(py.stdout)["predictions"]:
        got = cpp[Path(result["file"]).name]
        for top in result["top"]:
            assert abs(got[labels.index(top["label"])] - top["probability"]) < 1e-5, (result, got)
    assert cpp["crlf.ppm"] == cpp["0.png"]
    dump = tmp_path / "inputs.bin"  # the hidden --dump-input mode: the tensors fed, preprocess.py's exactly
    assert _run(home / "bin" / "edgetl_classify", home / "bundle", "--dump-input", dump, *images).returncode == 0
    contract = load_contract(bundle / "preprocess.json")
    want = np.stack([np.asarray(resize_crop(load_rgb(p), contract)) for p in images])
    assert np.array_equal(np.fromfile(dump, dtype=np.uint8).reshape(want.shape), want)
    assert len({int(np.argmax(p)) for p in cpp.values()}) > 1  # not one answer for everything


def test_golden_mode_checks_what_predict_py_checks(installed, tmp_path):
    """A logit beyond logit_atol: exit 1 (--no-verify); the same edit without it: refused by the manifest
    check; a changed model: refused before loading; an edited manifest: refused by its digest; a
    mistyped bundle folder, golden.txt paths out of the bundle and loose indices: exit 2 in one line."""
    home = installed["cpu"]
    program = home / "bin" / "edgetl_classify"
    bundle = shutil.copytree(home / "bundle", tmp_path / "b")
    expected_path = bundle / "golden" / "expected.json"
    original = expected_path.read_text()
    spec = json.loads(original)
    model = spec["models"]["int8"]
    model["items"][0]["logits"][1] += 1.5 * model["logit_atol"]
    expected_path.write_text(json.dumps(spec))
    proc = _run(program, bundle, "--no-verify", "--golden")
    assert proc.returncode == 1 and "logits differ by" in proc.stdout and "FAILED: 7 of 8" in proc.stdout, proc.stdout
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 1 and "golden/expected.json: changed since the build" in proc.stderr, proc.stderr
    expected_path.write_text(original)
    model_bytes = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(model_bytes[:-1] + bytes([model_bytes[-1] ^ 1]))
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 1 and "model.onnx: changed since the build" in proc.stderr, proc.stderr
    (bundle / "model.onnx").write_bytes(model_bytes)
    manifest_path = bundle / "manifest.json"  # a hand edit of the manifest itself: its digest no longer matches
    manifest_text = manifest_path.read_text()
    manifest = json.loads(manifest_text)
    manifest["target"] += "-edited"
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 1 and "its digest does not match its content" in proc.stderr, proc.stderr
    manifest_path.write_text(manifest_text)
    proc = _run(program, tmp_path / "no-such-bundle", "--golden")  # a mistyped folder: usage, not "changed"
    assert proc.returncode == 2 and "not a bundle folder (no manifest.json)" in proc.stderr, proc.stderr
    listed = bundle / "golden" / "golden.txt"
    for line, needle in (("/etc/hostname 0", "leaves the bundle"), ("../b/golden/00_blue.png 0", "leaves the bundle"),
                         ("golden/00_blue.png 2abc", "index '2abc'"), ("golden/00_blue.png -1", "index '-1'"),
                         ("golden/00_blue.png 99", "index '99'"), ("golden/00_blue.png", "bad line")):
        listed.write_text(line + "\n")
        proc = _run(program, bundle, "--no-verify", "--golden")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, (line, proc.stderr)


def test_bench_and_a_missing_device(installed):
    home = installed["openvino"]
    proc = _run(home / "bin" / "edgetl_classify", home / "bundle", "--bench", "5")
    assert proc.returncode == 0, proc.stderr
    figures = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert float(figures["batch1_p50_ms"]) <= float(figures["batch1_p90_ms"]) and figures["runs"] == "5"
    proc = _run(home / "bin" / "edgetl_classify", home / "bundle", "--golden", env={"EDGETL_DEVICE": "NPU.7"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "OpenVINO device 'NPU.7' is not available here" in proc.stderr and "fix:" in proc.stderr, proc.stderr

"""The C++ consumer every pixel-input bundle carries (cpp/): compiled here against onnxruntime's C++ API
(the wheel's library, third_party/ headers) and OpenVINO's (the wheel's developer files), run in golden
mode and on single images, its top-1 compared with the bundle's own predict.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ORT_HEADERS = ROOT / "third_party" / "onnxruntime-1.21" / "include"


def _build(src: Path, build: Path, *defines: str) -> Path:
    """cmake configure + build out of the bundle (the bundle stays as published); the program's path."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the C++ consumer test needs cmake and a C++17 compiler "
                        "(Debian: apt install cmake g++)")
    for cmd in (["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *defines],
                ["cmake", "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build / "edgetl_classify"


@pytest.fixture(scope="module")
def programs(built, tmp_path_factory) -> dict[str, Path]:
    """The consumer of the cpu bundle (onnxruntime) and of the openvino bundle, compiled once."""
    import onnxruntime
    from openvino.utils import get_cmake_path

    where = tmp_path_factory.mktemp("cpp")
    library = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1*"))[-1]
    return {"onnxruntime": _build(built["bundles"]["cpu"] / "cpp", where / "ort",
                                  f"-DONNXRUNTIME_INCLUDE_DIR={ORT_HEADERS}", f"-DONNXRUNTIME_LIBRARY={library}"),
            "openvino": _build(built["bundles"]["openvino"] / "cpp", where / "ov",
                               f"-DOpenVINO_DIR={get_cmake_path()}")}


def _python_top1(bundle: Path, images: list[Path]) -> list[str]:
    """The bundle's own predict.py (in a process of its own) on the images: top-1 labels."""
    proc = subprocess.run([sys.executable, str(bundle / "predict.py"), "--json", *map(str, images)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [r["label"] for r in json.loads(proc.stdout)["predictions"]]


@pytest.mark.parametrize("name,runtime", [("cpu", "onnxruntime"), ("cpu-arm64", "onnxruntime"),
                                          ("openvino", "openvino")])
def test_cpp_consumer_gives_the_gates_top1(built, programs, name, runtime):
    """Golden mode passes; on every golden image the C++ top-1 is predict.py's and the build's."""
    bundle = built["bundles"][name]
    assert sorted(p.name for p in (bundle / "cpp").iterdir()) == ["CMakeLists.txt", "bundle_io.hpp", "main.cpp"]
    proc = subprocess.run([str(programs[runtime]), str(bundle), "--golden"], capture_output=True, text=True,
                          timeout=300)
    lines = (bundle / "golden" / "golden.txt").read_text().split("\n")[:-1]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"golden self-test passed: {len(lines)} of {len(lines)}" in proc.stdout
    labels = (bundle / "labels.txt").read_text().split()
    expected = json.loads((bundle / "golden" / "expected.json").read_text())["models"]["int8"]["items"]
    pngs = [bundle / item["file"] for item in expected]
    cpp = []
    for k in range(len(pngs)):  # golden/<k>.ppm: the k-th golden image as the model takes it
        out = subprocess.run([str(programs[runtime]), str(bundle), str(bundle / "golden" / f"{k:02d}.ppm")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        cpp.append(out.stdout.split("\t")[0])
    assert cpp == _python_top1(bundle, pngs) == [labels[item["index"]] for item in expected]


def test_cpp_golden_mode_fails_when_a_top1_differs(built, programs, tmp_path):
    bundle = shutil.copytree(built["bundles"]["cpu"], tmp_path / "b")
    first, *rest = (bundle / "golden" / "golden.txt").read_text().splitlines()
    file, index = first.split()
    n_classes = len((bundle / "labels.txt").read_text().split())
    (bundle / "golden" / "golden.txt").write_text("\n".join([f"{file} {(int(index) + 1) % n_classes}", *rest]) + "\n")
    proc = subprocess.run([str(programs["onnxruntime"]), str(bundle), "--golden"], capture_output=True, text=True)
    assert proc.returncode == 1 and f"MISMATCH {file}" in proc.stdout and "golden self-test FAILED" in proc.stdout
    (bundle / "golden" / "golden.txt").write_text(f"{file} {index}\ngolden/01.ppm\n")  # a line cut short
    proc = subprocess.run([str(programs["onnxruntime"]), str(bundle), "--golden"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad line 'golden/01.ppm'" in proc.stderr, proc.stdout + proc.stderr


def test_cpp_consumer_refuses_bad_input_in_one_line(built, programs, tmp_path):
    """A PPM of another size (small, or a huge header), a PNG, a missing file, a garbage header: exit 2
    and one line naming the file (and the fix)."""
    from PIL import Image

    bundle = built["bundles"]["openvino"]
    small = tmp_path / "small.ppm"
    Image.new("RGB", (10, 12)).save(small)
    huge = tmp_path / "huge.ppm"
    huge.write_bytes(b"P6\n60000 60000\n255\n")  # refused before any pixel is allocated
    garbage = tmp_path / "garbage.ppm"
    garbage.write_bytes(b"P6\nwide 12\n255\n")
    for path, needle in ((small, "10x12 pixels, the model takes"), (bundle / "golden" / "00_blue.png",
                                                                     "not a binary PPM (P6); fix:"),
                         (tmp_path / "none.ppm", "cannot open"), (huge, "60000x60000 pixels, the model takes"),
                         (garbage, "bad PPM header (width 'wide')")):
        proc = subprocess.run([str(programs["openvino"]), str(bundle), str(path)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr

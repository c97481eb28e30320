"""The C++ consumer's bundle checks (edgetl/runtime/cpp/bundle_io.hpp) without a runtime: a harness
compiled from bundle_io.hpp with a loader that stops before any model, under AddressSanitizer and
UndefinedBehaviorSanitizer where the compiler has them. A mistyped BUNDLE_DIR is bad usage (exit 2),
manifest.json's own digest is checked as integrity.py takes it (exit 1 when edited), preprocess.json's
sizes are range-checked before any cast; and the CMake module leaves multi-config generators alone."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgetl.runtime import integrity

CPP = Path(__file__).resolve().parents[1] / "edgetl" / "runtime" / "cpp"
HARNESS = r"""
#include "bundle_io.hpp"
int main(int argc, char** argv) {
  return edgetl::run(argc, argv, [](const edgetl::Bundle&, const edgetl::ModelSpec& spec,
                                    const edgetl::Contract&) -> std::unique_ptr<edgetl::Model> {
    throw edgetl::InputError("reached the loader: " + spec.file);
  });
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    if shutil.which("c++") is None:
        pytest.fail("no C++ compiler: the C++ bundle tests need one (Debian: apt install g++)")
    where = tmp_path_factory.mktemp("bundle-harness")
    (where / "h.cpp").write_text(HARNESS)
    for flags in (["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"], []):
        proc = subprocess.run(["c++", "-std=c++17", "-O1", "-g", *flags, "-I", str(CPP), str(where / "h.cpp"),
                               "-o", str(where / "h")], capture_output=True, text=True)
        if proc.returncode == 0:
            return where / "h"
    raise AssertionError(proc.stderr[-3000:])


def _bundle(root: Path, preprocess: dict | None = None) -> Path:
    """A sealed bundle as edgetl seals it (no model: the harness stops at the loader). The manifest has
    what canonical JSON must get right: floats, non-ASCII, escapes, nesting, key order."""
    root.mkdir()
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "runtime.json").write_text(json.dumps({"default_model": "int8", "models": {"int8": "model.onnx"}}))
    contract = {"dtype": "uint8", "input_size": [8, 8], "resize_size": 9, "interpolation": "bilinear"}
    (root / "preprocess.json").write_text(json.dumps(preprocess or contract))
    manifest = {"target": "cpu", "versions": {"pillow": "11.1.0"},
                "metrics": {"agreement": 0.9696969696969697, "tiny": 1e-05, "big": 1e16, "n": 33, "neg": -2.5},
                "note": "caf\u00e9 \u2713 \"q\" back\\slash tab\t nl\n ctl\u0001 \U0001f600",
                "zz": [True, False, None, {"b": 1, "a": [0.5]}]}
    sealed = integrity.seal(manifest, root)
    (root / "manifest.json").write_text(json.dumps(sealed, indent=2, ensure_ascii=False) + "\n")
    integrity.check(root)  # intact by predict.py's rules
    return root


def _run(program: Path, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_a_mistyped_bundle_folder_is_bad_usage(program, tmp_path):
    """No folder, or a folder without manifest.json: exit 2 in one line (exit 1 means "bundle changed")."""
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "nowhere", tmp_path / "empty"):
        proc = _run(program, where, "--golden")
        assert proc.returncode == 2 and proc.stderr == f"error: not a bundle folder (no manifest.json): {where}\n", \
            proc.stderr


def test_the_manifest_digest_is_checked_as_integrity_py_does(program, tmp_path):
    """A sealed manifest passes (its canonical body hashed as Python's); one edited consistently with a
    swapped file (the file's new sha256 written in) is refused, exit 1; so is one with no digest;
    --no-verify skips it."""
    bundle = _bundle(tmp_path / "b")
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 2 and "reached the loader: model.onnx" in proc.stderr, proc.stderr
    (bundle / "labels.txt").write_text("dog\ncat\n")  # swapped, and the manifest "fixed" to match
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["labels.txt"] = integrity.file_sha256(bundle / "labels.txt")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    with pytest.raises(integrity.IntegrityError):
        integrity.check(bundle)
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "manifest.json: changed since the build (its digest does not match its content)" in proc.stderr
    proc = _run(program, bundle, "--no-verify", "--golden")
    assert proc.returncode == 2 and "reached the loader" in proc.stderr, proc.stderr
    del manifest["digest"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 1 and "manifest.json: not sealed" in proc.stderr, proc.stderr


@pytest.mark.parametrize("size", [[1e300, 8], [8, -1e300], [8, 8.5e9], [0, 8]])
def test_preprocess_sizes_beyond_int_are_refused_before_any_cast(program, tmp_path, size):
    bundle = _bundle(tmp_path / "b", {"dtype": "uint8", "input_size": size, "resize_size": 9})
    proc = _run(program, bundle, "--golden")
    assert proc.returncode == 2 and "input_size / resize_size out of range" in proc.stderr, proc.stderr


def test_bench_takes_only_plain_digits(program, tmp_path):
    bundle = _bundle(tmp_path / "b")
    for runs in ("\u00e9", "3x", "-1", "0"):
        proc = _run(program, bundle, "--bench", runs)
        assert proc.returncode == 2 and "expected a number of runs" in proc.stderr, (runs, proc.stderr)
    proc = _run(program, bundle, "--bench", "3")
    assert proc.returncode == 2 and "reached the loader" in proc.stderr, proc.stderr


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None, reason="needs cmake and ninja")
def test_the_cmake_module_sets_release_only_on_single_config_generators(tmp_path):
    """edgetl_bundle.cmake is included before project(): a multi-config generator (Ninja Multi-Config)
    must not get CMAKE_BUILD_TYPE forced; a single-config one (Ninja) gets Release."""
    cpp = tmp_path / "bundle" / "cpp"
    (cpp / "cmake").mkdir(parents=True)
    shutil.copy(CPP / "cmake" / "edgetl_bundle.cmake", cpp / "cmake")
    (cpp / "CMakeLists.txt").write_text(
        'cmake_minimum_required(VERSION 3.16)\ninclude("${CMAKE_CURRENT_SOURCE_DIR}/cmake/edgetl_bundle.cmake")\n'
        "project(x NONE)\n")
    for generator, want in (("Ninja Multi-Config", ""), ("Ninja", "Release")):
        build = tmp_path / generator.replace(" ", "-")
        proc = subprocess.run(["cmake", "-G", generator, "-S", cpp, "-B", build],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        cache = (build / "CMakeCache.txt").read_text()
        got = [line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("CMAKE_BUILD_TYPE:")]
        assert got == [want] if want else got in ([], [""]), (generator, got)

"""The package as users get it: the wheel and the sdist built from the source tree (`python -m build`),
checked by twine, the wheel installed into a fresh virtual environment outside the repository, and
`edgetl targets`, `edgetl init` and a small build run from there, whose bundles verify and self-test.

No download: the build runs without isolation (the project venv's setuptools), the wheel installs with
--no-deps --no-index, and the fresh venv sees the project venv's packages (torch, onnxruntime, ...)
through a .pth file, after its own site-packages (so `edgetl` is the wheel's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgetl import report
from tests.conftest import make_image_folder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.package

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
SKIP_DIRS = {".git", ".venv", "site", "dist", "build", "__pycache__", ".pytest_cache", ".ruff_cache", "edgetl-out"}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-3000:]}" \
                                f"\n{res.stderr[-3000:]}"
    return res


def _sources() -> list[str]:
    """The files a clone has: tracked and new (not ignored) ones; every file but build output without git."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
        return [p for p in out.split("\0") if p and (ROOT / p).exists()]
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
            and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict:
    """sdist and wheel (the wheel built from the unpacked sdist, as `python -m build` does), from a copy
    of the source tree (nothing written into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for rel in _sources():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)  # a symlink (docs/changelog.md) as the file it points to
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src])
    wheel, sdist = next(out.glob("*.whl")), next(out.glob("*.tar.gz"))
    return {"wheel": wheel, "sdist": sdist, "src": src}


def test_wheel_and_sdist_pass_twine_check(dist):
    res = _run([sys.executable, "-m", "twine", "check", "--strict", dist["wheel"], dist["sdist"]])
    assert res.stdout.count("PASSED") == 2, res.stdout
    assert dist["wheel"].name == f"edgetl-{VERSION}-py3-none-any.whl"


def test_wheel_holds_the_package_and_its_data(dist):
    """Every file of edgetl/ in the source tree (profiles, the recipe template, the bundle runtime and
    the C++ consumers however deep) and nothing else: no tests, no bytecode."""
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    package = {rel for rel in _sources() if rel.startswith("edgetl/") and "__pycache__" not in rel}
    missing = package - names
    assert not missing, f"the wheel lacks {sorted(missing)}: add them to [tool.setuptools.package-data]"
    assert any(n.startswith("edgetl/runtime/cpp/") for n in names) and "edgetl/recipe_template.toml" in names
    ours = {n for n in names if not n.startswith(f"edgetl-{VERSION}.dist-info/")}
    assert ours == package, f"the wheel has files the source tree does not: {sorted(ours - package)}"
    meta = zipfile.ZipFile(dist["wheel"]).read(f"edgetl-{VERSION}.dist-info/METADATA").decode()
    assert f"Version: {VERSION}" in meta and "License-Expression: Apache-2.0" in meta
    assert f"edgetl-{VERSION}.dist-info/licenses/LICENSE" in names


def test_sdist_holds_what_the_tests_and_docs_need(dist):
    names = {n.split("/", 1)[1] for n in tarfile.open(dist["sdist"]).getnames() if "/" in n}
    for need in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "Makefile", "mkdocs.yml",
                 "docs/index.md", "docs/changelog.md", "tests/conftest.py", "tests/test_wheel.py",
                 "third_party/onnxruntime-1.21/include/onnxruntime_cxx_api.h", "edgetl/targets/cpu.toml"):
        assert need in names, f"the sdist lacks {need} (MANIFEST.in)"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.fixture(scope="module")
def fresh(dist, tmp_path_factory) -> dict:
    """A venv outside the repository with the wheel installed; the project venv's packages after its own."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # addsitedir runs the project venv's own .pth files too (packages that need them); appended after `site`
    (site / "zz_project_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", dist["wheel"]])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", EDGETL_OFFLINE="1",
               EDGETL_CACHE=str(tmp_path_factory.mktemp("fresh-cache")))
    return {"venv": venv, "python": py, "edgetl": venv / "bin" / "edgetl", "env": env,
            "work": tmp_path_factory.mktemp("work")}


def _edgetl(fresh, *args) -> subprocess.CompletedProcess:
    return _run([fresh["edgetl"], *args], cwd=fresh["work"], env=fresh["env"])


def test_installed_package_is_the_wheel(fresh):
    code = ("import edgetl, importlib.metadata as m; print(edgetl.__file__); "
            "print(edgetl.__version__, m.version('edgetl'))")
    where, versions = _run([fresh["python"], "-c", code], cwd=fresh["work"], env=fresh["env"]).stdout.split("\n")[:2]
    assert Path(where).is_relative_to(fresh["venv"]), f"edgetl imported from {where}, not the fresh venv"
    assert versions.split() == [VERSION, VERSION]
    assert _edgetl(fresh, "--version").stdout.split()[-1] == VERSION


def test_targets_init_build_verify_from_the_wheel(fresh):
    """`edgetl targets`, `edgetl init`, then a small build from that recipe (cpu and openvino: both
    runtimes and both C++ consumers) whose bundles verify and self-test, with the wheel's version in
    their manifests and the report's timing columns labelled."""
    from edgetl.profiles import builtin_names

    work = fresh["work"]
    listed = _edgetl(fresh, "targets").stdout
    assert all(name in listed for name in builtin_names())
    _edgetl(fresh, "init", "edgetl.toml")
    assert "[train]" in (work / "edgetl.toml").read_text(encoding="utf-8")
    data = make_image_folder(work / "imgs", per_class=12)
    _edgetl(fresh, "build", "edgetl.toml", "--data", data, "--out", "out", "--target", "cpu", "--target", "openvino",
            "--image-size", "64", "--epochs", "15", "--effort", "low", "-q")
    out = work / "out"
    for name in ("cpu", "openvino"):
        bundle = out / name
        _edgetl(fresh, "verify", "--selftest", bundle)
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["versions"]["edgetl"] == VERSION == manifest["edgetl_version"]
        _consumer_needs_are_named(bundle)
    md = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert f"| {report.SPEED} |" in header and f"| {report.LATENCY} |" in header
    ref_row = next(line for line in md.splitlines() if line.startswith("| float reference"))
    assert "float input, timed during gating" in ref_row
    assert "not the FP32 time the speed column divides by" in md
    for t in json.loads((out / "report.json").read_text(encoding="utf-8"))["targets"]:
        for m in t["models"]:  # the latency column is the speed evidence's batch-1 time, not a third timing
            assert m["latency_ms"] == m["speed"]["batch_1"]["ms"] > 0


# The C standard library's and the compilers' own headers (vendored stb_image.h includes them)
C_SYSTEM = {"assert.h", "limits.h", "math.h", "stdarg.h", "stddef.h", "stdint.h", "stdio.h", "stdlib.h",
            "string.h", "emmintrin.h", "intrin.h", "arm_neon.h"}


def _consumer_needs_are_named(bundle: Path) -> None:
    """The bundle's C++ consumer: its own headers ship in cpp/, and every third-party header it includes
    is named by cpp/CMakeLists.txt or the bundle's README (`<onnxruntime_cxx_api.h>` by name, a
    `<openvino/...>` header by its package's find_package(OpenVINO))."""
    sources = [p for p in (bundle / "cpp").rglob("*") if p.suffix in (".cpp", ".hpp", ".h")]
    cmake = (bundle / "cpp" / "CMakeLists.txt").read_text(encoding="utf-8")
    told = cmake + (bundle / "README.md").read_text(encoding="utf-8")
    assert sources
    for src in sources:
        for quoted, angled in re.findall(r'#include\s*(?:"([^"]+)"|<([^>]+)>)', src.read_text(encoding="utf-8")):
            if quoted:
                assert (src.parent / quoted).is_file(), f"{src.name} includes {quoted}, which the bundle lacks"
            elif angled.endswith((".h", ".hpp")) and angled not in C_SYSTEM:  # not the C/C++ standard library's
                parts = Path(angled).parts
                named = (re.search(rf"find_package\(\s*{re.escape(parts[0])}\b", cmake, flags=re.I) if len(parts) > 1
                         else parts[0] in told)
                assert named, f"{bundle.name}/cpp/{src.name} includes <{angled}>: the bundle never says where from"

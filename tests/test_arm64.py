"""ARM64 evidence: the cpu-arm64 bundle's C++ consumer cross-compiled for aarch64 and run under qemu-aarch64
(benchmarks/arm64_golden.py), on the shared build's cpu-arm64 bundle.

Needs Debian's g++-aarch64-linux-gnu, qemu-user (or qemu-user-static) and cmake, and the onnxruntime
aarch64 wheel of the installed version in $EDGETL_ARM64_CACHE (default ~/.cache/edgetl/arm64): tests
never download, unless EDGETL_ARM64_FETCH=1 lets the script pip-download the wheel into that cache.
Without them the tests skip and say which one is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "arm64_golden.py"


def _script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    offline = [] if os.environ.get("EDGETL_ARM64_FETCH") == "1" else ["--offline"]
    return subprocess.run([sys.executable, str(SCRIPT), *offline, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def arm64(request, tmp_path_factory) -> dict:
    """One run of the script on the shared cpu-arm64 bundle, both default CPU models; its JSON result.
    The prerequisites are checked first: a missing one skips before the shared build is made."""
    check = _script("--check")
    if check.returncode == 3:
        pytest.skip(f"ARM64 check not run: {check.stderr.strip()} (EDGETL_ARM64_FETCH=1 lets it pip-download "
                    "the wheel)")
    assert check.returncode == 0, check.stdout + check.stderr
    built = request.getfixturevalue("built")
    bundle = built["bundles"]["cpu-arm64"]
    files_before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    work = tmp_path_factory.mktemp("arm64")
    proc = _script(str(bundle), "--work", str(work), "--json", str(work / "result.json"))
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: a check failed, judged below
    result = json.loads((work / "result.json").read_text())
    result.update(stdout=proc.stdout, exit=proc.returncode, work=work,
                  files_added=sorted(set(bundle.rglob("*")) - {bundle / p for p in files_before}))
    return result


def test_cpu_arm64_golden_mode_passes_under_qemu(arm64):
    """The bundle's own C++ consumer, built for aarch64 against the aarch64 onnxruntime, passes its golden
    mode on both CPU models (with and without dot-product instructions); the logit probe's top-1 on every
    golden image is the one recorded on x86; the build left nothing in the bundle."""
    header = Path(arm64["program"]).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    n_golden = len((Path(arm64["bundle"]) / "golden" / "golden.txt").read_text().splitlines())
    assert [r["cpu"] for r in arm64["runs"]] == ["neoverse-n1", "cortex-a72"]
    for run in arm64["runs"]:
        assert run["golden_exit"] == 0, arm64["stdout"]
        assert any(f"golden self-test passed: {n_golden} of {n_golden}" in line for line in run["golden_output"])
        assert run["images"] == n_golden and run["top1_equal"] == f"{n_golden} of {n_golden}", arm64["stdout"]
    assert arm64["files_added"] == []


def test_cpu_arm64_logits_within_logit_atol(arm64):
    """The issue's bar: every aarch64 logit within the bundle's logit_atol of the x86 build's expected.json.
    A bundle for another architecture records x86's fused-vs-unfused drift of the same graph and allows
    1.5 times it (bundle_contents.unfused_drift: the aarch64 difference was 0.72-1.005 times that drift on
    five bundles before the rule existed); the script measures that drift again, independently."""
    spread = arm64["x86_spread"]["ORT_ENABLE_ALL vs ORT_DISABLE_ALL"]
    worst = max(run["max_logit_diff"] for run in arm64["runs"])
    atol = arm64["runs"][0]["logit_atol"]
    assert atol >= 1.5 * spread * 0.98, (atol, spread)  # the two measures may differ in the last digits
    assert worst <= atol, arm64["stdout"]

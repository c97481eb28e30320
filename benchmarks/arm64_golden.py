"""ARM64 evidence without an ARM machine: the cpu-arm64 bundle's C++ consumer, cross-compiled for aarch64
and run under qemu-aarch64 (user-mode emulation of real aarch64 instructions), golden mode and logits.

    python benchmarks/arm64_golden.py [BUNDLE] [--cache DIR] [--work DIR] [--cpu NAME ...] [--offline]
                                      [--json FILE] [--qemu PROGRAM] [--cpuinfo-shim auto|on|off] [--check]

BUNDLE: a built cpu-arm64 bundle (default: builds a small one in WORK with `edgetl build --target
cpu-arm64` on the built-in shapes at 64 pixels); an openvino bundle works too (OpenVINO's aarch64
wheel and its ARM CPU plugin, -DOpenVINO_DIR). Steps:
1. the aarch64 onnxruntime library of the installed onnxruntime's version: PyPI's aarch64 wheel
   (pip download, kept in --cache) laid out like onnxruntime's release archive (include/ + lib/);
   the headers are third_party/onnxruntime-1.21's (the wheel has none; older headers work with a
   newer library);
2. a CMake toolchain file for Debian's aarch64-linux-gnu cross compiler; the bundle's cpp/ configured
   with -DCMAKE_PREFIX_PATH=<that folder> and -DONNXRUNTIME_INCLUDE_DIR/-DONNXRUNTIME_LIBRARY, built
   in WORK (outside the bundle), plus a small logit probe (arm64_golden.cpp: the model's raw logits on
   each golden PPM);
3. for each --cpu (qemu CPU model; default neoverse-n1, with the dot-product instructions, and
   cortex-a72, without them): `qemu-aarch64 -L
   /usr/aarch64-linux-gnu -cpu NAME edgetl_classify BUNDLE --golden` (exit code and output as they
   are), then the probe: max |logit difference| against golden/expected.json, judged by its logit_atol.

qemu before 8.2 shows the guest the host's x86 /proc/cpuinfo; onnxruntime's CPU detection (cpuinfo)
then crashes while the library loads (SIGSEGV). For those versions an LD_PRELOAD shim (arm64_golden.c,
built here for aarch64) hands the guest a /proc/cpuinfo for the emulated CPU model, which is what a real ARM kernel
and qemu >= 8.2 give; the instruction set features still come from qemu's auxiliary vector.

Exit codes: 0 passed, 1 golden mode or a logit beyond logit_atol failed, 2 usage (bad bundle), 3 a
tool or the aarch64 library is missing (one line naming the Debian package or the fix).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ROOT / "third_party" / "onnxruntime-1.21" / "include"
SYSROOT = Path("/usr/aarch64-linux-gnu")
TOOLS = {"cmake": "cmake", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
         "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}
QEMUS = ("qemu-aarch64", "qemu-aarch64-static")
# MIDR fields (implementer, variant, part, revision) of qemu's CPU models, and their Linux feature names
CPUS = {"neoverse-n1": ("0x41", "0x4", "0xd0c", "1", "dot"), "cortex-a76": ("0x41", "0x4", "0xd0b", "1", "dot"),
        "cortex-a72": ("0x41", "0x0", "0xd08", "3", "base"), "cortex-a57": ("0x41", "0x1", "0xd07", "0", "base"),
        "cortex-a53": ("0x41", "0x0", "0xd03", "4", "base")}
FEATURES = {"base": "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid",
            "dot": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcp dcpop asimddp"}


class Missing(Exception):
    """A prerequisite is absent (exit 3)."""


TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# the Debian cross sysroot and the runtime's aarch64 folder: find_* look there only, never in the host's /usr
set(CMAKE_FIND_ROOT_PATH {sysroot} {lib})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
"""

def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def prerequisites(qemu: str | None = None) -> tuple[str, tuple[int, ...]]:
    """The qemu program and its version; Missing names the Debian package of the first absent tool."""
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise Missing(f"{tool} not found; fix: apt-get install {package}")
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").is_file():
        raise Missing(f"{SYSROOT}/lib/ld-linux-aarch64.so.1 not found; fix: apt-get install libc6-dev-arm64-cross")
    if qemu and shutil.which(qemu) is None:
        raise Missing(f"--qemu {qemu}: not an executable program")
    qemu = shutil.which(qemu) if qemu else next((q for q in QEMUS if shutil.which(q)), None)
    if qemu is None:
        raise Missing("qemu-aarch64 not found; fix: apt-get install qemu-user (or qemu-user-static)")
    m = re.search(r"version (\d+(?:\.\d+)+)", run([qemu, "--version"]).stdout)
    return qemu, tuple(int(v) for v in m.group(1).split(".")) if m else (0, 0)


def wheel(package: str, version: str, cache: Path, offline: bool, platforms: tuple[str, ...]) -> Path:
    """PyPI's aarch64 wheel of package==version, in cache (pip download unless offline)."""
    found = sorted(cache.glob(f"{package}-{version}-*aarch64.whl"))
    if not found and offline:
        raise Missing(f"no {package} {version} aarch64 wheel in {cache}; fix: run without --offline "
                      f"(pip download) or put {package}-{version}-*_aarch64.whl there")
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        proc = run([sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
                    "--only-binary=:all:",
                    *[a for p in platforms for a in ("--platform", p)], "-d", cache], timeout=900)
        found = sorted(cache.glob(f"{package}-{version}-*aarch64.whl"))
        if not found:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Missing(f"pip download of the {package} {version} aarch64 wheel failed: {tail}")
    return found[-1]


def unpack(whl: Path, members: str, folder: Path) -> None:
    """The wheel's files under members/ into folder (whole or not at all)."""
    import zipfile

    partial = folder.with_name(folder.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.filename.startswith(members) and not info.is_dir():
                target = partial / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(info))
                target.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)


def onnxruntime_aarch64(version: str, cache: Path, offline: bool) -> Path:
    """<cache>/onnxruntime-<version>-aarch64, laid out like onnxruntime's release archive: include/ (the
    third_party headers) + lib/libonnxruntime.so{,.1,.<version>}."""
    folder = cache / f"onnxruntime-{version}-aarch64"
    library = folder / "lib" / f"libonnxruntime.so.{version}"
    if not library.is_file():
        whl = wheel("onnxruntime", version, cache, offline, ("manylinux_2_28_aarch64", "manylinux2014_aarch64"))
        unpack(whl, f"onnxruntime/capi/libonnxruntime.so.{version}", cache / "onnxruntime-unpacked")
        (folder / "lib").mkdir(parents=True, exist_ok=True)
        (cache / "onnxruntime-unpacked" / "onnxruntime" / "capi" / library.name).replace(library)
        shutil.rmtree(cache / "onnxruntime-unpacked")
    for link, target in (("libonnxruntime.so.1", library.name), ("libonnxruntime.so", "libonnxruntime.so.1")):
        (folder / "lib" / link).unlink(missing_ok=True)
        (folder / "lib" / link).symlink_to(target)
    shutil.copytree(HEADERS, folder / "include", dirs_exist_ok=True)
    return folder


def openvino_aarch64(version: str, cache: Path, offline: bool) -> Path:
    """<cache>/openvino-<version>-aarch64/openvino: the wheel's cmake/ (OpenVINO_DIR), include/ and libs/."""
    folder = cache / f"openvino-{version}-aarch64"
    if not (folder / "openvino" / "cmake" / "OpenVINOConfig.cmake").is_file():
        whl = wheel("openvino", version, cache, offline, ("manylinux_2_35_aarch64", "manylinux_2_31_aarch64",
                                                          "manylinux_2_28_aarch64", "manylinux2014_aarch64"))
        unpack(whl, "openvino/", folder)
    return folder


def runtime_folder(runtime: str, version: str | None, cache: Path, offline: bool) -> tuple[str, Path]:
    """The runtime's version (default: the installed one's) and its aarch64 folder."""
    if version is None:
        module = __import__(runtime)
        version = module.__version__ if runtime == "onnxruntime" else module.get_version().split("-")[0]
    fetch = onnxruntime_aarch64 if runtime == "onnxruntime" else openvino_aarch64
    return version, fetch(version, cache, offline)


def cross_build(runtime: str, src: Path, build: Path, toolchain: Path, lib: Path) -> None:
    where = ([f"-DCMAKE_PREFIX_PATH={lib}", f"-DONNXRUNTIME_INCLUDE_DIR={lib / 'include'}",
              f"-DONNXRUNTIME_LIBRARY={lib / 'lib' / 'libonnxruntime.so'}"] if runtime == "onnxruntime"
             else [f"-DOpenVINO_DIR={lib / 'openvino' / 'cmake'}"])
    shutil.rmtree(build, ignore_errors=True)  # a fresh configure: the folder may hold another bundle's cache
    for cmd in (["cmake", "-S", src, "-B", build, f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DCMAKE_BUILD_TYPE=Release",
                 *where], ["cmake", "--build", build, "-j", "2"]):
        proc = run(cmd, timeout=900)
        if proc.returncode:
            sys.exit(f"error: {' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def build_probe(runtime: str, work: Path, lib: Path) -> tuple[Path, Path]:
    """The logit probe (arm64_golden.cpp) and the /proc/cpuinfo shim (arm64_golden.c), compiled for aarch64."""
    probe, shim = work / f"arm64_probe_{runtime}", work / "cpuinfo_shim.so"
    if runtime == "onnxruntime":
        flags = ["-I", lib / "include", "-L", lib / "lib", "-lonnxruntime", f"-Wl,-rpath,{lib / 'lib'}"]
    else:
        libs = lib / "openvino" / "libs"
        flags = ["-DEDGETL_PROBE_OPENVINO", "-I", lib / "openvino" / "include", "-L", libs,
                 "-l:" + next(libs.glob("libopenvino.so.*")).name, f"-Wl,-rpath,{libs}"]
    here = Path(__file__).resolve().parent
    for cmd in (["aarch64-linux-gnu-g++", "-O2", "-std=c++17", here / "arm64_golden.cpp", "-o", probe, *flags],
                ["aarch64-linux-gnu-gcc", "-O2", "-shared", "-fPIC", here / "arm64_golden.c", "-o", shim, "-ldl"]):
        proc = run(cmd, timeout=600)
        if proc.returncode:
            sys.exit(f"error: {' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return probe, shim


def small_bundle(work: Path) -> Path:
    out = work / "bundle-build"
    if not (out / "cpu-arm64" / "manifest.json").is_file():
        proc = run([sys.executable, "-m", "edgetl.cli", "build", "--target", "cpu-arm64", "--image-size", "64",
                    "--epochs", "5", "--seed", "0", "--out", out, "-q"], timeout=3600)
        if proc.returncode:
            sys.exit(f"error: edgetl build failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out / "cpu-arm64"


def fake_cpuinfo(work: Path, cpu: str) -> Path:
    impl, var, part, rev, feats = CPUS[cpu]
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {FEATURES[feats]}\nCPU implementer\t: {impl}\n"
              f"CPU architecture: 8\nCPU variant\t: {var}\nCPU part\t: {part}\nCPU revision\t: {rev}\n"
              for i in range(os.cpu_count() or 1)]
    path = work / f"cpuinfo-{cpu}"
    path.write_text("\n".join(blocks) + "\n")
    return path


def emulate(qemu: str, cpu: str, env: list[str], cmd: list) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = run([qemu, "-L", SYSROOT, "-cpu", cpu, *[a for e in env for a in ("-E", e)], *cmd], timeout=900)
    return proc, time.perf_counter() - t0


def golden_ppms(bundle: Path) -> list[Path]:
    """golden/<k>.ppm: the k-th golden image (golden.txt's and expected.json's order) as the model takes it."""
    n = len((bundle / "golden" / "golden.txt").read_text().splitlines())
    return [bundle / "golden" / f"{k:02d}.ppm" for k in range(n)]


def x86_logits(runtime: str, bundle: Path, model: Path) -> dict[str, list[list[float]]]:
    """The installed runtime's logits here (x86) on the golden PPMs; onnxruntime at three graph optimisation
    levels: how far two correct executions of the same QDQ model drift apart on one machine."""
    import numpy as np
    from PIL import Image

    pixels = [np.asarray(Image.open(p).convert("RGB"))[None] for p in golden_ppms(bundle)]
    if runtime == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(str(model), "CPU")
        return {"OpenVINO CPU": [compiled(x)[0][0].tolist() for x in pixels]}
    import onnxruntime

    out = {}
    for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, name)
        sess = onnxruntime.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        out[name] = [sess.run(None, {sess.get_inputs()[0].name: x})[0][0].tolist() for x in pixels]
    return out


def spread(a: list[list[float]], b: list[list[float]]) -> float:
    return round(max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)), 6)


def check_cpu(qemu: str, shimmed: bool, cpu: str, work: Path, exe: Path, probe: Path, shim: Path,
              bundle: Path, model: Path) -> dict:
    """Golden mode, then the probe's logits against expected.json, on one emulated CPU model."""
    env = [f"LD_PRELOAD={shim}", f"EDGETL_ARM64_CPUINFO={fake_cpuinfo(work, cpu)}"] if shimmed else []
    golden, seconds = emulate(qemu, cpu, env, [exe, bundle, "--golden"])
    expected = json.loads((bundle / "golden" / "expected.json").read_text())["models"]["int8"]
    record = {"cpu": cpu, "golden_exit": golden.returncode, "golden_seconds": round(seconds, 2),
              "golden_output": golden.stdout.strip().splitlines()[-12:], "golden_stderr": golden.stderr.strip()[-1000:],
              "golden_logit_lines": [ln for ln in golden.stdout.splitlines() if "logit" in ln.lower()]}
    logits, _ = emulate(qemu, cpu, env, [probe, model, *golden_ppms(bundle)])
    rows = [[float(v) for v in ln.split()[1:]] for ln in logits.stdout.splitlines()]
    if logits.returncode or len(rows) != len(expected["items"]):
        record.update(probe_exit=logits.returncode, probe_error=logits.stderr.strip()[-500:], passed=False)
        return record
    top1 = [max(range(len(row)), key=row.__getitem__) == item["index"]
            for row, item in zip(rows, expected["items"], strict=True)]
    record.update(max_logit_diff=spread(rows, [item["logits"] for item in expected["items"]]),
                  logit_atol=expected["logit_atol"], top1_equal=f"{sum(top1)} of {len(top1)}", images=len(rows),
                  logits=rows)
    record["passed"] = golden.returncode == 0 and record["max_logit_diff"] <= expected["logit_atol"] and all(top1)
    return record


def report(result: dict) -> None:
    print(f"{result['runtime']} {result['version']} aarch64, {result['compiler']}, qemu {result['qemu_version']}"
          f"{' (with the /proc/cpuinfo shim)' if result['cpuinfo_shim'] else ''}; bundle {result['bundle']}")
    for r in result["runs"]:
        print(f"  {r['cpu']}: golden exit {r['golden_exit']} ({r['golden_seconds']} s): "
              f"{r['golden_output'][-1] if r['golden_output'] else r['golden_stderr'] or 'no output'}")
        for line in r["golden_logit_lines"]:
            print(f"    {line}")
        if "max_logit_diff" in r:
            print(f"    probe: max |logit - expected| {r['max_logit_diff']} (logit_atol {r['logit_atol']}), "
                  f"top-1 as expected {r['top1_equal']}; vs x86 here {r['vs_x86']}")
        else:
            print(f"    probe failed (exit {r['probe_exit']}): {r['probe_error']}")
    if result["x86_spread"]:
        print(f"  x86 here, same model, between optimisation levels: {result['x86_spread']}")
    print(f"ARM64 golden: {'PASSED' if result['passed'] else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, help="a cpu-arm64 (or openvino) bundle (default: build a "
                    "small cpu-arm64 one)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGETL_ARM64_CACHE",
                                                                      Path.home() / ".cache" / "edgetl" / "arm64")),
                    help="where the aarch64 wheels and libraries are kept ($EDGETL_ARM64_CACHE)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgetl-arm64-work",
                    help="build folder, outside the bundle (default: %(default)s)")
    ap.add_argument("--cpu", action="append", choices=sorted(CPUS), help="qemu CPU model (repeatable)")
    ap.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                    help="default: the bundle's runtime.json backend (onnxruntime for the small build)")
    ap.add_argument("--runtime-version", dest="version", help="runtime version (default: the installed one's)")
    ap.add_argument("--qemu", help="the qemu-aarch64 program (default: qemu-aarch64 or qemu-aarch64-static on PATH)")
    ap.add_argument("--cpuinfo-shim", choices=("auto", "on", "off"), default="auto",
                    help="the /proc/cpuinfo shim: auto = for qemu before 8.2 only")
    ap.add_argument("--offline", action="store_true", help="never pip download: the wheel must be in --cache")
    ap.add_argument("--check", action="store_true", help="only check the prerequisites (exit 0 or 3)")
    ap.add_argument("--json", type=Path, help="write the result object there")
    args = ap.parse_args(argv)
    cpus = args.cpu or ["neoverse-n1", "cortex-a72"]
    if args.bundle is not None and not (args.bundle / "golden" / "expected.json").is_file():
        print(f"error: {args.bundle}: not a built bundle (no golden/expected.json); fix: pass a cpu-arm64 bundle "
              "folder", file=sys.stderr)
        return 2
    runtime_json = json.loads((args.bundle / "runtime.json").read_text()) if args.bundle else {}
    runtime = args.runtime or runtime_json.get("backend", "onnxruntime")
    try:
        qemu, qemu_version = prerequisites(args.qemu)
        version, lib = runtime_folder(runtime, args.version, args.cache.resolve(), args.offline)
    except Missing as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if args.check:
        print(f"ready: {qemu} {'.'.join(map(str, qemu_version))}, {runtime} {version} aarch64 in {lib}")
        return 0
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundle = (args.bundle or small_bundle(work)).resolve()
    if work == bundle or work.is_relative_to(bundle):
        print(f"error: --work {work} is inside the bundle; fix: a folder outside it", file=sys.stderr)
        return 2
    model = bundle / json.loads((bundle / "runtime.json").read_text())["models"]["int8"]
    toolchain = work / "aarch64-toolchain.cmake"
    toolchain.write_text(TOOLCHAIN.format(sysroot=SYSROOT, lib=lib))
    t0 = time.perf_counter()
    build = work / f"build-{runtime}"
    cross_build(runtime, bundle / "cpp", build, toolchain, lib)
    probe, shim = build_probe(runtime, work, lib)
    exe = next(p for p in sorted(build.rglob("edgetl_classify")) if p.is_file())
    shimmed = qemu_version < (8, 2) if args.cpuinfo_shim == "auto" else args.cpuinfo_shim == "on"
    result = {"bundle": str(bundle), "runtime": runtime, "version": version, "qemu": qemu,
              "qemu_version": ".".join(map(str, qemu_version)), "cpuinfo_shim": shimmed,
              "compiler": run(["aarch64-linux-gnu-g++", "--version"]).stdout.splitlines()[0],
              "build_seconds": round(time.perf_counter() - t0, 1), "program": str(exe),
              "runs": [check_cpu(qemu, shimmed, cpu, work, exe, probe, shim, bundle, model) for cpu in cpus]}
    x86 = x86_logits(runtime, bundle, model)
    result["x86_spread"] = {f"ORT_ENABLE_ALL vs {k}": spread(x86["ORT_ENABLE_ALL"], v) for k, v in x86.items()
                            if k != "ORT_ENABLE_ALL"} if runtime == "onnxruntime" else {}
    for r in result["runs"]:
        if "logits" in r:
            r["vs_x86"] = {k: spread(r["logits"], v) for k, v in x86.items()}
    result["passed"] = all(r["passed"] for r in result["runs"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    report(result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

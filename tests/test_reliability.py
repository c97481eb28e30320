"""Reliability, each checked on the whole `edgetl` process: interrupts (SIGINT 130, SIGTERM 143), a full
disk, class imbalance, byte-identical bundles, a manifest that cannot be edited, signed bundles,
tampered bundles refused at load. Faults come from tests/_faults.py or a small real file system."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST_FLAGS
from tests.test_bundle import _torchless_env

pytestmark = pytest.mark.integration
FAULTS = Path(__file__).with_name("_faults.py")
EDGETL = Path(sys.executable).with_name("edgetl")
# The fault tests' build: what it is interrupted in, or fills a disk with, not what it ships. The cpu
# target with onnxruntime's own PTQ alone (no NNCF bias correction, no refit, no escalation).
FAST_RECIPE = 'targets = ["fast-cpu.toml"]\n[quantize]\nescalate = false\n'
FAST_PROFILE = ('name = "cpu"\nbackend = "onnxruntime"\nmodel_input = "uint8-nhwc"\n'
                '[quantization]\nquantizers = ["ort_static"]\n')


def _edgetl(fault: str, *args, tmpdir: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    """`edgetl ARGS` in a process (and process group, as a shell runs a command) of its own, with
    TMPDIR (to see what it leaves there) and a feature cache of its own."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    mark = uuid.uuid4().hex  # every process it starts inherits it: _alive() finds them
    # a feature cache of its own: what it computes (and where a signal lands) does not depend on which
    # tests ran before it
    env = {**os.environ, "TMPDIR": str(tmpdir), "EDGETL_TEST_RUN": mark,
           "EDGETL_CACHE": str(tmpdir.parent / f"cache-{mark}"), **(env or {})}
    proc = subprocess.Popen([sys.executable, str(FAULTS), fault, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)
    proc.mark = mark
    return proc


def _alive(mark: str, settle_s: float = 15) -> list[int]:
    """Processes still running that one `_edgetl` call started (ranks, decoding workers), after
    giving them `settle_s` to exit."""
    needle = f"EDGETL_TEST_RUN={mark}".encode()
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in env.read_bytes().split(b"\0"):
                    found.append(int(env.parent.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _reports(out: Path) -> list[str]:
    """Report files in OUT: an interrupted build writes none."""
    return sorted(p.name for p in out.glob("report.*")) + sorted(p.name for p in out.glob(".report*"))


def _run(fault: str, *args, tmpdir: Path, env: dict | None = None, timeout: float = 300):
    proc = _edgetl(fault, *args, tmpdir=tmpdir, env=env)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _ours_left(tmpdir: Path) -> list[str]:
    """What edgetl left in TMPDIR. Third-party caches that live there by design are not ours:
    torch's inductor cache folder and OpenVINO's telemetry session file."""
    return sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_") and p.name != ".ses")


def _debris(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith((".staging-", ".old-", ".report")))


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def earlier(built, tmp_path) -> Path:
    """OUT holding an earlier build's cpu bundle (a copy of the shared build's)."""
    out = tmp_path / "out"
    shutil.copytree(built["bundle"], out / "cpu")
    return out


@pytest.fixture()
def fast_recipe(tmp_path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_RECIPE)
    (tmp_path / "fast-cpu.toml").write_text(FAST_PROFILE)
    return path


class _Stderr:
    """The process's stderr, read line by line by a thread (so that waiting can time out)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stderr), daemon=True)
        self.thread.start()

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in list(self.lines)):
                return
            if not self.thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no '{needle}' on stderr: {self.text[-2000:]}")

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _interrupt(proc: subprocess.Popen, sig: int, err: _Stderr, timeout: float = 120) -> str:
    """`sig` to the whole process group, as Ctrl-C or a CI runner sends it; the process's stderr."""
    os.killpg(proc.pid, sig)
    proc.wait(timeout=timeout)
    err.thread.join(timeout=10)
    return err.text


# 1. interrupts ------------------------------------------------------------------------------------

def test_sigint_during_training_exits_130_and_cleans_up(earlier, build_data, fast_recipe, tmp_path):
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    proc = _edgetl("none", "build", fast_recipe, "--data", build_data, "--out", earlier, *FAST_FLAGS[:-1],
                   "--seed", "3", tmpdir=tmpdir)
    stderr = _Stderr(proc)
    stderr.wait_for("> train")
    err = _interrupt(proc, signal.SIGINT, stderr)  # the DataLoader workers get it too
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert lines == ["edgetl: error: interrupted by SIGINT; nothing published for cpu; temporary and staging "
                     "folders removed, bundles already in OUT left as they were"], err
    assert "Aborted" not in err
    # No traceback escapes; a library's destructor may still report one through Python's own
    # "Exception ignored in" (not an exit path).
    assert err.count("Traceback") == err.count("Exception ignored in"), err
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _reports(earlier)
    assert not _ours_left(tmpdir) and not _alive(proc.mark)  # the decoding workers are gone too


def test_second_and_third_signals():
    """The second signal during the clean-up is noted and ignored; the third quits at once (exit 130)."""
    code = ("import os, signal\nfrom edgetl import interrupt\n"
            "with interrupt.as_exceptions():\n"
            "    try:\n        os.kill(os.getpid(), signal.SIGINT)\n"
            "    except interrupt.Interrupted:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n        print('cleaning up', flush=True)\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n        print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "cleaning up\n"
    assert "SIGINT again: still cleaning up; a third signal quits at once" in proc.stderr


def test_sigterm_while_a_bundle_is_staged_exits_143_and_keeps_the_earlier_one(earlier, build_data, fast_recipe,
                                                                             tmp_path):
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    code, out, err = _run("term-at-manifest", "build", fast_recipe, "--data", build_data, "--out", earlier,
                          *FAST_FLAGS, "--seed", "3", "--json", tmpdir=tmpdir)
    assert code == 143, err
    answer = json.loads(out.strip().splitlines()[-1])  # --json: the error as an object, exit code included
    assert answer["ok"] is False and answer["exit_code"] == 143 and "Traceback" not in err
    assert "interrupted by SIGTERM; nothing published for cpu" in answer["error"]
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _reports(earlier)
    assert not _ours_left(tmpdir)
    assert subprocess.run([EDGETL, "verify", earlier / "cpu"], capture_output=True).returncode == 0


def test_sigint_during_a_two_process_build(earlier, build_data, fast_recipe, tmp_path):
    """--nproc 2: the elastic launcher takes the signal and stops the ranks; each cleans up."""
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    proc = _edgetl("none", "build", fast_recipe, "--data", build_data, "--out", earlier, "--nproc", "2",
                   "--no-cache", *FAST_FLAGS[:-1], "--seed", "3", tmpdir=tmpdir)
    stderr = _Stderr(proc)
    stderr.wait_for("> train")
    err = _interrupt(proc, signal.SIGINT, stderr)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT; nothing published for cpu" in err
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _ours_left(tmpdir)
    assert not _reports(earlier) and not _alive(proc.mark)  # both ranks (and their workers) are gone


def test_a_failing_rank_gives_its_exit_code_through_the_cli(earlier, build_data, fast_recipe, tmp_path):
    """--nproc 2, rank 1 refuses with a usage error: the build exits 2 (the rank's code, not 1 or 3),
    names the rank and its error in one line, and no process of the run is left."""
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    proc = _edgetl("fail-rank-1", "build", fast_recipe, "--data", build_data, "--out", earlier, "--nproc", "2",
                   "--no-cache", "--json", *FAST_FLAGS, tmpdir=tmpdir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert not _alive(proc.mark)
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["exit_code"] == 2
    assert answer["error"] == "rank 1 of 2 failed: injected: rank 1 cannot read its shard", answer
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _reports(earlier)
    assert [p for p in _ours_left(tmpdir) if not p.startswith("edgetl-fault-")] == []


def test_sigterm_between_the_publishing_renames_finishes_the_swap_first(earlier, build_data, fast_recipe, tmp_path):
    """The signal reaches another thread between the two renames: the swap completes, then the build stops."""
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    code, out, err = _run("term-in-publish", "build", fast_recipe, "--data", build_data, "--out", earlier,
                          *FAST_FLAGS, "--seed", "3", tmpdir=tmpdir)
    assert code == 143, err
    assert "interrupted by SIGTERM; every target was published" in err
    assert _tree_bytes(earlier / "cpu") != before and not _debris(earlier) and not _ours_left(tmpdir)
    assert subprocess.run([EDGETL, "verify", earlier / "cpu"], capture_output=True).returncode == 0


def test_sigint_while_targets_are_gated_side_by_side(earlier, build_data, fast_recipe, tmp_path):
    """--jobs 2: the targets' threads stop at their next step; the build ends with 130 and cleans up."""
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    proc = _edgetl("none", "build", fast_recipe, "--data", build_data, "--out", earlier, "--target", "cpu",
                   "--target", "openvino", "--jobs", "2", *FAST_FLAGS[:-1], "--seed", "3", tmpdir=tmpdir)
    stderr = _Stderr(proc)
    stderr.wait_for("> target openvino")
    err = _interrupt(proc, signal.SIGINT, stderr)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT; nothing published for cpu, openvino" in err
    assert _tree_bytes(earlier / "cpu") == before and not (earlier / "openvino").exists()
    assert not _debris(earlier) and not _reports(earlier) and not _ours_left(tmpdir)


# 2. a full disk -----------------------------------------------------------------------------------

def test_full_disk_in_out_names_out_and_keeps_the_earlier_bundle(earlier, build_data, fast_recipe, tmp_path):
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    code, out, err = _run(f"enospc-out:{earlier}", "build", fast_recipe, "--data", build_data, "--out", earlier,
                          *FAST_FLAGS, tmpdir=tmpdir)
    assert code == 3, err
    line = next(ln for ln in out.splitlines() if "no space left" in ln)
    assert f"OUT {earlier.resolve()} filled up" in line and "MB free there now" in line
    assert "a build needs about" in line and "MB in OUT" in line and "fix: free space" in line
    assert "[Errno 28]" not in out + err
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _ours_left(tmpdir)


def test_full_temporary_folder_names_it_and_exits_3(earlier, build_data, fast_recipe, tmp_path):
    """Without root (no tmpfs): the exported model's write into the temporary folder finds the disk full."""
    before = _tree_bytes(earlier / "cpu")
    tmpdir = tmp_path / "tmp"
    code, out, err = _run("enospc-tmp", "build", fast_recipe, "--data", build_data, "--out", earlier, *FAST_FLAGS,
                          "--json", tmpdir=tmpdir)
    assert code == 3, err
    answer = json.loads(out)
    line = answer["targets"][0]["error"]["message"]
    assert answer["targets"][0]["error"]["exit_code"] == 3 and answer["ok"] is False
    assert f"the temporary folder {tmpdir.resolve()} filled up" in line and "fix: free space" in line, line
    assert "[Errno 28]" not in out + err and "Traceback" not in err
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _ours_left(tmpdir)


@pytest.fixture()
def small_fs(tmp_path):
    """A real 24 MB file system (tmpfs), where this machine lets the tests mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))


def test_temporary_folder_filling_up_on_a_real_file_system(earlier, build_data, fast_recipe, small_fs):
    before = _tree_bytes(earlier / "cpu")
    tmpdir = small_fs / "tmp"
    tmpdir.mkdir()
    _fill(small_fs, 2_000_000)  # the val/test crops fit; the exported models do not
    code, out, err = _run("none", "build", fast_recipe, "--data", build_data, "--out", earlier, *FAST_FLAGS,
                          tmpdir=tmpdir)
    assert code == 3, err
    text = out + err
    assert "no space left on device" in text and f"the temporary folder {tmpdir}" in text, text
    assert "[Errno 28]" not in text and "Traceback" not in text
    assert _tree_bytes(earlier / "cpu") == before and not _debris(earlier) and not _ours_left(tmpdir)


def test_out_filling_up_on_a_real_file_system(built, build_data, fast_recipe, small_fs, tmp_path):
    out = small_fs / "out"
    shutil.copytree(built["bundle"], out / "cpu")
    before = _tree_bytes(out / "cpu")
    _fill(small_fs, 1_000_000)
    tmpdir = tmp_path / "tmp"
    code, stdout, err = _run("none", "build", fast_recipe, "--data", build_data, "--out", out, *FAST_FLAGS,
                             tmpdir=tmpdir)
    assert code == 3, err
    assert f"OUT {out.resolve()}" in stdout + err and "no space left on device" in stdout + err
    assert "[Errno 28]" not in stdout + err
    assert _tree_bytes(out / "cpu") == before and not _debris(out) and not _ours_left(tmpdir)
    assert subprocess.run([EDGETL, "verify", out / "cpu"], capture_output=True).returncode == 0


# no temporary folder on the other exit paths: a gate failure, an internal error

@pytest.mark.parametrize("fault,code", [("corrupt-quant", 1), ("crash-export", 3)])
def test_no_temporary_folder_left_on_failure(fault, code, tiny_data, tmp_path):
    profile = tmp_path / "only-ort.toml"
    profile.write_text('name = "cpu"\nbackend = "onnxruntime"\n[quantization]\nquantizers = ["ort_static"]\n')
    tmpdir, out = tmp_path / "tmp", tmp_path / "out"
    rc, stdout, err = _run(fault, "build", "--data", tiny_data, "--out", out, "--target", profile, *FAST_FLAGS,
                           tmpdir=tmpdir)
    assert rc == code, err
    assert not (out / "cpu").exists() and (not out.exists() or not _debris(out)) and not _ours_left(tmpdir)


# 3. class imbalance -------------------------------------------------------------------------------

def test_class_imbalance_is_warned_recorded_and_not_judged(tmp_path, fast_recipe):
    data = tmp_path / "imbalanced"
    rng = np.random.default_rng(0)
    for name, n, colour in (("many", 140, (220, 40, 40)), ("few", 3, (40, 60, 220))):
        (data / name).mkdir(parents=True)
        for i in range(n):
            img = rng.normal(128, 20, (40, 40, 3))
            img[10:30, 10:30] = colour
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(data / name / f"{i:03d}.png")
    out = tmp_path / "out"
    code, stdout, err = _run("none", "build", fast_recipe, "--data", data, "--out", out, *FAST_FLAGS,
                             tmpdir=tmp_path / "tmp", env={"SOURCE_DATE_EPOCH": "1767225600"})
    assert code == 0, err  # as the issue found it: the build passes; now it says so
    assert not _ours_left(tmp_path / "tmp")
    assert "class 'few' has 3 images, 'many' has 140" in stdout
    assert "too few images to judge the recall of 'few' (1)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert any("'few' has 3 images" in w for w in report["data"]["warnings"])
    per_class = {c["class"]: c for c in report["targets"][0]["metrics"]["per_class"]}
    assert per_class["few"]["judged"] is False and per_class["many"]["judged"] is True
    assert "too small to judge" in (out / "report.md").read_text()
    manifest = json.loads((out / "cpu" / "manifest.json").read_text())  # warned, not refused: published
    assert manifest["data"]["warnings"] == report["data"]["warnings"]
    assert manifest["created"] == "2026-01-01T00:00:00Z"  # SOURCE_DATE_EPOCH


# 4. a bundle is a function of its inputs ----------------------------------------------------------

def test_a_rebuild_in_another_process_folder_and_time_writes_the_same_bytes(built, build_data, tmp_path):
    """The shared build's recipe again in a process of its own, later, into another OUT with another
    TMPDIR and an empty feature cache of its own (every row recomputed): every file of the cpu,
    openvino and gpu-int8 bundles is byte for byte the same (OpenVINO names nodes from a process-wide
    counter: the IR must not depend on what ran before it in the process)."""
    out = tmp_path / "elsewhere" / "out"
    code, stdout, err = _run("none", "build", "--data", build_data, "--out", out, "--target", "cpu", "--target",
                             "openvino", "--target", "gpu-int8", *FAST_FLAGS, tmpdir=tmp_path / "tmp",
                             env={"EDGETL_CACHE": str(tmp_path / "empty-cache")})
    assert code == 0, err
    assert not _ours_left(tmp_path / "tmp")  # a successful build leaves nothing in TMPDIR either
    assert list((tmp_path / "empty-cache" / "features").iterdir())  # the rows were computed here, not read
    for name, first in (("cpu", built["bundle"]), ("openvino", built["openvino"]), ("gpu-int8", built["gpu"])):
        again, before = _tree_bytes(out / name), _tree_bytes(first)
        assert again == before, (name, sorted(f for f in before if again.get(f) != before[f]))


def test_no_absolute_path_or_measurement_inside_bundles(built, build_data):
    needles = [str(built["out"].resolve()).encode(), str(build_data.resolve()).encode(),
               str(Path.home()).encode() + b"/", b"/tmp/"]
    for target in ("bundle", "openvino", "gpu"):
        for name, data in _tree_bytes(built[target]).items():
            assert not [n for n in needles if n in data], (target, name)
        manifest = json.loads((built[target] / "manifest.json").read_text())
        text = json.dumps(manifest)
        for key in ('"seconds"', '"speed"', '"latency_ms"', *([] if "SOURCE_DATE_EPOCH" in os.environ
                                                              else ['"created"'])):
            assert key not in text, (target, key)
    report = json.loads((built["out"] / "report.json").read_text())
    assert report["targets"][0]["models"][0]["speed"]["batch_1"]["ms"] > 0  # measurements live here


# 5./6. the manifest protected; tampered bundles refused at load -----------------------------------

def _edit_manifest(bundle: Path, reseal: bool = False, **changes) -> None:
    from edgetl.runtime.integrity import digest

    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = m
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    if reseal:
        m["digest"] = digest(m)
    path.write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("change", [{"metrics__accuracy": 0.999}, {"target": "openvino"}])
def test_verify_catches_an_edited_manifest(built, tmp_path, change):
    b = tmp_path / "b"
    shutil.copytree(built["bundle"], b)
    _edit_manifest(b, **change)
    res = subprocess.run([EDGETL, "verify", b], capture_output=True, text=True)
    assert res.returncode == 1 and f"{b}/manifest.json: changed since the build" in res.stderr


def test_verify_refuses_symbolic_links(built, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(built["bundle"], b)
    shutil.copy(b / "labels.txt", tmp_path / "labels.txt")
    (b / "labels.txt").unlink()
    (b / "labels.txt").symlink_to(tmp_path / "labels.txt")  # same content, through a link
    res = subprocess.run([EDGETL, "verify", b], capture_output=True, text=True)
    assert res.returncode == 1 and "symbolic link" in res.stderr


def test_predict_refuses_a_tampered_bundle_unless_no_verify(built, tmp_path, build_data):
    b = tmp_path / "b"
    shutil.copytree(built["bundle"], b)
    import onnx

    model = onnx.load(str(b / "model.onnx"))  # still a valid model that runs: only its hash tells
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "tampered": "yes"})
    onnx.save(model, str(b / "model.onnx"))
    img = sorted((build_data / "red").glob("*.png"))[0]
    res = subprocess.run([EDGETL, "predict", b, img], capture_output=True, text=True)
    assert res.returncode == 1 and f"{b}/model.onnx: changed since the build" in res.stderr
    assert subprocess.run([EDGETL, "predict", "--no-verify", b, img], capture_output=True).returncode == 0
    env = _torchless_env(tmp_path)
    own = subprocess.run([sys.executable, b / "predict.py", img], capture_output=True, text=True, env=env)
    assert own.returncode == 1 and "model.onnx: changed since the build" in own.stderr, own.stderr
    own = subprocess.run([sys.executable, b / "predict.py", "--no-verify", img], capture_output=True, text=True,
                         env=env)
    assert own.returncode == 0 and "\tred\t" in own.stdout


def test_running_a_bundle_leaves_it_intact(built, tmp_path, build_data):
    """With bytecode writing on (as on most machines), predict.py and `edgetl predict` write no
    __pycache__ into the bundle; a planted one is named as what it is."""
    b = tmp_path / "b"
    shutil.copytree(built["bundle"], b)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    img = sorted((build_data / "red").glob("*.png"))[0]
    for _ in range(2):
        own = subprocess.run([sys.executable, b / "predict.py", img], capture_output=True, text=True, env=env)
        assert own.returncode == 0, own.stderr
        cli = subprocess.run([EDGETL, "predict", b, img], capture_output=True, text=True, env=env)
        assert cli.returncode == 0, cli.stderr
    assert not list(b.rglob("__pycache__"))
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "preprocess.cpython-311.pyc").write_bytes(b"planted")
    res = subprocess.run([EDGETL, "verify", b], capture_output=True, text=True)
    assert res.returncode == 1 and "bytecode cache" in res.stderr and "PYTHONDONTWRITEBYTECODE" in res.stderr


def _keys(folder: Path) -> tuple[Path, Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    folder.mkdir()

    def pem(key, name):
        (folder / f"{name}.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (folder / f"{name}.pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    pem(ec.generate_private_key(ec.SECP256R1()), "key")
    pem(ec.generate_private_key(ec.SECP256R1()), "other")
    pem(rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa")
    return folder / "key.pem", folder / "key.pub.pem", folder / "other.pub.pem"


def test_sign_and_verify_with_a_key_pair(built, tmp_path):
    import model_signing  # noqa: F401  (a dev dependency: a broken install fails here, it does not skip)

    key, pub, other = _keys(tmp_path / "keys")
    b = tmp_path / "b"
    shutil.copytree(built["bundle"], b)

    def edgetl(*args):
        return subprocess.run([EDGETL, *map(str, args)], capture_output=True, text=True)

    assert edgetl("verify", b, "--public-key", pub).returncode == 1  # not signed yet
    assert edgetl("sign", b, "--key", tmp_path / "keys" / "rsa.pem").returncode == 2  # not an EC key
    signed = edgetl("sign", b, "--key", key)
    assert signed.returncode == 0 and (b / "bundle.sig").is_file(), signed.stderr
    ok = edgetl("verify", b, "--public-key", pub)
    assert ok.returncode == 0 and "signature verified" in ok.stdout, ok.stderr
    golden = next(iter((b / "golden").glob("*.png")))
    assert edgetl("predict", b, golden, "--public-key", pub).returncode == 0
    assert "signature not checked" in edgetl("verify", b).stdout
    wrong = edgetl("verify", b, "--public-key", other)
    assert wrong.returncode == 1 and "another key" in wrong.stderr
    # An edit that also recomputes the manifest's digest passes the hashes, not the signature.
    _edit_manifest(b, reseal=True, metrics__accuracy=0.999)
    assert edgetl("verify", b).returncode == 0
    forged = edgetl("verify", b, "--public-key", pub)
    assert forged.returncode == 1 and "manifest.json" in forged.stderr, forged.stderr
    assert edgetl("predict", b, golden, "--public-key", pub).returncode == 1
    # A tampered bundle is never signed.
    (b / "labels.txt").write_text("x\n")
    refused = edgetl("sign", b, "--key", key)
    assert refused.returncode == 1 and "labels.txt" in refused.stderr


# 7. a malformed recipe ----------------------------------------------------------------------------

def test_array_of_tables_recipe_exits_2_naming_the_key(tmp_path, tiny_data):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[data]]\npath = "imgs"\n')
    for extra in ([], ["--data", tiny_data]):
        code, out, err = _run("none", "build", recipe, *extra, "--out", tmp_path / "out", tmpdir=tmp_path / "tmp")
        assert code == 2 and "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.startswith("edgetl: error:")]
        assert len(lines) == 1 and f"{recipe}: 'data':" in lines[0], err
        assert not (tmp_path / "out").exists()

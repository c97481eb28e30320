"""The real `edgetl` command in a process of its own, with one fault injected (tests only).

    python tests/_faults.py FAULT [edgetl arguments...]

FAULT: none | enospc-out:DIR (every bundle file copied under DIR finds the disk full) | enospc-tmp (the
FP32 ONNX export, written into the temporary folder, finds the disk full) |
term-at-manifest (the process sends itself SIGTERM while its bundle is staged, before it is
published) | term-in-publish (a thread of the process sends SIGTERM between the two renames that
swap a bundle into place) | corrupt-quant (the ort_static quantizer scrambles its weight scales: the gate fails) |
crash-export (the ONNX export raises: an internal error) | fail-rank-1 (under --nproc, rank 1 refuses its
training with a usage error, exit 2: the ranks are spawned processes, so the fault reaches them through a
sitecustomize module on PYTHONPATH).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from pathlib import Path


def _enospc_under(folder: Path) -> None:
    real = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    shutil.copyfile = copyfile


def _enospc_in_tmp() -> None:
    from edgetl import export

    def to_onnx(model, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    export.to_onnx = to_onnx


def _term_at_manifest() -> None:
    from edgetl import bundle

    real = bundle.write_manifest

    def write_manifest(stage, manifest):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(stage, manifest)

    bundle.write_manifest = write_manifest


def _term_in_publish() -> None:
    import threading
    import time

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".staging-"):  # the earlier bundle is already moved aside
            t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            t.start()
            t.join()
            time.sleep(0.3)  # the handler runs in the main thread, here
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def _corrupt_quant() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgetl.backends.onnxruntime import OnnxRuntimeBackend
    from tests.test_pipeline import _corrupt_scales

    OnnxRuntimeBackend.quantizers["ort_static"] = _corrupt_scales


def _crash_export() -> None:
    from edgetl import export

    def to_onnx(*args, **kwargs):
        raise RuntimeError("injected export crash")

    export.to_onnx = to_onnx


RANK_1_FAULT = """
import os

if os.environ.get("EDGETL_TEST_FAULT") == "fail-rank-1":
    from edgetl import train
    from edgetl.errors import UsageError

    real = train.run

    def run(*args, **kwargs):  # RANK is set in the rank only after it has started
        if os.environ.get("RANK") == "1":
            raise UsageError("injected: rank 1 cannot read its shard")
        return real(*args, **kwargs)

    train.run = run
"""


def _fail_rank_1() -> None:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="edgetl-fault-"))  # under the test's TMPDIR: the test ignores it
    (folder / "sitecustomize.py").write_text(RANK_1_FAULT)
    os.environ["EDGETL_TEST_FAULT"] = "fail-rank-1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def main() -> None:
    fault, *args = sys.argv[1:]
    name, _, arg = fault.partition(":")
    {"none": lambda: None, "enospc-out": lambda: _enospc_under(Path(arg)), "enospc-tmp": _enospc_in_tmp,
     "term-at-manifest": _term_at_manifest, "term-in-publish": _term_in_publish,
     "corrupt-quant": _corrupt_quant, "crash-export": _crash_export, "fail-rank-1": _fail_rank_1}[name]()
    from edgetl.cli import cli

    cli(args, prog_name="edgetl")


if __name__ == "__main__":
    main()

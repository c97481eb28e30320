"""--device and --nproc: which device trains, and how many processes build together.

`edgetl build --nproc N` starts N processes with torch's elastic launcher (torchrun's engine) on
this machine; `torchrun ... edgetl build` runs the same build over several machines (the README
has the command). The collective backend is gloo on CPU and NCCL on CUDA.

Rank roles: every rank computes its share — feature rows of the training views and val split,
a slice of each global fine-tune batch (DistributedSampler) — and rank 0 alone computes the float
reference, quantizes, gates and publishes; only rank 0 touches OUT. A rank that fails ends the
whole run: the launcher stops the others at once, and a rank stuck in a collective gives up after
`compute.timeout_s`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from . import interrupt, threads
from .errors import EdgetlError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the build: rank, number of processes, its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # The group in which ranks wait for rank 0's solitary work (scan, decoding val/test): bounded by
    # compute.prepare_timeout_s, not by compute.timeout_s (which bounds the training collectives).
    wait_group: object = field(default=None, compare=False, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, keys: Sequence) -> list:
        """This rank's part of `keys` (every world-th, from its rank)."""
        return list(keys)[self.rank::self.world]

    def broadcast(self, obj, *, waiting: bool = False):
        """Rank 0's `obj` on every rank. `waiting`: the others may wait long for it (rank 0's scan),
        bounded by compute.prepare_timeout_s instead of compute.timeout_s."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.wait_group if waiting else None)
        return box[0]

    def wait_for_main(self) -> None:
        """Every rank waits here until rank 0 is done with its solitary work (scan, decoding),
        bounded by compute.prepare_timeout_s; the training collectives after it keep timeout_s."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.wait_group)

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks, on every rank."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0])

    def gather(self, obj) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0; None on the others."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out


SINGLE = Ranks()


def resolve_device(spec: str, local_rank: int = 0) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch device string this machine has."""
    import torch

    spec = spec.strip().lower()
    if spec == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        return f"cuda:{local_rank % torch.cuda.device_count()}" if has_cuda else "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not has_cuda:
            raise UsageError(f"--device {spec}: torch sees no CUDA device here; fix: --device cpu (or auto)")
        index = local_rank if spec == "cuda" else spec.removeprefix("cuda:")
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "fix: --device cuda:N with N below that, or auto")
        return f"cuda:{int(index)}"
    raise UsageError(f"--device {spec}: not a device; fix: auto, cpu, cuda or cuda:N")


def device_info(device: str) -> dict:
    """What the manifest records about the training device."""
    import torch

    if device.startswith("cuda"):
        return {"device": device, "name": torch.cuda.get_device_name(torch.device(device)), "amp": True,
                "channels_last": True}
    return {"device": "cpu", "threads": torch.get_num_threads()}


def from_environment() -> bool:
    """True when this process was started by torchrun / an elastic agent with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device_spec: str, timeout_s: float, prepare_timeout_s: float | None = None) -> tuple[Ranks, str]:
    """Join the process group of a launched build: (this rank, its device). torch computes with the
    numerics' fixed thread count in every rank, as one process does (threads.py); engines get
    the allowed CPUs divided among the processes on this machine."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    check_devices(device_spec, local_world)  # torchrun's --nproc-per-node: one GPU per process too
    device = resolve_device(device_spec, local_rank)
    threads.fix_numerics()
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    wait = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_s, prepare_timeout_s or 0)))
    return Ranks(rank, world, local_rank, wait), device


def backend_for(device: str) -> str:
    """The process group's backends. On CUDA, NCCL for tensors on the GPU *and* gloo for the CPU tensors
    and objects the ranks exchange (sums of losses, the scan, feature rows): an NCCL-only group has
    no backend for CPU tensors and fails on the first of them."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def check_devices(spec: str, nproc: int) -> None:
    """Before a launch: NCCL takes one GPU per process, so several ranks on one GPU are refused here
    (exit 2, one line) instead of failing inside NCCL after the scan."""
    if nproc <= 1:
        return
    import torch

    spec = spec.strip().lower()
    if spec == "cpu" or not torch.cuda.is_available():
        if spec.startswith("cuda"):
            resolve_device(spec)  # the usual "no CUDA device" line
        return
    count = torch.cuda.device_count()
    if spec.startswith("cuda:"):
        raise UsageError(f"--device {spec} --nproc {nproc}: every process would train on the one GPU {spec}, and "
                         "NCCL refuses two processes on one GPU; fix: --device cuda (one GPU per process) or --nproc 1")
    if nproc > count:
        raise UsageError(f"--device {spec} --nproc {nproc}: this machine has {count} CUDA device(s), and NCCL takes "
                         f"one per process; fix: --nproc {count} (or --device cpu for {nproc} CPU processes)")


def leave() -> None:
    """Leave the process group after a rank's work succeeded. A failing rank does not call this: it
    exits, and its error is written before the others see their connections close."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _error_file(folder: str, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.error"


def _entry(fn, folder: str, args: tuple):
    """What each launched process runs: fn(*args), its error written down for the launcher."""
    rank = int(os.environ.get("RANK", "0"))
    os.dup2(2, 1)  # stdout belongs to the launching process (`--json`); ranks write to stderr
    sys.stdout = sys.stderr
    try:
        with interrupt.as_exceptions():  # the launcher's SIGTERM unwinds this rank too (its temp folder goes)
            return fn(*args)
    except BaseException as e:
        code = e.exit_code if isinstance(e, (EdgetlError, interrupt.Interrupted)) else EdgetlError.exit_code
        text = str(e) if isinstance(e, EdgetlError) else f"{type(e).__name__}: {e}"
        # when it failed, on the machine's monotonic clock (one clock for every process, in ns: file
        # mtimes are coarse and would give a tie to rank 0)
        _error_file(folder, rank).write_text(f"{code}\n{time.monotonic_ns()}\n{text}", encoding="utf-8")
        raise


def _failure(f: Path) -> tuple[int, str, str] | None:
    """(when, exit code, message) from a rank's error file; None for one cut short (a rank killed while
    writing it)."""
    try:
        code, when, text = f.read_text(encoding="utf-8").split("\n", 2)
        return int(when), str(int(code)), text
    except (OSError, ValueError):
        return None


def launch(nproc: int, fn, args: tuple):
    """Run fn(*args) in `nproc` processes on this machine (torch elastic launch, no restarts);
    rank 0's return value. A failing rank raises EdgetlError naming it, with its exit code."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with interrupt.temporary_folder("edgetl-launch-") as folder:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=0.2, start_method="spawn",
                              logs_specs=DefaultLogsSpecs(log_dir=str(Path(folder) / "logs")))
        saved, tempfile.tempdir = tempfile.tempdir, str(folder)  # torch's spawn leaves a failed rank's
        try:  # pytorch-errorfile-*.pickle in the temporary folder: this one, removed with it
            results = elastic_launch(config, _entry)(fn, folder, args)
        except SignalException as e:  # the launcher's own handler took SIGINT/SIGTERM; the ranks are stopped
            raise interrupt.caught_elsewhere(int(e.sigval)) from None
        except ChildFailedError as e:
            failed = sorted(e.failures)
            # The first rank to fail is the cause; the others' errors are its echo (a closed connection).
            written = sorted((*found, int(f.stem.removeprefix("rank"))) for f in Path(folder).glob("rank*.error")
                             if (found := _failure(f)))
            if written:
                _, code, text, rank = written[0]
                if int(code) > 128:  # a rank stopped by SIGINT/SIGTERM: the build was interrupted
                    raise interrupt.caught_elsewhere(int(code) - 128) from None
                err = EdgetlError(f"rank {rank} of {nproc} failed: {text}")
                err.exit_code = int(code)
                raise err from None
            raise EdgetlError(f"rank {failed[0] if failed else '?'} of {nproc} failed "
                              f"(exit {e.failures[failed[0]].exitcode if failed else '?'}); "
                              "fix: run with --nproc 1 -vv to see the error") from None
        finally:
            tempfile.tempdir = saved
            interrupt.reinstall()  # torch leaves its own SIGINT/SIGTERM handlers in place
        return results[0]

"""How many CPUs this process may use, and how many threads each kind of work gets: one room for it.

* `allowed()`: the CPUs this process may run on (its affinity mask: `taskset`, a cgroup cpuset, a
  CI runner's share), not the machine's count (`os.cpu_count()` ignores all of them; onnxruntime's
  default thread pool does too).
* **Numerics** (`fix_numerics()`): torch computes the trained model, the float reference and QAT
  with `numeric()` threads (2; `EDGETL_NUMERIC_THREADS` sets another count), whatever the CPUs, in
  every process of a `--nproc` build and in every target of a `--jobs` build; numpy's BLAS (the
  head refit's ridge) runs on one thread. Both split sums by the thread count (measured: 1 vs 2
  threads change the head's weights and the reference logits in their last bits, and so the INT8
  model; OpenBLAS's gemm and solve too), so only fixed counts build the same bytes on one CPU and
  on sixteen. The counts are in the manifest (`numerics`).
* **Engines** (onnxruntime, OpenVINO: calibration, the search's evidence, the head refit's
  features, the gate, the speed evidence): `engine()` threads, the allowed CPUs shared among the
  processes and targets built at once. Their kernels split work by outputs, never a sum into parts
  (the same bytes with 1 and 2 threads: tests/test_pipeline.py builds on one CPU and with
  `--jobs 2`), so they take what there is.
* **Waiting**: a thread that waits for a sibling sleeps instead of spinning. On a shared machine
  the sibling may not be scheduled: a spinning waiter then burns the time slice the sibling needs
  (measured: a build beside one busy process took 5x the quiet build). torch's OpenMP reads
  OMP_WAIT_POLICY when it loads (edgetl/__init__.py sets PASSIVE, unless the environment says
  otherwise, before anything imports torch); onnxruntime sessions get `ort_options()`.
"""

from __future__ import annotations

import os

NUMERIC_THREADS = 2
BLAS_THREADS = 1  # numpy's BLAS: small solves; one thread also never spins
NUMERIC_ENV = "EDGETL_NUMERIC_THREADS"
WAITING = {"OMP_WAIT_POLICY": "PASSIVE"}  # torch's libgomp (and MKL/oneDNN, which run on its threads)


def wait_passively() -> None:
    """Sleeping waits for the OpenMP runtime torch loads (a value the user set wins). Effective only
    before torch is imported: edgetl/__init__.py calls it."""
    for key, value in WAITING.items():
        os.environ.setdefault(key, value)


def allowed() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's or CI runner's `cpu.max`), at least 1."""
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover (not Linux)
        mask = os.cpu_count() or 1
    return max(1, min(mask, cgroup_quota(CPU_MAX) or mask))


CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cgroup_quota(path: str) -> int | None:
    """CPUs a cgroup v2 `cpu.max` file allows ("QUOTA PERIOD", rounded up); None: no limit or no file."""
    try:
        with open(path, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # "max", absent, unreadable
        return None


_ALONE: list[bool] = []  # set by alone(): the other processes of a --nproc build have finished


def alone() -> None:
    """Rank 0 after training (the other ranks return): the machine's CPUs are this process's again."""
    _ALONE.append(True)


def local_processes() -> int:
    """Processes of this build at work on this machine (torch's launcher sets LOCAL_WORLD_SIZE)."""
    if _ALONE:
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def engine(jobs: int = 1) -> int:
    """Engine threads for one of `jobs` targets built at once in one of this machine's processes."""
    return max(1, allowed() // (local_processes() * max(1, jobs)))


def numeric() -> int:
    """torch's threads for everything whose numbers reach a bundle: a constant, not the CPUs."""
    from .errors import UsageError

    raw = os.environ.get(NUMERIC_ENV, "").strip()
    if not raw:
        return NUMERIC_THREADS
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise UsageError(f"{NUMERIC_ENV}={raw!r}: not a thread count; fix: a whole number from 1 to 1024 "
                         f"(or unset it for {NUMERIC_THREADS})")
    return int(raw)


def fix_numerics() -> int:
    """torch's intra-op threads = numeric() (threads started later, --jobs targets included, inherit
    it); the BLAS libraries loaded (numpy's OpenBLAS) at BLAS_THREADS. Returns torch's count."""
    import torch
    from threadpoolctl import threadpool_limits

    n = numeric()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    threadpool_limits(BLAS_THREADS, user_api="blas")  # for the rest of the process
    return n


def ort_options(threads: int | None = None):
    """onnxruntime SessionOptions for the build's own sessions: `threads` intra-op threads (default
    engine()), one inter-op thread, and no spinning: idle pool threads sleep."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or engine()
    opts.inter_op_num_threads = 1
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        opts.add_session_config_entry(key, "0")
    return opts


def record() -> dict:
    """What the manifest says about the numerics (`numerics`): the same on every machine."""
    return {"torch_threads": numeric(), "blas_threads": BLAS_THREADS}

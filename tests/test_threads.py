"""edgetl/threads.py: the CPUs a process may use, fixed numerics threads, waits that sleep."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgetl import threads
from edgetl.errors import UsageError

PROBE = """
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import edgetl
from edgetl import threads
import torch
torch_default = torch.get_num_threads()
n = threads.fix_numerics()
from threadpoolctl import threadpool_info
print(json.dumps({"wait": os.environ.get("OMP_WAIT_POLICY"), "allowed": threads.allowed(), "engine": threads.engine(),
                  "torch_default": torch_default, "torch": torch.get_num_threads(), "fixed": n,
                  "blas": sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})}))
"""


def _probe(**env) -> dict:
    """PROBE's findings in a fresh process whose environment is this one's without OMP_WAIT_POLICY and
    EDGETL_NUMERIC_THREADS, plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", threads.NUMERIC_ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**base, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_process_on_one_cpu_computes_with_the_fixed_thread_counts():
    """Restricted to one CPU (as `taskset -c 0`): the engines get that one CPU and torch's default
    would be one thread, but the numerics run with the fixed counts; OpenMP waits sleep."""
    got = _probe()
    assert got["allowed"] == got["engine"] == 1 and got["torch_default"] == 1
    assert got["torch"] == got["fixed"] == threads.NUMERIC_THREADS == 2
    assert got["blas"] == [threads.BLAS_THREADS]
    assert got["wait"] == "PASSIVE"


def test_the_wait_policy_and_the_thread_count_are_the_users_when_set():
    assert _probe(**{threads.NUMERIC_ENV: "3"})["torch"] == 3
    assert _probe(OMP_WAIT_POLICY="ACTIVE")["wait"] == "ACTIVE"


@pytest.mark.parametrize("bad", ["0", "two", "-1", "2.5"])
def test_a_bad_numerics_thread_count_is_a_usage_error(monkeypatch, bad):
    monkeypatch.setenv(threads.NUMERIC_ENV, bad)
    with pytest.raises(UsageError, match=threads.NUMERIC_ENV):
        threads.numeric()


def test_engine_threads_are_shared_among_processes_and_targets(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    allowed = threads.allowed()
    assert threads.engine() == max(1, allowed // 2) and threads.engine(jobs=3) == max(1, allowed // 6)
    monkeypatch.setattr(threads, "_ALONE", [True])  # rank 0 after the other ranks finished training
    assert threads.engine() == allowed
    monkeypatch.setattr(threads, "_ALONE", [])
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.engine() == allowed == len(os.sched_getaffinity(0))


def test_build_sessions_do_not_spin_and_bundle_engines_spin_unless_told(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgetl.runtime.engine_ort import Engine

    opts = threads.ort_options(3)
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    for settings, spins in (({}, True), ({"threads": 1, "spinning": False}, False), ({"spinning": "false"}, False)):
        engine = Engine(path, settings)
        assert engine.run(x).tolist() == [[0.0, 0.0, 2.0]]
        opts = engine.session.get_session_options()
        if spins:  # onnxruntime's default: no entry at all
            with pytest.raises(RuntimeError, match="allow_spinning"):
                opts.get_session_config_entry("session.intra_op.allow_spinning")
        else:
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_openvino_runs_float_ops_in_f32_and_says_so(tmp_path):
    """The CPU plugin would run float ops in bf16 on CPUs with AMX: the engine pins f32 unless config
    says otherwise, and executed_by names the precision that ran (the speed baseline's label too)."""
    pytest.importorskip("openvino")
    import onnx
    from onnx import TensorProto, helper

    from edgetl.runtime.engine_openvino import Engine

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    engine = Engine(path, {"device": "CPU"})
    assert engine.config["INFERENCE_PRECISION_HINT"] == "f32"
    engine.run(np.ones((1, 3), np.float32))
    assert engine.executed_by == "OpenVINO CPU (f32)"
    assert Engine(path, {"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "bf16"}}).config[
        "INFERENCE_PRECISION_HINT"] == "bf16"  # the user's setting wins


def test_a_cgroup_cpu_quota_caps_the_cpus(tmp_path):
    f = tmp_path / "cpu.max"
    for text, cpus in (("150000 100000\n", 2), ("50000 100000", 1), ("400000 100000", 4), ("max 100000", None),
                       ("garbage", None)):
        f.write_text(text)
        assert threads.cgroup_quota(str(f)) == cpus, text
    assert threads.cgroup_quota(str(tmp_path / "absent")) is None

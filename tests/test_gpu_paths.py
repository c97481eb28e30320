"""The CUDA, NCCL and TensorRT paths, exercised on the CPU: device-type dispatch through a `cuda:gloo`
process group, `torch.cuda` faked, a provider list faked. benchmarks/gpu_check.sh runs them on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgetl import launch
from edgetl.cli import cli
from edgetl.errors import UsageError

TOTAL_SCRIPT = r"""
import sys
import torch.distributed as dist
from edgetl import launch
dist.init_process_group(sys.argv[1], store=dist.HashStore(), rank=0, world_size=1)
print(launch.Ranks(0, 2, 0).total(2.5))
"""


def _total_under(backend: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TOTAL_SCRIPT, backend], capture_output=True, text=True, timeout=120)


def test_a_cuda_process_group_also_carries_cpu_tensors():
    """The NCCL group had a cuda backend only: summing a CPU tensor died at the end of epoch 1. The
    device-type dispatch is the same with gloo standing in for NCCL on this machine."""
    assert launch.backend_for("cuda:0") == "cpu:gloo,cuda:nccl" and launch.backend_for("cpu") == "gloo"
    broken = _total_under("cuda:gloo")  # what an NCCL-only group is for a CPU tensor
    assert broken.returncode != 0 and "No backend type associated with device type cpu" in broken.stderr
    fixed = _total_under(launch.backend_for("cuda:0").replace("nccl", "gloo"))
    assert fixed.returncode == 0, fixed.stderr
    assert float(fixed.stdout.strip()) == 2.5


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `n` CUDA devices, as torch reports it."""
    import torch

    def fake(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


def test_two_ranks_on_one_gpu_are_refused_up_front(gpus):
    gpus(1)
    for spec in ("auto", "cuda"):
        with pytest.raises(UsageError, match=r"has 1 CUDA device\(s\), and NCCL takes one per process; fix: --nproc 1"):
            launch.check_devices(spec, 2)
    with pytest.raises(UsageError, match="NCCL refuses two processes on one GPU"):
        launch.check_devices("cuda:0", 2)
    launch.check_devices("auto", 1)  # one process: nothing to refuse
    launch.check_devices("cpu", 4)  # gloo on the CPU
    gpus(2)
    launch.check_devices("auto", 2)  # one GPU per process
    assert launch.resolve_device("auto", local_rank=1) == "cuda:1"


def test_device_errors_exit_2_with_their_line(tiny_data, tmp_path, gpus):
    gpus(0)
    for device in ("cuda", "cuda:7"):
        res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(tmp_path / "o"),
                                       "--device", device, "--json"])
        assert res.exit_code == 2 and "torch sees no CUDA device here; fix: --device cpu" in res.stdout
        assert not (tmp_path / "o").exists()
    gpus(1)
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(tmp_path / "o"),
                                   "--device", "cuda:7", "--json"])
    assert res.exit_code == 2 and "this machine has 1 CUDA device(s)" in res.stdout
    res = CliRunner().invoke(cli, ["build", "--data", str(tiny_data), "--out", str(tmp_path / "o"),
                                   "--device", "auto", "--nproc", "2", "--json"])
    assert res.exit_code == 2 and "NCCL takes one per process" in res.stdout and not (tmp_path / "o").exists()


def test_augmented_views_do_not_depend_on_other_threads(tiny_data):
    """Views drawn from a generator of their own: two threads augmenting at once (--jobs) make the
    same pixels as one thread alone (torch's process-global generator interleaved them)."""
    from edgetl import data
    from edgetl.views import TrainViews

    items = data.scan(tiny_data, seed=0).split("train")[:12]
    contract = {"input_size": [40, 40], "resize_size": 44, "interpolation": "bilinear", "mean": [0.5] * 3,
                "std": [0.25] * 3, "channel_order": "RGB", "layout": "NCHW"}
    import torch

    views = TrainViews(items, contract, 4, seed=3)
    alone = np.stack([views.make(k) for k in range(len(views))])
    got: dict[int, np.ndarray] = {}
    done = threading.Event()

    def work(t: int):
        got[t] = np.stack([views.make(k) for k in range(len(views))])

    def meddle():  # another thread reseeding and drawing from torch's global generator all along
        while not done.is_set():
            torch.manual_seed(12345)
            torch.rand(8)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    other = threading.Thread(target=meddle)
    other.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    other.join()
    assert np.array_equal(got[0], alone) and np.array_equal(got[1], alone)
    assert not np.array_equal(alone[1], alone[2])  # views of one image differ from each other


def _relu(path) -> str:
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["out"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


def test_strict_providers_checks_what_runs_not_what_the_wheel_lists(tmp_path, monkeypatch, capsys):
    """A wheel that lists CUDA whose libraries do not load: the session runs on the CPU. Strict: refused;
    not strict: a warning naming what runs, and nothing printed on stdout (--json stays parseable)."""
    import onnxruntime as ort

    from edgetl.runtime.engine_ort import Engine

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    model = _relu(tmp_path / "relu.onnx")
    settings = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider did not load"):
        Engine(model, {**settings, "strict_providers": True})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine = Engine(model, settings)
    assert engine.executed_by == "CPUExecutionProvider" and "CUDAExecutionProvider" in engine.skipped
    assert any("running on CPUExecutionProvider" in str(w.message) for w in seen)
    assert capsys.readouterr().out == ""


@pytest.mark.integration
def test_the_tensorrt_int8_model_is_what_tensorrt_parses(built):
    """gpu-int8's INT8 model: weights INT8 behind DequantizeLinear, every activation quantizer signed
    with zero point 0, and no INT32 bias DequantizeLinear (TensorRT's parser has rejected those);
    TensorRT's INT8 mode is switched off for the FP16 model (no calibration table for it)."""
    from onnx import numpy_helper as nh

    bundle = built["gpu"]
    g = onnx.load(str(bundle / "model.int8.onnx")).graph
    inits = {i.name: i for i in g.initializer}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    kinds = Counter(inits[n.input[0]].data_type for n in dq if n.input[0] in inits)
    assert kinds and set(kinds) == {TensorProto.INT8}, kinds  # weights; no INT32 (bias) initializer behind a DQ
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert q
    for n in q:
        zp = nh.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any(), n.name
    runtime = json.loads((bundle / "runtime.json").read_text())
    assert runtime["settings"]["provider_options"]["TensorrtExecutionProvider"]["trt_int8_enable"] is True
    fp16 = runtime["model_settings"]["fp16"]["provider_options"]["TensorrtExecutionProvider"]
    assert fp16["trt_int8_enable"] is False and fp16["trt_fp16_enable"] is True
    assert "int8" not in runtime["model_settings"]


def test_a_step_the_grad_scaler_skips_does_not_move_the_lr_schedule():
    """AMP on CUDA: a step with inf/NaN gradients is skipped by the GradScaler (its scale drops); the
    cosine schedule must not advance for it (torch warns when it does). A CPU stand-in for the scaler."""
    import torch

    from edgetl import train
    from edgetl.recipe import TrainSection

    class Scaler:  # skips (and halves its scale on) every other step, like GradScaler on overflow
        def __init__(self):
            self.scale_value, self.calls = 1024.0, 0

        def get_scale(self):
            return self.scale_value

        def scale(self, loss):
            return loss

        def step(self, opt):
            self.calls += 1
            if self.calls % 2:
                opt.step()

        def update(self):
            if not self.calls % 2:
                self.scale_value /= 2

    w = torch.nn.Parameter(torch.ones(2))
    group = {"params": [w], "lr": 0.1}
    y_val = torch.tensor([0, 1])

    def train_epoch(_epoch, step):
        for _ in range(4):
            step((w ** 2).sum())
        return 0.0

    train._fit([group], steps=4, train_epoch=train_epoch, val_logits=lambda: torch.eye(2), y_val=y_val,
               snapshot=lambda: None, cfg=TrainSection(epochs=1), fit=train.Fit(), scaler=Scaler())
    # 2 of 4 steps taken: the schedule is half way down its cosine (T_max = 4), not at its end
    assert group["lr"] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 2 / 4)))

"""QAT's two parts (edgetl/refine/qat.py): the frozen front and the trained tail are the whole model."""

import copy

import numpy as np
import pytest
import torch

from edgetl.profiles import load_profile
from edgetl.refine import qat as q
from tests.test_refine import _fitted

pytestmark = pytest.mark.integration


def test_front_then_tail_is_the_whole_quantized_model_and_only_the_tail_trains(tiny_data, tmp_path):
    _, _, x, _, _, inputs = _fitted(tiny_data, tmp_path, seed=0, epochs=3)
    rins = inputs()
    Student, Blocks = q._torch_modules()  # noqa: N806
    trunk = q.fold_batchnorm(copy.deepcopy(rins.model[0]))
    trunk.features = Blocks(*trunk.features)
    start = q.tail_start(trunk.features, (64, 64))
    assert start == 8  # MobileNetV2 at 64 px: blocks 8.. take 4x4 inputs (1/16 of 64) or smaller
    student = Student(trunk, copy.deepcopy(rins.model[1])).eval().requires_grad_(True)  # as qat() makes it
    qm = q._quantize(student, rins, load_profile("cpu"))
    stages = q.Stages(qm, qm.trunk.features, start)
    batch = torch.from_numpy(x["val"][:6])
    with torch.no_grad():
        whole = qm(batch).numpy()
        front = stages.front(batch)
        split = stages.tail(front).numpy()
    assert front.shape[-1] <= 4 and not front.requires_grad
    np.testing.assert_array_equal(split, whole)  # the same ops, the same quantizers
    # a training step's gradients reach the tail and the head, never the front's weights
    qm.zero_grad(set_to_none=True)
    stages.tail(stages.front(batch)).pow(2).mean().backward()
    front_params = [p for b in list(qm.trunk.features)[:start] for p in b.parameters()]
    tail_params = [p for b in list(qm.trunk.features)[start:] for p in b.parameters()]
    assert front_params and all(p.grad is None for p in front_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tail_params)
    assert qm.head.weight.grad is not None

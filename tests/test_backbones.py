import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl import backbones
from edgetl.errors import WeightsError
from edgetl.runtime.preprocess import preprocess

# ImageNet indices: 281-285 are the domestic cats; 504 coffee mug, 967 espresso, 968 cup.
CATS, COFFEE = {281, 282, 283, 284, 285}, {504, 967, 968}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_pretrained_weights_recognise_imagenet_photos(name, tmp_path, monkeypatch):
    import skimage.data as skdata  # a dev dependency: a broken install fails here, it does not skip
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the offline package must serve
    spec = backbones.get(name)
    src = backbones.resolve_weights(spec)
    assert src.origin.startswith("package")
    model = backbones.load_pretrained(spec, src)
    x = np.stack([preprocess(Image.fromarray(img), spec.contract()) for img in (skdata.chelsea(), skdata.coffee())])
    with torch.inference_mode():
        top1 = model(torch.from_numpy(x)).argmax(1).tolist()
    assert top1[0] in CATS and top1[1] in COFFEE


def test_registry_and_contracts():
    assert {"mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
            "efficientnet_lite0"} <= set(backbones.names())
    with pytest.raises(WeightsError, match="did you mean 'mobilenet_v2'"):
        backbones.get("mobilenet_v22")
    lite = backbones.get("efficientnet_lite0").contract(192)
    assert lite["mean"] == [0.5] * 3 and lite["std"] == [0.5] * 3 and lite["input_size"] == [192, 192]
    for name, native in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):  # TF's crop: size / (size + 32)
        c = backbones.get(name).contract()
        assert c["input_size"] == [native, native] and c["resize_size"] == native + 32 and c["mean"] == [0.5] * 3
    b0 = backbones.get("efficientnet_b0").contract()
    assert b0["interpolation"] == "bicubic" and b0["resize_size"] == 256


def test_weights_resolution_order(tmp_path, monkeypatch):
    spec = backbones.get("mobilenet_v2")
    pkg = backbones.resolve_weights(spec)
    # 1. an explicit file wins
    mine = tmp_path / "mine.pth"
    shutil.copyfile(pkg.path, mine)
    assert backbones.resolve_weights(spec, mine).origin == "--weights"
    # 2. the torch hub cache comes before the package, and its sha256 prefix is checked
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "hub" / "checkpoints" / spec.weights_file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"corrupt")
    with pytest.raises(WeightsError, match="does not match the prefix 'b0353104'"):
        backbones.resolve_weights(spec)
    shutil.copyfile(pkg.path, cached)
    assert backbones.resolve_weights(spec).origin == "torch hub cache"


def test_missing_weights_explain_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"no pretrained weights for 'efficientnet_b0'.*--weights FILE"):
        backbones.resolve_weights(backbones.get("efficientnet_b0"))
    with pytest.raises(WeightsError, match="file not found"):
        backbones.resolve_weights(backbones.get("efficientnet_b0"), tmp_path / "nope.pth")


def test_wrong_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    spec = backbones.get("mobilenet_v3_small")
    with pytest.raises(WeightsError, match="does not fit backbone 'mobilenet_v3_small'"):
        backbones.load_pretrained(spec, backbones.resolve_weights(spec, bad))


def test_lite_variants_match_their_checkpoints_layout():
    from edgetl.models.efficientnet_lite import lite_stages

    # Channels and repeats of TF's efficientnet_lite_builder (width 1.1 rounds 40 -> 48, 112 -> 120, ...).
    assert [(c, r) for *_, c, r in lite_stages(1)] == [(16, 1), (24, 3), (40, 3), (80, 4), (112, 4), (192, 5), (320, 1)]
    assert [(c, r) for *_, c, r in lite_stages(2)] == [(16, 1), (24, 3), (48, 3), (88, 4), (120, 4), (208, 5), (352, 1)]


def test_lite0_same_padding_any_size():
    from edgetl.models.efficientnet_lite import efficientnet_lite0

    for size in (224, 97):
        m = efficientnet_lite0(size).eval()
        with torch.inference_mode():
            assert m(torch.zeros(2, 3, size, size)).shape == (2, 1000)

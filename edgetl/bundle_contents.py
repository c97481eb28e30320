"""What a bundle contains: the runtime files, each model's files, the contract, labels, the resolved
recipe, a README, golden inputs with the outputs the bundle's own runtime gives on them, and the
manifest that lists them all. bundle.py stages, publishes, verifies and signs; this module decides
the content."""

from __future__ import annotations

import itertools
import json
import platform
from importlib import resources
from pathlib import Path

import numpy as np

from . import __version__, bundle, data, model_input, parity
from .profiles import TargetProfile
from .recipe import BuildRecipe
from .results import published_status
from .runtime.preprocess import load_rgb, preprocess, resize_crop

N_GOLDEN = 8
GOLDEN_MARGIN = 0.5  # float top-1 minus top-2 probability a golden image should have


def write(stage: Path, *, profile: TargetProfile, backend, models: list, prepared, contract: dict, golden: list,
          common: dict, quantization: dict, warnings: list[str]) -> dict[str, list[str]]:
    """Write every file of a target's bundle into `stage`, then its sealed manifest. `models`: the
    target's gated models (precision, stem, artifact, runner, metrics, sizes, result()), default
    first; `contract`: what they take (model_input.py); `golden`: (label, image) pairs; `common`:
    manifest fields every target shares. Returns precision -> the model's bundle files."""
    p = prepared
    ds, default = p.dataset, models[0]
    raw = model_input.is_raw(contract)
    files: dict = {}
    runtime_dir = Path(str(resources.files("edgetl").joinpath("runtime")))
    for name in ("predict.py", "preprocess.py", "integrity.py", f"engine_{backend.engine}.py"):
        files[name] = runtime_dir / name
    model_files = {m.precision: backend.model_files(m.artifact, m.stem) for m in models}
    for mf in model_files.values():
        files.update(mf)
    files["labels.txt"] = "\n".join(ds.classes) + "\n"
    files["preprocess.json"] = json.dumps(contract, indent=2) + "\n"
    files["runtime.json"] = json.dumps({
        "backend": backend.name, "engine": backend.engine, "requires": backend.runtime_requires,
        "models": {prec: next(iter(mf)) for prec, mf in model_files.items()},
        "default_model": default.precision, "settings": backend.settings(profile),
        "model_settings": {m.precision: ms for m in models if (ms := backend.model_settings(profile, m.precision))},
    }, indent=2) + "\n"
    files["recipe.toml"] = recipe_toml(p.recipe, profile)
    files["README.md"] = readme(profile, p, models, backend, contract)
    if raw and backend.cpp:  # a C++ consumer (source only) for a model that takes pixels
        for name, source in cpp_sources(backend.cpp).items():
            files[f"cpp/{name}"] = source
    shipped = []
    for k, (label, img) in enumerate(golden):
        rel = f"golden/{k:02d}_{label}.png"
        files[rel] = png_bytes(img)
        shipped.append((rel, label))
        if raw:  # the pixels the model takes, for consumers without an image library (PPM, P6); named by
            files[f"golden/{k:02d}.ppm"] = ppm_bytes(resize_crop(img, contract))  # number: labels may hold spaces
    bundle.write_files(stage, files)
    other_arch = bool(profile.arch) and profile.arch != platform.machine().lower()
    expected_out = {"models": {m.precision: expected(m, stage, shipped, contract, other_arch) for m in models}}
    golden_files = {"golden/expected.json": json.dumps(expected_out, indent=1) + "\n"}
    if raw:  # "<image> <top-1 index>" per line: what the C++ consumer's --golden checks (with expected.json's
        golden_files["golden/golden.txt"] = "".join(  # logits), decoding, resizing and cropping as predict.py
            f"{item['file']} {item['index']}\n"
            for item in expected_out["models"][default.precision]["items"])
    bundle.write_files(stage, golden_files)
    created = bundle.created()  # SOURCE_DATE_EPOCH's; a bundle is a function of its inputs
    certified = all(m.certified for m in models)  # every model's drop tolerance certified by the test split
    manifest = {
        "target": profile.name, "backend": backend.name, "profile": profile.model_dump(),
        **({"created": created} if created else {}),
        **common, "versions": versions(backend), "metrics": default.metrics.to_dict(), "quantization": quantization,
        "sizes": default.sizes, "validated_with": default.validated_with,
        "models": {m.precision: m.result(list(model_files[m.precision])).to_dict() for m in models},
        "preprocess": contract, "warnings": warnings,
        "certified": certified, "status": published_status(True, certified),
    }
    bundle.write_manifest(stage, manifest)
    return {prec: list(mf) for prec, mf in model_files.items()}


def golden_items(ds: data.Dataset, test_labels, reference_logits) -> list[tuple[str, object]]:
    """Up to N_GOLDEN test images, round-robin over classes, saved decoded (PNG) for device self-tests.
    Per class, the images whose float top-1 is clear (margin >= GOLDEN_MARGIN) come first, in file
    order, then the rest by margin: another CPU, runtime version or TensorRT's FP16/INT8 kernels must
    not flip a golden image's top-1 by rounding alone."""
    margin = parity.float_margin(reference_logits)
    per_class = [sorted(np.flatnonzero(test_labels == c).tolist(),
                        key=lambda i: (margin[i] < GOLDEN_MARGIN, 0.0 if margin[i] >= GOLDEN_MARGIN else -margin[i]))
                 for c in range(len(ds.classes))]
    order = [i for rnd in itertools.zip_longest(*per_class) for i in rnd if i is not None][:N_GOLDEN]
    return [(ds.classes[test_labels[i]], load_rgb(ds.split("test")[i].path)) for i in order]


def expected(m, stage: Path, golden: list[tuple[str, str]], contract: dict, other_arch: bool = False) -> dict:
    """Expected outputs of the bundle's own golden files through its own runtime; for a bundle made for
    another CPU architecture, a logit tolerance that covers another set of INT8 kernels (unfused_drift)."""
    items, inputs = [], [preprocess(load_rgb(stage / rel), contract) for rel, _ in golden]
    for (rel, label), x in zip(golden, inputs, strict=True):
        logits = m.runner.logits(x[None])[0]
        items.append({"file": rel, "label": label, "index": int(logits.argmax()),
                      "logits": [round(float(v), 6) for v in logits]})
    scale = max((abs(v) for it in items for v in it["logits"]), default=1.0)
    atol = max(1e-3, 0.05 * scale)
    out = {"logit_atol": round(atol, 6), "executed_by": m.runner.executed_by, "items": items}
    if other_arch and m.artifact.path.suffix == ".onnx":  # INT8 kernels of another CPU architecture
        drift = unfused_drift(m.artifact.path, np.stack(inputs), np.array([it["logits"] for it in items]))
        out.update(logit_atol=round(max(atol, CROSS_ARCH_MARGIN * drift), 6), x86_unfused_drift=round(drift, 6))
    return out


# aarch64 logits (qemu, onnxruntime 1.32, five bundles: docs/bundle.md, ARM64) sat 0.72-1.005x as far from
# the x86 build's fused kernels as onnxruntime's unfused x86 execution of the same graph does: that
# drift, measured at build time, times this margin is what another architecture's self-test allows.
CROSS_ARCH_MARGIN = 1.5


def unfused_drift(model_path: Path, batch: np.ndarray, fused: np.ndarray) -> float:
    """max |logit difference| between the build's (fused) logits and onnxruntime's execution of the same
    QDQ graph with every graph optimisation off (Dequantize -> float op -> Quantize, no fused INT8 kernel)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    unfused = np.concatenate([session.run(None, {name: batch[k:k + 1]})[0] for k in range(len(batch))])
    return float(np.max(np.abs(unfused - fused))) if len(batch) else 0.0


def ppm_bytes(img) -> bytes:
    """An RGB PIL image as binary PPM (P6): a header and the raw pixels, readable with no library."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return f"P6\n{arr.shape[1]} {arr.shape[0]}\n255\n".encode("ascii") + arr.tobytes()


CPP_SHARED = ("bundle_io.hpp", "bundle_json.hpp", "image_io.hpp", "cmake/edgetl_bundle.cmake",
              "third_party/stb_image.h", "third_party/LICENSE-stb_image.txt")


def cpp_sources(folder: str) -> dict[str, Path]:
    """The C++ consumer for a backend: its CMakeLists.txt and main.cpp, the shared headers and CMake
    code, and the vendored PNG decoder (stb_image, public domain / MIT) with its licence."""
    root = Path(str(resources.files("edgetl").joinpath("runtime", "cpp")))
    return {"CMakeLists.txt": root / folder / "CMakeLists.txt", "main.cpp": root / folder / "main.cpp",
            **{name: root / name for name in CPP_SHARED}}


def png_bytes(img) -> bytes:
    """A PIL image as PNG bytes (lossless: a golden input stays the pixels the gate saw)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def input_section(c: dict, backend) -> str:
    """The README's input contract: raw pixels (normalisation inside the model) or the float tensor."""
    crop = (f"RGB, resize shorter side to {c['resize_size']} ({c['interpolation']}), centre-crop "
            f"{c['input_size'][0]}x{c['input_size'][1]}")
    if not model_input.is_raw(c):
        return (f"## Input contract (preprocess.json)\n\n{crop}, x/255, subtract mean {c['mean']},\n"
                f"divide by std {c['std']}, NCHW float32. `preprocess.py` implements it.\n")
    h, w = c["input_size"]
    text = (f"## Input contract (preprocess.json)\n\n{crop}; then the pixels as they are: uint8, NHWC "
            f"[N, {h}, {w}, 3], RGB order. The model does the rest inside (x/255, subtract mean {c['mean']}, "
            f"divide by std {c['std']}, to NCHW): an application feeds camera pixels. `preprocess.py` "
            "implements the resize and crop.\n")
    if backend.cpp:
        text += cpp_section(backend, c)
    return text


_CPP_RUNTIME = {
    "ort": ("onnxruntime", "ORT=/path/to/onnxruntime-linux-x64-1.21.0   # onnxruntime's release archive "
            "(1.21 or newer), unpacked", "-DCMAKE_PREFIX_PATH=$ORT"),
    "openvino": ("OpenVINO", 'OV=$(python -c "from openvino.utils import get_cmake_path; print(get_cmake_path())")  '
                 "# or an OpenVINO archive's runtime/cmake (2024.0 or newer)", "-DOpenVINO_DIR=$OV"),
}


def cpp_section(backend, c: dict) -> str:
    """The README's C++ part: build and install out of the bundle, run, and the exact input contract."""
    name, where, define = _CPP_RUNTIME[backend.cpp]
    h, w = c["input_size"]
    wheel = ("" if backend.cpp != "ort" else
             "\nonnxruntime's Python wheel has the library (`onnxruntime/capi/libonnxruntime.so.1.x.y`) but no "
             "headers: "
             "a folder\n`include/` (the four `onnxruntime_*.h` of onnxruntime's `include/onnxruntime/core/session/` at "
             "the same\nor an older version) + `lib/libonnxruntime.so.1.x.y` with the links `libonnxruntime.so.1` and "
             "`libonnxruntime.so`\nto it serves as `$ORT`. CMake checks the headers' C API version (21 or newer); the "
             "program refuses\na library older than its headers.\n")
    return f"""
## C++ (cpp/)

`cpp/` holds a consumer on {name}'s C++ API (source only). It reads PNG or binary PPM (P6) images of
any size, resizes and crops them itself, bit for bit as `preprocess.py` (the contract below), checks
`manifest.json`'s own digest and every file it reads against it (the model before loading it; unlike
`predict.py` it does not look for files added to the bundle), and prints
`<file> <label> <probability>` per image. Build outside the bundle (CMake refuses a build folder
inside it: the bundle stays as published), from this folder:

    {where}
    cmake -S cpp -B ../build-{backend.cpp} {define}
    cmake --build ../build-{backend.cpp}
    cmake --install ../build-{backend.cpp} --prefix ../edgetl-{backend.cpp}
    ../edgetl-{backend.cpp}/bin/edgetl_classify ../edgetl-{backend.cpp}/bundle --golden

The installed folder (`bin/edgetl_classify`, its runtime libraries in `lib/`, this bundle in `bundle/`)
runs wherever it is copied. `--golden` exits 1 when a golden image's top-1 or a logit differs from
the build's (beyond `golden/expected.json`'s `logit_atol`); `IMAGE...` classifies (`--probs`: every
class's probability); `--bench N` prints p50/p90 latency; `--no-verify` skips the sha256 checks.
`runtime.json`'s model and settings apply (threads; OpenVINO device and hints, `EDGETL_DEVICE=GPU`
overrides the device). Exit codes: 0, 1 (golden check failed, bundle changed), 2 (bad input or a
folder without `manifest.json`, one line).
{wheel}
### Input contract, for those who write their own

1. Decode to 8-bit RGB: grey is copied to R, G and B; 16-bit grey becomes round(v / 257), 16-bit
   colour its high byte; a palette its colours. Alpha (RGBA, grey+alpha, a palette with
   transparency) is composited over white with Pillow's integer `alpha_composite`; a colour-key
   transparency on grey/RGB is ignored. EXIF orientation is applied by `preprocess.py` (the C++
   refuses an image whose orientation is not 1). JPEG: decoders differ; the C++ refuses it. PPM: P6,
   maxval 255; a header ending "255\\r\\n" is one line end when the file size says so (C++ and predict.py).
2. Resize so the shorter side is {c['resize_size']}: scale = {c['resize_size']} / min(width, height); new width
   max({w}, round(width * scale)), new height max({h}, round(height * scale)), rounding half to even.
   Pillow's `{c['interpolation']}` resampling: antialiased (the filter widens with the reduction), two
   one-dimensional passes each rounded to uint8, weights normalised then in fixed point (22 fraction
   bits). Pillow 13 runs the vertical pass first when the height shrinks by over twice as many
   pixels as the width, older Pillow the horizontal one: `cpp/image_io.hpp` follows manifest.json's
   `versions.pillow`. An OpenCV-style resize is not this: it differs by several levels.
3. Centre crop {w}x{h}: left = (new width - {w}) // 2, top = (new height - {h}) // 2.
4. Feed uint8 RGB, NHWC [1, {h}, {w}, 3], rows top to bottom.
"""


def recipe_toml(recipe: BuildRecipe, profile: TargetProfile) -> str:
    """The resolved recipe as far as this bundle goes: without what describes the build machine
    (OUT, the data and weights paths: manifest.json has their sha256; [compute]: it changes no
    result) and with this bundle's target alone, by name (manifest.json has the profile)."""
    import tomli_w

    d = recipe.to_toml_dict()
    for key in ("out", "compute"):
        d.pop(key, None)
    d["data"].pop("path", None)
    d["model"].pop("weights", None)
    d["targets"] = [profile.name]
    return ("# The resolved recipe this bundle was built with (defaults + file + flags), less the\n"
            "# build machine's paths and [compute]: data_sha256 and backbone.weights_sha256 in\n"
            "# manifest.json name the data and the weights.\n" + tomli_w.dumps(d))


def versions(backend) -> dict:
    """Versions of everything that made the bundle's model (the manifest's `versions`)."""
    import onnx
    import PIL
    import torch
    import torchvision

    v = {"edgetl": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
         "pillow": PIL.__version__}
    v.update(backend.versions())
    try:
        import nncf

        v["nncf"] = nncf.__version__
    except ImportError:
        pass
    return v


def readme(profile: TargetProfile, p, models: list, backend, c: dict) -> str:
    """The bundle's README: how to run it, its input contract and its parity table."""
    rows = "\n".join(
        f"| `{m.stem}` ({m.precision}) | {m.metrics.accuracy:.4f} | {m.metrics.accuracy_drop_pp:+.2f} | "
        f"{m.metrics.drop_upper95_pp:+.2f} | {published_status(True, m.certified)} | "
        f"{m.metrics.top1_agreement:.4f} | {m.sizes['model_bytes'] / 1e6:.2f} MB | {m.validated_with} |"
        for m in models)
    quant = next((m.quantization for m in models if m.quantization), None)
    qline = (f"INT8 quantizer: `{quant.chosen}`; layers kept in float: {len(quant.float_nodes)}.\n"
             if quant else "")
    cert = (f"NOT CERTIFIED: the model passed its gate, but the test split is too small to prove the drop "
            f"tolerance ({profile.tolerances.max_accuracy_drop_pp} pp): its 95 % upper bound is above it.\n\n"
            if any(m.certified is False for m in models) else "")
    return f"""# edgetl bundle: {profile.name}

{profile.description}

Backbone `{p.spec.name}` fine-tuned on {len(p.dataset.classes)} classes ({", ".join(p.dataset.classes)}).

## Run

    pip install {" ".join(backend.runtime_requires)}
    python predict.py IMAGE...           # label and probability per image
    python predict.py --json IMAGE...
    python predict.py --selftest         # golden inputs in golden/ must give the recorded outputs
    python predict.py --bench            # latency, throughput, cold-load time on this device
    python predict.py --model {models[-1].precision} IMAGE...   # another model of this bundle
    python predict.py --set KEY=VALUE    # override a setting of runtime.json "settings"

`runtime.json` holds the models, the default one and the runtime settings
(providers / device, performance hint); `--set` overrides them on the device.

{input_section(c, backend)}
## Parity (test split, n={models[0].metrics.n_test}; float model {models[0].metrics.reference_accuracy:.4f})

| model | top-1 accuracy | drop (pp) | drop 95 % upper bound (pp) | status | agreement | size | validated with |
|---|---|---|---|---|---|---|---|
{rows}

{qline}{cert}Validation ran on the build machine through the runtime named in the last column; where that
is not the provider/device this bundle prefers, the numbers are numerical checks of the same
model file, not measurements on the target hardware.

`manifest.json` lists every file's sha256; `edgetl verify DIR` checks them.
"""

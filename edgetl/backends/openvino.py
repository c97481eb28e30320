"""OpenVINO backend: the exported ONNX converted with openvino.convert_model, INT8 by NNCF (PTQ,
then accuracy control), IR files in the bundle, run by runtime/engine_openvino.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..errors import EdgetlError, UsageError, require
from ..profiles import TargetProfile
from . import QuantInputs, nncf_common, register, symmetric_int8_rows, weight_limit

WEIGHT_PATH_OPS = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
CONV_OPS = {"Convolution", "GroupConvolution"}
COMPUTE_OPS = CONV_OPS | {"MatMul"}


def _ov():
    return require("openvino", "openvino")


def _read_onnx(fp32: Artifact, path: Path | None = None):
    """The ONNX model (`path`, default the FP32 export) as an OpenVINO model, carrying edgetl's
    metadata (labels, contract) from the FP32 export in rt_info."""
    import onnx

    ov = _ov()
    model = ov.convert_model(str(path or fp32.path))
    for prop in onnx.load(str(fp32.path), load_external_data=False).metadata_props:
        model.set_rt_info(prop.value, ["edgetl", prop.key.removeprefix("edgetl.")])
    return model


_MADE_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*)_\d+$")  # "Constant_678008", "Reshape_15"; not "/0/conv"


def _canonical_names(model) -> None:
    """OpenVINO names the nodes it makes `<Type>_<n>` from a process-wide counter, so the same model
    made after other work (another target, another thread) would get other names and other IR bytes.
    Renamed by their place in the graph instead; names given by the model (inputs, layers) stay."""
    for i, op in enumerate(model.get_ordered_ops()):
        made = _MADE_NAME.match(op.get_friendly_name())
        if made:
            op.set_friendly_name(f"{made.group(1)}_{i}")


def _save(model, path: Path, kind: str, compress_to_fp16: bool = False, **meta) -> Artifact:
    ov = _ov()
    _canonical_names(model)
    ov.save_model(model, str(path), compress_to_fp16=compress_to_fp16)
    return Artifact.of(path, kind, companions=[str(path.with_suffix(".bin"))], **meta)


def nncf_ptq(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF post-training quantization of the OpenVINO model (preset/bias correction from the profile)."""
    model = nncf_common.ptq(_read_onnx(fp32), data, profile)
    model.set_rt_info("nncf_ptq", ["edgetl", "quantizer"])
    return _save(model, workdir / "nncf_ptq.int8.xml", "ir-int8", quantizer="nncf_ptq", precision="int8")


def mixed_precision(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF accuracy control: layers that cost agreement with the float model go back to float."""
    ov = _ov()
    core = ov.Core()

    def compile_fn(model):
        # NNCF's OpenVINO backend hands the metric an already compiled model.
        compiled = model if isinstance(model, ov.CompiledModel) else core.compile_model(model, "CPU", cpu_config())
        return lambda x: compiled(x)[0]

    model = nncf_common.accuracy_control(_read_onnx(fp32), data, profile, compile_fn)
    model.set_rt_info("mixed_precision", ["edgetl", "quantizer"])
    return _save(model, workdir / "mixed_precision.int8.xml", "ir-int8", quantizer="mixed_precision",
                 precision="int8")


mixed_precision.expensive = True  # minutes: the search runs it only where it can pay


def cpu_config() -> dict:
    """The CPU plugin's settings for the build's own runs: float ops in f32 (not bf16 on CPUs with
    AMX: the engine's default too, runtime/engine_openvino.py) and the CPUs this process may use."""
    from ..threads import engine

    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": engine()}


def float_nodes(model_path: Path, op_types=COMPUTE_OPS) -> list[str]:
    """Convolution/MatMul nodes whose weights reach them without INT8 (no FakeQuantize, no i8/u8
    constant on the weight path): NNCF left or put them back in float."""
    ops = _ov().Core().read_model(str(model_path)).get_ordered_ops()
    return [op.get_friendly_name() for op in ops if op.get_type_name() in op_types and not _weight_is_int8(op)]


def _head(model):
    """The classifier head: (MatMul, bias Add or None) feeding the model's output."""
    node = model.output(0).get_node().input_value(0).get_node()  # the Result's producer
    add = None
    if node.get_type_name() == "Add":
        add, node = node, next((v.get_node() for v in node.input_values()
                                if v.get_node().get_type_name() == "MatMul"), None)
    if node is None or node.get_type_name() != "MatMul":
        raise EdgetlError("no MatMul head found before the model's output; the head refit needs one")
    return node, add


def head_features(path: Path, device: str = "CPU"):
    """batch -> (features the head receives, logits), through OpenVINO."""
    ov = _ov()
    model = ov.Core().read_model(str(path))
    matmul, _ = _head(model)
    model.add_outputs([matmul.input_value(0)])
    compiled = ov.Core().compile_model(model, device, cpu_config() if device == "CPU" else {})
    feat, logits = compiled.output(len(compiled.outputs) - 1), compiled.output(0)

    def run(x):
        res = compiled(x)
        return res[feat], res[logits]

    return run


def with_head(art: Artifact, weight: np.ndarray, bias: np.ndarray, out: Path) -> Artifact:
    """The model with its head's weight (classes x features) and bias replaced: per-channel INT8
    (Constant i8 -> Convert -> Multiply by scale, as NNCF compresses weights) when the head was INT8,
    float otherwise."""
    ov = _ov()
    import openvino.opset13 as ops

    model = ov.Core().read_model(str(art.path))
    matmul, add = _head(model)
    transpose_b = bool(matmul.get_attributes().get("transpose_b"))
    w = weight if transpose_b else weight.T
    quantized = _weight_is_int8(matmul)
    if quantized:
        const = _int8_weight_constant(matmul)  # None: weights behind a FakeQuantize (8-bit grid)
        limit = 127 if const is None else weight_limit(const.get_data())
        q, scale = symmetric_int8_rows(weight.astype(np.float64), limit=limit)
        q, shape = (q, (-1, 1)) if transpose_b else (q.T, (1, -1))
        new_w = ops.multiply(ops.convert(ops.constant(np.ascontiguousarray(q)), ov.Type.f32),
                             ops.constant(scale.reshape(shape)))
    else:
        new_w = ops.constant(np.ascontiguousarray(w, dtype=np.float32))
    matmul.input(1).replace_source_output(new_w.output(0))
    if add is None:
        raise EdgetlError(f"{art.path}: the head has no bias Add; the head refit cannot rewrite it")
    k = next(i for i, v in enumerate(add.input_values()) if v.get_node() is not matmul)
    old = add.input_value(k)
    new_b = ops.constant(bias.astype(np.float32).reshape(tuple(old.get_partial_shape().to_shape())))
    add.input(k).replace_source_output(new_b.output(0))
    model.set_rt_info("head_refit", ["edgetl", "refiner"])
    return _save(model, out, art.kind, **{k: v for k, v in art.meta.items() if k != "companions"})


def with_raw_input(art: Artifact, contract: dict, out: Path) -> Artifact:
    """The IR with uint8 NHWC pixels in: the first convolution reads them (INT8, normalisation folded),
    or OpenVINO's PrePostProcessor converts them (openvino_pixels.py)."""
    from .openvino_pixels import with_raw_input as pixels_in

    return pixels_in(art, contract, out, _ov(), _save)


def _weight_path(op):
    """The nodes on a Convolution/MatMul's weight input, through the ops that only convert or reshape."""
    stack = [op.input_value(1).get_node()]
    while stack:
        node = stack.pop()
        yield node
        if node.get_type_name() in WEIGHT_PATH_OPS:
            stack.extend(v.get_node() for v in node.input_values())


def _weight_is_int8(op) -> bool:
    """Whether a Convolution/MatMul's weights reach it through INT8 (FakeQuantize or an i8/u8 constant)."""
    ov = _ov()
    int8 = (ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4)
    return any(n.get_type_name() == "FakeQuantize" or (n.get_type_name() == "Constant" and n.get_element_type() in int8)
               for n in _weight_path(op))


def _int8_weight_constant(op):
    """The i8 constant on a Convolution/MatMul's weight path, or None."""
    ov = _ov()
    return next((n for n in _weight_path(op) if n.get_type_name() == "Constant" and n.get_element_type() == ov.Type.i8),
                None)


class OpenVinoBackend:
    name = "openvino"
    engine = "openvino"
    quantizers = {"nncf_ptq": nncf_ptq, "mixed_precision": mixed_precision}
    requires = {"*": ("openvino", "openvino"), "nncf_ptq": ("nncf", "nncf"), "mixed_precision": ("nncf", "nncf")}
    runtime_requires = ["numpy", "pillow", "openvino"]
    cpp = "openvino"  # runtime/cpp/<cpp>/: the C++ consumer a bundle of pixel-input models carries

    def check(self, profile: TargetProfile) -> None:
        """OpenVINO properties in runtime.config must be ones the CPU plugin knows (else every device fails)."""
        if not profile.runtime.config or profile.runtime.device != "CPU":
            return  # other plugins have other properties; those are checked on the device
        known = set(_ov().Core().get_property("CPU", "SUPPORTED_PROPERTIES"))
        bad = [k for k in profile.runtime.config if k not in known]
        if bad:
            raise UsageError(f"{profile.source}: runtime.config {bad} unknown to OpenVINO; fix: use properties "
                             f"such as INFERENCE_NUM_THREADS, NUM_STREAMS, ENABLE_CPU_PINNING")

    def convert(self, fp32: Artifact, precision: str, profile: TargetProfile, workdir: Path) -> Artifact:
        """FP32 IR, or FP16-compressed weights (half the size; for Intel GPUs) when precision is fp16."""
        return _save(_read_onnx(fp32), workdir / f"model.{precision}.xml", f"ir-{precision}",
                     compress_to_fp16=precision == "fp16", precision=precision)

    def model_files(self, artifact: Artifact, stem: str) -> dict[str, Path]:
        return {f"{stem}.xml": artifact.path, f"{stem}.bin": artifact.path.with_suffix(".bin")}

    def settings(self, profile: TargetProfile, validating: bool = False) -> dict:
        rt = profile.runtime
        out = {"device": rt.device, "performance_hint": rt.performance_hint, "static_batch": rt.static_batch}
        if rt.config:
            out["config"] = json.loads(json.dumps(rt.config))
        if validating and rt.device != "AUTO" and rt.device not in _ov().Core().available_devices:
            # Validated where the build runs (the manifest records what ran), without the target
            # device's own properties: they belong to its plugin, not to the CPU's.
            out["device"] = "CPU"
            out.pop("config", None)
        return out

    def model_settings(self, profile: TargetProfile, precision: str) -> dict:
        return {}  # every IR of the bundle runs with the bundle's settings

    def limit_threads(self, settings: dict, threads: int, spinning: bool = True) -> dict:
        # TBB's idle workers do not spin for long: no setting to pass for `spinning`
        if settings.get("device", "CPU") != "CPU":
            return settings  # a property of the CPU plugin; other plugins refuse it
        return {**settings, "config": {**settings.get("config", {}), "INFERENCE_NUM_THREADS": threads}}

    def versions(self) -> dict[str, str]:
        return {"openvino": _ov().__version__}

    def float_nodes(self, artifact: Artifact, convolutions_only: bool = False) -> list[str]:
        return float_nodes(artifact.path, CONV_OPS if convolutions_only else COMPUTE_OPS)

    def head_features(self, artifact: Artifact, profile: TargetProfile):
        return head_features(artifact.path, self.settings(profile, validating=True)["device"])

    def from_qdq_onnx(self, qdq: Path, fp32: Artifact, profile: TargetProfile, workdir: Path, name: str) -> Artifact:
        """An INT8 QDQ ONNX made elsewhere (QAT) as an IR: Q/DQ pairs become FakeQuantize."""
        model = _read_onnx(fp32, qdq)
        model.set_rt_info(name, ["edgetl", "quantizer"])
        return _save(model, workdir / f"{name}.int8.xml", "ir-int8", quantizer=name, precision="int8")

    def with_head(self, artifact: Artifact, weight, bias, workdir: Path, stem: str) -> Artifact:
        return with_head(artifact, weight, bias, workdir / f"{stem}.int8.xml")

    def with_raw_input(self, artifact: Artifact, contract: dict, workdir: Path, stem: str) -> Artifact:
        return with_raw_input(artifact, contract, workdir / f"{stem}.pixels.xml")


register("openvino")(OpenVinoBackend)

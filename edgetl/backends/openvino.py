"""OpenVINO backend: the exported ONNX converted with openvino.convert_model, INT8 by NNCF (PTQ,
then accuracy control), IR files in the bundle, run by runtime/engine_openvino.py."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifact import Artifact
from ..errors import UsageError, require
from ..profiles import TargetProfile
from . import QuantInputs, _nncf, register

WEIGHT_PATH_OPS = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
COMPUTE_OPS = {"Convolution", "GroupConvolution", "MatMul"}


def _ov():
    return require("openvino", "openvino")


def _read_onnx(fp32: Artifact):
    """The ONNX model as an OpenVINO model, carrying edgetl's metadata (labels, contract) in rt_info."""
    import onnx

    ov = _ov()
    model = ov.convert_model(str(fp32.path))
    for prop in onnx.load(str(fp32.path), load_external_data=False).metadata_props:
        model.set_rt_info(prop.value, ["edgetl", prop.key.removeprefix("edgetl.")])
    return model


def _save(model, path: Path, kind: str, compress_to_fp16: bool = False, **meta) -> Artifact:
    ov = _ov()
    ov.save_model(model, str(path), compress_to_fp16=compress_to_fp16)
    return Artifact.of(path, kind, companions=[str(path.with_suffix(".bin"))], **meta)


def nncf_ptq(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF post-training quantization of the OpenVINO model (preset/bias correction from the profile)."""
    model = _nncf.ptq(_read_onnx(fp32), data, profile)
    model.set_rt_info("nncf_ptq", ["edgetl", "quantizer"])
    return _save(model, workdir / "nncf_ptq.int8.xml", "ir-int8", quantizer="nncf_ptq", precision="int8")


def mixed_precision(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF accuracy control: layers that cost agreement with the float model go back to float."""
    ov = _ov()
    core = ov.Core()

    def compile_fn(model):
        # NNCF's OpenVINO backend hands the metric an already compiled model.
        compiled = model if isinstance(model, ov.CompiledModel) else core.compile_model(model, "CPU")
        return lambda x: compiled(x)[0]

    model = _nncf.accuracy_control(_read_onnx(fp32), data, profile, compile_fn)
    model.set_rt_info("mixed_precision", ["edgetl", "quantizer"])
    return _save(model, workdir / "mixed_precision.int8.xml", "ir-int8", quantizer="mixed_precision",
                 precision="int8")


def float_nodes(model_path: Path) -> list[str]:
    """Convolution/MatMul nodes whose weights reach them without INT8 (no FakeQuantize, no i8/u8
    constant on the weight path): NNCF left or put them back in float."""
    ov = _ov()
    core, int8 = ov.Core(), (ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4)
    out = []
    for op in core.read_model(str(model_path)).get_ordered_ops():
        if op.get_type_name() not in COMPUTE_OPS:
            continue
        stack, quantized = [op.input_value(1).get_node()], False
        while stack and not quantized:
            node = stack.pop()
            kind = node.get_type_name()
            if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type() in int8):
                quantized = True
            elif kind in WEIGHT_PATH_OPS:
                stack.extend(v.get_node() for v in node.input_values())
        if not quantized:
            out.append(op.get_friendly_name())
    return out


class OpenVinoBackend:
    name = "openvino"
    engine = "openvino"
    quantizers = {"nncf_ptq": nncf_ptq, "mixed_precision": mixed_precision}
    requires = {"*": ("openvino", "openvino"), "nncf_ptq": ("nncf", "nncf"), "mixed_precision": ("nncf", "nncf")}
    runtime_requires = ["numpy", "pillow", "openvino"]

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

    def versions(self) -> dict[str, str]:
        return {"openvino": _ov().__version__}

    def float_nodes(self, artifact: Artifact) -> list[str]:
        return float_nodes(artifact.path)


register("openvino")(OpenVinoBackend)

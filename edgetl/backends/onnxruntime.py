"""onnxruntime backend: static INT8 QDQ quantization (ORT or NNCF) and the bundle runtime."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..errors import EdgetlError, UsageError
from ..export import INPUT, drop_unused_initializers
from ..profiles import TargetProfile
from ..threads import ort_options
from . import QuantInputs, nncf_common, register, symmetric_int8_rows, weight_limit

log = logging.getLogger(__name__)
# onnxruntime's calibrator exposes every tensor as a model output, so its memory grows with the
# batch (MobileNetV2 at 224 px: ~1.8 GB peak at 16 images, ~0.6 GB at 4); same ranges either way.
CALIB_BATCH = 4


def _finish(out: Path, fp32: Artifact, quantizer: str, profile: TargetProfile | None = None) -> Artifact:
    """Carry the FP32 model's metadata (labels, preprocessing contract) into the quantized model."""
    import onnx

    from ..export import set_metadata

    src = onnx.load(str(fp32.path), load_external_data=False)
    model = onnx.load(str(out))
    q = profile.quantization if profile else None
    if q and q.activation_type == "uint8":
        _unsigned_activations(model)
    elif q and q.symmetric_activations:
        _signed_activations(model)
    elif q:  # int8 with zero points (S8S8, ARM): every activation signed
        _signed_shifted_activations(model)
    set_metadata(model, {p.key: p.value for p in src.metadata_props})
    set_metadata(model, {"edgetl.quantizer": quantizer})
    onnx.save(model, str(out))
    return Artifact.of(out, "onnx-int8", quantizer=quantizer, precision="int8")


def _reencode_activations(model, source_type: int, target_type: int, convert) -> int:
    """Rewrite activation Q/DQ pairs: every QuantizeLinear whose zero point has `source_type` gets
    `convert(zero_point, scale)` -> (zero_point, scale) of `target_type`, or None to leave it; its
    outputs are retyped. DequantizeLinear nodes share the initializers, so they follow. Weights
    (stored pre-quantized, no QuantizeLinear) are never touched. Returns the zero points rewritten."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, bool] = {}  # zero-point initializer -> rewritten (initializers may be shared)
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        zp, scale = inits.get(node.input[2]), inits.get(node.input[1])
        if zp is None or scale is None:
            continue
        if zp.name not in done:
            new = convert(numpy_helper.to_array(zp), numpy_helper.to_array(scale)) \
                if zp.data_type == source_type else None
            if new is not None:
                zp.CopyFrom(numpy_helper.from_array(new[0], zp.name))
                scale.CopyFrom(numpy_helper.from_array(new[1], scale.name))
            done[zp.name] = new is not None
        if done[zp.name]:
            for vi in model.graph.value_info:
                if vi.name in node.output:
                    vi.type.tensor_type.elem_type = target_type
    return sum(done.values())


def _unsigned_activations(model) -> int:
    """Re-encode signed INT8 activation Q/DQ pairs as UINT8 (zero point + 128): the same grid, exactly.

    NNCF quantizes tensors that can go negative to int8 and the rest to uint8. onnxruntime's CPU
    kernels fuse DQ -> Conv -> Q into QLinearConv only when input and output share one type, so a
    mixed model runs its convolutions in float between Q/DQ pairs (measured 3x *slower* than FP32
    for MobileNetV2). Weights stay int8 (U8S8)."""
    import onnx

    return _reencode_activations(model, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                                 lambda zp, scale: ((zp.astype(np.int16) + 128).astype(np.uint8), scale))


def _signed_shifted_activations(model) -> int:
    """Re-encode UINT8 activation Q/DQ pairs as INT8 (zero point - 128): the same grid, exactly. For
    S8S8 (activation_type int8, asymmetric): NNCF leaves non-negative tensors UINT8, and a model of mixed
    activation types runs its convolutions unfused (see _unsigned_activations)."""
    import onnx

    return _reencode_activations(model, onnx.TensorProto.UINT8, onnx.TensorProto.INT8,
                                 lambda zp, scale: ((zp.astype(np.int16) - 128).astype(np.int8), scale))


def _signed_activations(model) -> int:
    """Make every activation Q/DQ signed INT8 with zero point 0 (TensorRT's explicit quantization
    takes nothing else). NNCF's symmetric scheme gives non-negative tensors (after ReLU) UINT8 with
    zero point 0; the INT8 grid covering the same range needs scale x 255/127 (one bit coarser) —
    the gate then judges the model as converted. Asymmetric zero points are left alone."""
    import onnx

    return _reencode_activations(
        model, onnx.TensorProto.UINT8, onnx.TensorProto.INT8,
        lambda zp, scale: None if zp.any() else (np.zeros(zp.shape, np.int8), scale * np.float32(255 / 127)))


def _batches(x: np.ndarray, size: int = CALIB_BATCH):
    return [x[i:i + size] for i in range(0, len(x), size)]


def ort_static(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """onnxruntime quantize_static: QDQ, per-channel weights (from the profile), calibrated on train images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q = profile.quantization
    batches = _batches(data.calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {INPUT: b}

    prepped = workdir / "ort_static.prep.onnx"
    quant_pre_process(str(fp32.path), str(prepped), skip_symbolic_shape=True)
    out = workdir / "ort_static.int8.onnx"
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_static(
        str(prepped), str(out), Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=q.per_channel,
        reduce_range=q.overflow_fix == "enable",  # 7-bit weights (profiles.py: overflow_fix)
        activation_type=qtype[q.activation_type],
        weight_type=qtype[q.weight_type],
        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[q.calibrate_method],
        nodes_to_exclude=_nodes_of_types(prepped, q.float_op_types),
        extra_options={"ActivationSymmetric": q.symmetric_activations, "WeightSymmetric": True,
                       "QuantizeBias": q.quantize_bias},
    )
    prepped.unlink(missing_ok=True)
    return _finish(out, fp32, "ort_static")


def _nodes_of_types(model_path: Path, op_types: list[str]) -> list[str]:
    import onnx

    if not op_types:
        return []
    return [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.op_type in op_types]


def nncf_ptq(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF post-training quantization (bias correction from the profile; per-channel weights)."""
    import onnx

    model = nncf_common.ptq(onnx.load(str(fp32.path)), data, profile)
    out = workdir / "nncf_ptq.int8.onnx"
    onnx.save(model, str(out))
    return _finish(out, fp32, "nncf_ptq", profile)


def mixed_precision(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF accuracy control on the validation split (see nncf_common.accuracy_control)."""
    import onnx
    import onnxruntime as ort

    def compile_fn(model):
        if profile.quantization.symmetric_activations and profile.quantization.activation_type == "int8":
            model = onnx.ModelProto.FromString(model.SerializeToString())
            _signed_activations(model)  # judge what will ship (see _finish)
        sess = ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {INPUT: x})[0]

    model = nncf_common.accuracy_control(onnx.load(str(fp32.path)), data, profile, compile_fn)
    out = workdir / "mixed_precision.int8.onnx"
    onnx.save(model, str(out))
    return _finish(out, fp32, "mixed_precision", profile)


mixed_precision.expensive = True  # minutes (NNCF accuracy control): the search runs it only where it can pay


def float_nodes(model_path: Path, op_types=("Conv", "Gemm", "MatMul")) -> list[str]:
    """Conv/Gemm/MatMul nodes whose weights are not fed by DequantizeLinear: they run in float."""
    import onnx

    g = onnx.load(str(model_path)).graph
    dq_outputs = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name or n.output[0] for n in g.node
            if n.op_type in op_types and len(n.input) > 1 and n.input[1] not in dq_outputs]


def _head(graph):
    """The classifier head: the Gemm whose output reaches the graph output (through Q/DQ pairs)."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Gemm":
        raise EdgetlError(f"no Gemm head found before the output '{graph.output[0].name}' (found "
                          f"{node.op_type if node is not None else 'nothing'}); the head refit needs one")
    return node, producer


def _unquantized_output(graph, gemm) -> None:
    """Drop a Q -> DQ pair between the head and the graph output (onnxruntime's quantizer adds one):
    its range was calibrated for the old head, and a grid on the logits buys no speed."""
    names = {n.output[0]: n for n in graph.node}
    out = graph.output[0].name
    dq = names.get(out)
    if dq is None or dq.op_type != "DequantizeLinear":
        return
    q = names.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] != gemm.output[0]:
        return
    graph.node.remove(dq)
    graph.node.remove(q)
    gemm.output[0] = out
    drop_unused_initializers(graph, among={*q.input[1:], *dq.input[1:]})


def head_features(path: Path):
    """batch -> (features the head receives, logits), through onnxruntime's CPU provider."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    gemm, _ = _head(model.graph)
    model.graph.output.append(onnx.helper.make_tensor_value_info(gemm.input[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
    names = [model.graph.output[-1].name, model.graph.output[0].name]
    return lambda x: tuple(sess.run(names, {INPUT: x}))


def with_head(art: Artifact, weight: np.ndarray, bias: np.ndarray, out: Path) -> Artifact:
    """A copy of the model with the head's weight (classes x features) and bias replaced, stored the
    way the head was: float initializers, or per-channel INT8 weights (and an INT32 bias, as
    onnxruntime's quantizer stores it) behind DequantizeLinear."""
    import onnx
    from onnx import numpy_helper as nh

    model = onnx.load(str(art.path))
    g = model.graph
    gemm, producer = _head(g)
    inits = {i.name: i for i in g.initializer}
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)

    def put(name: str, arr: np.ndarray) -> None:
        inits[name].CopyFrom(nh.from_array(arr, name))

    w_dq = producer.get(gemm.input[1])
    if gemm.input[1] in inits:
        put(gemm.input[1], (weight if trans_b else weight.T).astype(np.float32))
        w_scale = None
    elif w_dq is not None and w_dq.op_type == "DequantizeLinear" and w_dq.input[0] in inits:
        if inits[w_dq.input[0]].data_type != onnx.TensorProto.INT8:
            raise EdgetlError(f"{art.path}: head weights are not signed INT8; the head refit cannot rewrite them")
        per_tensor = nh.to_array(inits[w_dq.input[1]]).size == 1
        q, w_scale = symmetric_int8_rows(weight.astype(np.float64), per_tensor,
                                         weight_limit(nh.to_array(inits[w_dq.input[0]])))
        old_shape = tuple(inits[w_dq.input[1]].dims)
        put(w_dq.input[0], q if trans_b else q.T)
        put(w_dq.input[1], w_scale.reshape(old_shape) if per_tensor else w_scale)
        if len(w_dq.input) > 2 and w_dq.input[2]:
            put(w_dq.input[2], np.zeros(old_shape if per_tensor else w_scale.shape, np.int8))
    else:
        raise EdgetlError(f"{art.path}: head weights are neither float nor INT8 behind DequantizeLinear")
    b_dq = producer.get(gemm.input[2]) if len(gemm.input) > 2 else None
    if len(gemm.input) > 2 and gemm.input[2] in inits:
        put(gemm.input[2], bias.astype(np.float32))
    elif b_dq is not None and b_dq.op_type == "DequantizeLinear" and w_scale is not None:
        x_dq = producer.get(gemm.input[0])
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            raise EdgetlError(f"{art.path}: INT32 head bias without a quantized head input")
        b_shape = tuple(inits[b_dq.input[1]].dims)
        b_scale = (float(nh.to_array(inits[x_dq.input[1]])) * w_scale).astype(np.float32)
        info = np.iinfo(np.int32)
        put(b_dq.input[0], np.clip(np.round(bias / b_scale), info.min, info.max).astype(np.int32))
        put(b_dq.input[1], b_scale.reshape(b_shape) if b_scale.size == 1 else b_scale)
        if len(b_dq.input) > 2 and b_dq.input[2]:
            put(b_dq.input[2], np.zeros(b_shape if b_scale.size == 1 else b_scale.shape, np.int32))
    else:
        raise EdgetlError(f"{art.path}: the head has no bias the head refit can rewrite")
    _unquantized_output(g, gemm)
    from ..export import set_metadata

    set_metadata(model, {"edgetl.refiner": "head_refit"})
    onnx.save(model, str(out))
    return Artifact.of(out, art.kind, **{**art.meta, "precision": art.meta.get("precision", "int8")})


def to_fp16(fp32: Artifact, workdir: Path) -> Artifact:
    """FP16 weights and compute with float32 inputs/outputs (Cast at the edges), for GPU providers."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32.path)), keep_io_types=True)
    out = workdir / "model.fp16.onnx"
    onnx.save(model, str(out))
    return Artifact.of(out, "onnx-fp16", precision="fp16")


class OnnxRuntimeBackend:
    name = "onnxruntime"
    engine = "ort"
    quantizers = {"ort_static": ort_static, "nncf_ptq": nncf_ptq, "mixed_precision": mixed_precision}
    # optional module (and the extra that installs it) each quantizer needs, checked before a build starts
    requires = {"nncf_ptq": ("nncf", "nncf"), "mixed_precision": ("nncf", "nncf")}
    runtime_requires = ["numpy", "pillow", "onnxruntime"]
    cpp = "ort"  # runtime/cpp/<cpp>/: the C++ consumer a bundle of pixel-input models carries

    def check(self, profile: TargetProfile) -> None:
        """Provider names must be ones onnxruntime knows (a typo would silently fall back to CPU)."""
        import onnxruntime as ort

        known = set(ort.get_all_providers())
        for key in ("providers", "validate_providers"):
            bad = [p for p in getattr(profile, key) or [] if p not in known]
            if bad:
                raise UsageError(f"{profile.source}: {key} {bad} unknown to onnxruntime; fix: use names such as "
                                 "TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider")
        bad = [p for p in profile.runtime.provider_options if p not in profile.providers]
        if bad:
            raise UsageError(f"{profile.source}: runtime.provider_options for {bad}, which providers does not list; "
                             "fix: add them to providers or remove their options")

    def convert(self, fp32: Artifact, precision: str, profile: TargetProfile, workdir: Path) -> Artifact:
        return to_fp16(fp32, workdir) if precision == "fp16" else fp32

    def model_files(self, artifact: Artifact, stem: str) -> dict[str, Path]:
        return {f"{stem}.onnx": artifact.path}

    def settings(self, profile: TargetProfile, validating: bool = False) -> dict:
        rt = profile.runtime
        if validating:  # the build checks numbers with what exists here, and says so in the manifest
            return {"providers": profile.validate_providers or profile.providers}
        out = {"providers": profile.providers, "strict_providers": rt.strict_providers}
        if rt.provider_options:
            out["provider_options"] = rt.provider_options
        return out

    def model_settings(self, profile: TargetProfile, precision: str) -> dict:
        """Settings one model of the bundle needs beside the bundle's: TensorRT's INT8 mode only for
        the INT8 (QDQ) model — on a float model it would ask for a calibration table it has not got."""
        options = profile.runtime.provider_options
        trt = options.get("TensorrtExecutionProvider", {})
        if precision == "int8" or not trt.get("trt_int8_enable"):
            return {}
        return {"provider_options": {**options, "TensorrtExecutionProvider": {**trt, "trt_int8_enable": False}}}

    def limit_threads(self, settings: dict, threads: int, spinning: bool = True) -> dict:
        return {**settings, "threads": threads, **({} if spinning else {"spinning": False})}

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def float_nodes(self, artifact: Artifact, convolutions_only: bool = False) -> list[str]:
        return float_nodes(artifact.path, ("Conv",) if convolutions_only else ("Conv", "Gemm", "MatMul"))

    def head_features(self, artifact: Artifact, profile: TargetProfile):
        return head_features(artifact.path)

    def from_qdq_onnx(self, qdq: Path, fp32: Artifact, profile: TargetProfile, workdir: Path, name: str) -> Artifact:
        """An INT8 QDQ ONNX made elsewhere (QAT): re-encoded like the PTQ output so every Conv fuses."""
        import shutil

        out = workdir / f"{name}.int8.onnx"
        shutil.copyfile(qdq, out)
        return _finish(out, fp32, name, profile)

    def with_raw_input(self, artifact: Artifact, contract: dict, workdir: Path, stem: str) -> Artifact:
        from ..model_input import onnx_with_raw_input

        return onnx_with_raw_input(artifact, contract, workdir / f"{stem}.pixels.onnx")

    def with_head(self, artifact: Artifact, weight, bias, workdir: Path, stem: str) -> Artifact:
        return with_head(artifact, weight, bias, workdir / f"{stem}.int8.onnx")


register("onnxruntime")(OnnxRuntimeBackend)

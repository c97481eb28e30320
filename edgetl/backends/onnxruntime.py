"""onnxruntime backend: static INT8 QDQ quantization (ORT or NNCF) and the bundle runtime."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..errors import require
from ..export import INPUT
from ..profiles import TargetProfile
from ..runtime.ort_predict import Predictor
from . import QuantInputs, register

log = logging.getLogger(__name__)
# onnxruntime's calibrator exposes every tensor as a model output, so its memory grows with the
# batch (MobileNetV2 at 224 px: ~1.8 GB peak at 16 images, ~0.6 GB at 4); same ranges either way.
CALIB_BATCH = 4
RANKING_SUBSET = 64
MAX_RESTORE_STEPS = 12


def _finish(out: Path, fp32: Artifact, quantizer: str) -> Artifact:
    """Carry the FP32 model's metadata (labels, preprocessing contract) into the quantized model."""
    import onnx

    from ..export import set_metadata

    src = onnx.load(str(fp32.path), load_external_data=False)
    model = onnx.load(str(out))
    set_metadata(model, {p.key: p.value for p in src.metadata_props})
    set_metadata(model, {"edgetl.quantizer": quantizer})
    onnx.save(model, str(out))
    return Artifact.of(out, "onnx-int8", quantizer=quantizer)


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
        activation_type=qtype[q.activation_type],
        weight_type=qtype[q.weight_type],
        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[q.calibrate_method],
        extra_options={"ActivationSymmetric": q.symmetric_activations, "WeightSymmetric": True},
    )
    prepped.unlink(missing_ok=True)
    return _finish(out, fp32, "ort_static")


def _import_nncf():
    """NNCF logs and draws progress bars on stdout; edgetl keeps stdout for results (--json)."""
    nncf = require("nncf", "nncf")
    nncf_log = logging.getLogger("nncf")
    for handler in nncf_log.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    if not log.isEnabledFor(logging.INFO):
        nncf.set_log_level(logging.WARNING)
    return nncf


def _nncf_args(data: QuantInputs, profile: TargetProfile):
    nncf = _import_nncf()
    calib = nncf.Dataset(_batches(data.calibration, 1), lambda b: {INPUT: b})  # NNCF statistics want batch 1
    preset = nncf.QuantizationPreset.PERFORMANCE if profile.quantization.symmetric_activations \
        else nncf.QuantizationPreset.MIXED
    return nncf, calib, dict(preset=preset, subset_size=len(data.calibration), fast_bias_correction=False)


def nncf_ptq(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF post-training quantization with full bias correction (per-channel weights)."""
    import onnx

    nncf, calib, kw = _nncf_args(data, profile)
    with contextlib.redirect_stdout(sys.stderr):
        model = nncf.quantize(onnx.load(str(fp32.path)), calib, **kw)
    out = workdir / "nncf_ptq.int8.onnx"
    onnx.save(model, str(out))
    return _finish(out, fp32, "nncf_ptq")


def mixed_precision(fp32: Artifact, data: QuantInputs, profile: TargetProfile, workdir: Path) -> Artifact:
    """NNCF accuracy control on the validation split: reverts the most harmful layers to float.

    The metric NNCF restores is top-1 *agreement with the float model* (per image: same class or
    not), with max drop 1 - target_agreement: it targets exactly what the search asks for, and it
    still sees damage when the INT8 model's accuracy happens to hold (errors that cancel out).
    """
    import onnx
    import onnxruntime as ort

    nncf, calib, kw = _nncf_args(data, profile)
    float_top1 = data.val_reference_logits.argmax(1).tolist()
    pairs = list(zip(_batches(data.val_x, 1), float_top1, strict=True))
    val = nncf.Dataset(pairs, lambda item: {INPUT: item[0]})

    cache: dict = {}

    def validate(model: onnx.ModelProto, items) -> tuple[float, list[float]]:
        # NNCF's ranking calls this once per image with the same model: build its session once.
        if cache.get("model") is not model:
            cache.update(model=model, sess=ort.InferenceSession(model.SerializeToString(),
                                                                providers=["CPUExecutionProvider"]))
        sess = cache["sess"]
        same = [float(sess.run(None, {INPUT: x})[0].argmax() == k) for x, k in items]
        return float(np.mean(same)) if same else 0.0, same

    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    # Ranking layers by sensitivity is the slow part: rank on a subset of the validation split.
    # NNCF re-ranks every remaining layer after each step that does not help; bound the steps.
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=min(len(pairs), RANKING_SUBSET),
                                                  max_num_iterations=MAX_RESTORE_STEPS)
    with contextlib.redirect_stdout(sys.stderr):
        model = nncf.quantize_with_accuracy_control(
            onnx.load(str(fp32.path)), calib, val, validate, max_drop=max(0.0, 1.0 - data.target_agreement),
            drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer, **kw)
    out = workdir / "mixed_precision.int8.onnx"
    onnx.save(model, str(out))
    return _finish(out, fp32, "mixed_precision")


def float_nodes(model_path: Path) -> list[str]:
    """Conv/Gemm/MatMul nodes whose weights are not fed by DequantizeLinear: they run in float."""
    import onnx

    g = onnx.load(str(model_path)).graph
    dq_outputs = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name or n.output[0] for n in g.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] not in dq_outputs]


class OnnxRuntimeBackend:
    name = "onnxruntime"
    quantizers = {"ort_static": ort_static, "nncf_ptq": nncf_ptq, "mixed_precision": mixed_precision}
    # optional module (and the extra that installs it) each quantizer needs, checked before a build starts
    requires = {"nncf_ptq": ("nncf", "nncf"), "mixed_precision": ("nncf", "nncf")}
    runtime_module = "ort_predict.py"

    def runner(self, model: Path, contract: dict, labels: list[str], profile: TargetProfile) -> Predictor:
        return Predictor(model, contract, labels, providers=profile.providers)

    def bundle_files(self, artifact: Artifact) -> dict[str, Path]:
        """Bundle-relative name -> source file, for the model and this backend's runtime."""
        from importlib.resources import files

        runtime = files("edgetl").joinpath("runtime")
        return {"model.onnx": artifact.path,
                "predict.py": Path(str(runtime.joinpath(self.runtime_module))),
                "preprocess.py": Path(str(runtime.joinpath("preprocess.py")))}

    def runtime_config(self, profile: TargetProfile) -> dict:
        return {"backend": self.name, "model": "model.onnx", "providers": profile.providers,
                "requires": ["numpy", "pillow", "onnxruntime"]}

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def float_nodes(self, artifact: Artifact) -> list[str]:
        return float_nodes(artifact.path)


register("onnxruntime")(OnnxRuntimeBackend)

"""OpenVINO engine for bundle runtimes (copied into openvino bundles). numpy + openvino only.

Settings (runtime.json "settings", overridable with `predict.py --set KEY=VALUE`):
  device             CPU, GPU, NPU or AUTO (OpenVINO device name)
  performance_hint   LATENCY, THROUGHPUT or CUMULATIVE_THROUGHPUT
  config             extra OpenVINO properties, e.g. {"INFERENCE_NUM_THREADS": 2}; on the CPU,
                     INFERENCE_PRECISION_HINT is "f32" unless config sets it: the CPU plugin would
                     otherwise run a model's float ops in bf16 on CPUs with AMX / AVX512-BF16, and
                     the same model would compute other numbers there than where the gate judged it
  static_batch       true: compile one static-shape model per batch size seen (faster on CPU;
                     measured ~10 % at batch 1 for MobileNetV2); false: one dynamic-batch model
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MAX_COMPILED = 4  # static-shape models kept compiled (one per batch size)


class Engine:
    def __init__(self, model_path, settings: dict):
        import openvino as ov

        self._ov = ov
        self.core = ov.Core()
        self.model = self.core.read_model(str(model_path))
        self.device = str(settings.get("device", "CPU"))
        self.config = {"PERFORMANCE_HINT": str(settings.get("performance_hint", "LATENCY")),
                       **settings.get("config", {})}
        if self.device == "CPU":
            self.config.setdefault("INFERENCE_PRECISION_HINT", "f32")
        self.static = _flag(settings.get("static_batch", True))
        self._requests: OrderedDict = OrderedDict()
        self._devices: list[str] = []
        self._precision = ""  # the float precision the compiled model runs (INFERENCE_PRECISION_HINT)

    @property
    def executed_by(self) -> str:
        """e.g. 'OpenVINO CPU (f32)': the device and the precision of the model's float ops."""
        ran = f"OpenVINO {','.join(self._devices) or self.device}"
        return f"{ran} ({self._precision})" if self._precision else ran

    def _request(self, n: int):
        key = n if self.static else None
        if key not in self._requests:
            model = self.model
            if self.static:
                model = self.model.clone()
                shape = list(model.input(0).get_partial_shape())
                model.reshape({0: self._ov.PartialShape([n, *shape[1:]])})
            compiled = self.core.compile_model(model, self.device, self.config)
            try:
                self._devices = list(compiled.get_property("EXECUTION_DEVICES"))
            except RuntimeError:  # pragma: no cover (older plugins)
                self._devices = [self.device]
            try:
                self._precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            except (RuntimeError, AttributeError):  # a plugin without the property (or AUTO's)
                self._precision = ""
            self._requests[key] = compiled.create_infer_request()
            while len(self._requests) > MAX_COMPILED:
                self._requests.popitem(last=False)
        self._requests.move_to_end(key)
        return self._requests[key]

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = self._request(len(batch))
        request.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))  # no copy of the input
        request.infer()
        return request.get_output_tensor().data.copy()


def _flag(value) -> bool:
    """A setting that may arrive as a string from `predict.py --set key=value`."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)

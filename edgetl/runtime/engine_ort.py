"""onnxruntime engine for bundle runtimes (copied into onnxruntime bundles). numpy + onnxruntime only.

Settings (runtime.json "settings", overridable with `predict.py --set KEY=VALUE`):
  providers          execution providers in order of preference; the missing ones are skipped
  provider_options   {provider: {option: value}}; a relative trt_engine_cache_path is put under
                     ~/.cache/edgetl-trt (a bundle folder stays read-only and verifiable)
  strict_providers   true: fail instead of falling back when the first provider is missing or does
                     not load (checked on the session made, not on what the wheel was built with)
  threads            intra-op threads (0: onnxruntime's default: the machine's physical cores)
  spinning           false: idle pool threads sleep at once instead of spinning (a machine shared
                     with other work; onnxruntime's default, true, is the lower latency alone)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

_REDIRECT = threading.Lock()


class Engine:
    def __init__(self, model_path, settings: dict):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if settings.get("threads"):
            opts.intra_op_num_threads = int(settings["threads"])
        if not _flag(settings.get("spinning", True)):
            for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
                opts.add_session_config_entry(key, "0")
        wanted = settings.get("providers") or ["CPUExecutionProvider"]
        if isinstance(wanted, str):
            wanted = [p.strip() for p in wanted.split(",")]
        available = ort.get_available_providers()
        strict = _flag(settings.get("strict_providers", False))
        chosen = [p for p in wanted if p in available]
        self.skipped = [p for p in wanted if p not in available]
        if self.skipped and strict:
            raise RuntimeError(f"provider(s) {self.skipped} not available in this onnxruntime "
                               f"(available: {available}); install onnxruntime-gpu or drop strict_providers")
        chosen = chosen or ["CPUExecutionProvider"]
        options = [_resolve(p, dict(settings.get("provider_options", {}).get(p, {})), model_path) for p in chosen]
        # A provider the wheel was built with can still fail to load (CUDA/cuDNN/TensorRT libraries
        # missing): onnxruntime then falls back to the CPU, printing on stdout. Strict: no fallback.
        # Either way its prints go to stderr (stdout is the caller's: --json), and what runs is checked.
        # (Only around a non-CPU provider: redirecting stdout is process-wide; build threads make CPU sessions.)
        gpu = chosen[0] != "CPUExecutionProvider"
        quiet = contextlib.redirect_stdout(sys.stderr) if gpu else contextlib.nullcontext()
        with _REDIRECT if gpu else contextlib.nullcontext(), quiet:  # one swap of sys.stdout at a time
            try:
                self.session = ort.InferenceSession(str(model_path), opts, providers=chosen, provider_options=options,
                                                    enable_fallback=0 if strict else 1)
            except Exception as e:
                if not strict:
                    raise
                raise RuntimeError(f"{chosen[0]} could not run this model ({type(e).__name__}: {e}); "
                                   "strict_providers is set, so there is no fallback") from None
        running = self.session.get_providers()
        if chosen[0] not in running:
            if strict:
                raise RuntimeError(f"{chosen[0]} did not load (running: {running}); strict_providers is set: check "
                                   "the CUDA/cuDNN/TensorRT libraries, or drop strict_providers")
            self.skipped.append(chosen[0])
        if wanted[0] != running[0]:
            warnings.warn(f"{', '.join(self.skipped) or wanted[0]} not running; running on {running[0]} "
                          "(install onnxruntime-gpu and its CUDA/TensorRT libraries, or set strict_providers=true to "
                          "fail instead)", RuntimeWarning, stacklevel=1)
        self.session.disable_fallback()  # a provider failing a run raises, never silently reruns on the CPU
        self.input_name = self.session.get_inputs()[0].name

    @property
    def executed_by(self) -> str:
        return self.session.get_providers()[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def _resolve(provider: str, options: dict, model_path) -> dict:
    cache = options.get("trt_engine_cache_path")
    if cache and not os.path.isabs(cache):
        # One folder per model file content: TensorRT's cache is keyed by graph, not weights, so a
        # retrained model of the same architecture must never find the old engine.
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetl-trt" / cache / digest
        root.mkdir(parents=True, exist_ok=True)
        options["trt_engine_cache_path"] = str(root)
    return {k: str(v) if isinstance(v, bool) else v for k, v in options.items()}


def _flag(value) -> bool:
    """A setting that may arrive as a string from `predict.py --set key=value`."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)

"""What a configuration (backbone, input size) costs at batch 1 through a target's own runtime, at the
precision the target ships (its default model), before anything is trained.

Latency depends on the graph, not on its weights: a model of the same architecture with seeded random
weights and the build's number of classes is exported, made into the target's model as the build
would make it (its first INT8 quantizer on a handful of random calibration inputs, or its float
conversion; uint8 pixel input when the target ships that) and timed through the target's engine
(backends.runner: the bundle's own engine file). Both are cached under the budget cache folder:
the graph by what it depends on, the measured latency by the graph *and* this machine (CPU, engine
threads, runtime versions, engine settings), so a repeated search on one machine reuses its first
measurement and chooses the same configuration (docs/budget.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, backbones, backends, model_input, search, speed
from .artifact import Artifact
from .machine import machine_info
from .profiles import TargetProfile

GRAPH_FORMAT = 1
CALIBRATION_INPUTS = 8  # random inputs the latency model's quantizer calibrates on (latency only)
WARMUP = 5
ROUNDS = 5  # configurations timed in turn, this many rounds: drift falls on all alike


@dataclass(frozen=True)
class Graph:
    """A target's model of one configuration, with random weights: what its latency is measured on."""

    backbone: str
    image_size: int
    precision: str
    model_input: str
    path: Path  # the file the engine loads (an OpenVINO .xml has its .bin beside it)
    files: tuple[str, ...]  # every file of the model, in path's folder
    contract: dict  # what the model takes
    size_bytes: int


def digest(obj) -> str:
    """A short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def graph_key(backbone: str, size: int, n_classes: int, profile: TargetProfile, backend) -> dict:
    """What a latency model depends on."""
    return {"format": GRAPH_FORMAT, "edgetl": __version__, "backbone": backbone, "image_size": size,
            "classes": n_classes, "backend": backend.name, "versions": backend.versions(), "opset": profile.opset,
            "precision": profile.precisions[0], "model_input": profile.model_input,
            "quantization": profile.quantization.model_dump() if profile.quantization else None}


def _random_net(backbone: str, size: int, n_classes: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = backbones.get(backbone).build(size)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, n_classes)
    return net.eval()


def _calibration(contract: dict, profile: TargetProfile) -> backends.QuantInputs:
    from .runtime.preprocess import sample_crops, to_tensor

    x = to_tensor(sample_crops(CALIBRATION_INPUTS, contract, seed=0), contract)
    zeros = np.zeros((len(x), 2), dtype=np.float32)
    return backends.QuantInputs(calibration=x, val_x=x, val_y=np.zeros(len(x), dtype=np.int64),
                                val_reference_logits=zeros, max_drop_pp=100.0, target_agreement=0.0, seed=0)


def _make(backbone: str, size: int, n_classes: int, profile: TargetProfile, backend, work: Path) -> Artifact:
    """The target's model of this configuration, with random weights, in `work`."""
    from . import export

    contract = backbones.get(backbone).contract(size)
    fp32 = export.to_onnx(_random_net(backbone, size, n_classes), work / "fp32.onnx", contract=contract,
                          labels=[str(i) for i in range(n_classes)], opset=profile.opset)
    precision = profile.precisions[0]
    if precision == "int8":
        steps = [s for cand in profile.quantization.quantizers for s in search.steps_of(cand)
                 if s in backend.quantizers]
        # fast bias correction and NNCF's default activation ranges: the same graph (only values
        # differ), in seconds
        quick = profile.model_copy(update={"quantization": profile.quantization.model_copy(
            update={"bias_correction": "fast", "activation_range": "mean_minmax"})})
        art = backend.quantizers[steps[0]](fp32, _calibration(contract, profile), quick, work)
    else:
        art = backend.convert(fp32, precision, profile, work)
    if profile.model_input == model_input.RAW:
        art = backend.with_raw_input(art, contract, work, "model")
    return art


def graph(backbone: str, size: int, n_classes: int, profile: TargetProfile, backend, folder: Path) -> Graph:
    """The latency model of (backbone, size) for `profile`, made once into folder/<key>/ (reused after)."""
    key = digest(graph_key(backbone, size, n_classes, profile, backend))
    final = folder / key
    index = final / "graph.json"
    if not index.is_file():
        tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            (tmp / "work").mkdir()
            art = _make(backbone, size, n_classes, profile, backend, tmp / "work")
            files = backend.model_files(art, "model")
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
            shutil.rmtree(tmp / "work")
            contract = model_input.contract_for(profile.model_input, backbones.get(backbone).contract(size))
            (tmp / "graph.json").write_text(json.dumps(
                {"backbone": backbone, "image_size": size, "precision": profile.precisions[0],
                 "model_input": profile.model_input, "files": list(files), "contract": contract,
                 "engine": backend.engine, "backend": backend.name}, indent=1), encoding="utf-8")
            try:
                os.replace(tmp, final)  # atomic: a folder is complete or absent
            except OSError:  # another build made it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_graph(final)


def load_graph(folder: Path) -> Graph:
    """A latency model made by `graph` (its folder)."""
    meta = json.loads((folder / "graph.json").read_text(encoding="utf-8"))
    files = tuple(meta["files"])
    return Graph(meta["backbone"], int(meta["image_size"]), meta["precision"], meta["model_input"],
                 folder / files[0], files, meta["contract"], sum((folder / f).stat().st_size for f in files))


def machine_key(backend, profile: TargetProfile) -> dict:
    """What a measured latency depends on besides the graph: this machine and how the engine runs."""
    from .threads import engine

    m = machine_info()
    return {"cpu": m["cpu"], "cores": m["cores"], "cpus_allowed": m["cpus_allowed"], "threads": engine(),
            "versions": backend.versions(), "settings": backend.settings(profile, validating=True)}


def measure(graphs: dict[str, Graph], backend, profile: TargetProfile, runs: int,
            cache: Path | None = None, progress=None) -> dict[str, dict]:
    """name -> {"latency_ms": median, "p90_ms", "runs", "executed_by", "cached"}: every graph timed at
    batch 1 through the target's engine, in turn for ROUNDS rounds; measurements already in `cache`
    for this machine are read, not repeated."""
    from .runtime.preprocess import sample_crops, to_tensor

    machine = machine_key(backend, profile)
    out, todo = {}, {}
    for name, g in graphs.items():
        path = None if cache is None else cache / f"{digest([machine, g.files, _sha(g), runs])}.json"
        if path is not None and path.is_file():
            out[name] = {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
        else:
            todo[name] = (g, path)
    if todo:
        if progress is not None:
            progress.stage(f"{profile.name}: latency of {len(todo)} configuration(s), {runs} runs each")
        runners = {n: backends.runner(backend, Artifact(g.path, "latency", ""), g.contract, [], profile, timing=True)
                   for n, (g, _) in todo.items()}
        x = {n: to_tensor(sample_crops(1, g.contract, seed=0), g.contract) for n, (g, _) in todo.items()}
        times = speed.interleaved(runners, x, runs=runs, warmup=WARMUP, rounds=min(ROUNDS, runs))
        for n, (_, path) in todo.items():
            t = times[n] * 1e3
            row = {"latency_ms": round(float(np.median(t)), 3), "p90_ms": round(float(np.percentile(t, 90)), 3),
                   "runs": len(t), "executed_by": runners[n].executed_by}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_text(json.dumps({**row, "machine": machine}), encoding="utf-8")
                os.replace(tmp, path)
            out[n] = {**row, "cached": False}
    return {n: {k: v for k, v in out[n].items() if k != "machine"} for n in graphs}


def _sha(g: Graph) -> str:
    h = hashlib.sha256()
    for f in g.files:
        h.update((g.path.parent / f).read_bytes())
    return h.hexdigest()

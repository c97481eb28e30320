"""Device profiles: batch-1 latencies of a search space measured on the device, through the device's
runtime, read by `edgetl build --device-profile FILE` instead of the build machine's.

Two ways to take one (docs/budget.md):
- on a device with edgetl: `edgetl bench --profile OUT.json --target T` (times the space's random-weight
  models of target T here, and with `--graphs DIR` also writes them to DIR);
- on a device without torch: `edgetl bench --profile x.json --graphs DIR --target T` on the build machine,
  copy DIR and any bundle of target T to the device, and run `python BUNDLE/predict.py --profile DIR
  --out OUT.json` there (the bundle's own engine times each graph).

A profile records the device's CPU, cores, the engine's threads and runtime versions, and the target
its graphs were made for. A profile applies to a target of the same name only (the same runtime is not
enough: `cpu` and `cpu-arm64` both run onnxruntime INT8 on uint8 pixels, on different CPUs); a build
refuses any other, and a profile that lacks a configuration of the space, before anything is trained."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UsageError
from .latency import Graph
from .machine import machine_info
from .profiles import TargetProfile

FORMAT = "edgetl-device-profile/1"
GRAPHS_FORMAT = "edgetl-profile-graphs/1"


def entry_name(backbone: str, size: int, precision: str) -> str:
    """The name of a configuration's graph in a profile's graph folder."""
    return f"{backbone}-{size}-{precision}"


def write_graphs(graphs: list[Graph], backend, profile: TargetProfile, folder: Path) -> Path:
    """The graphs (with their contracts) in `folder`, with index.json: what predict.py --profile times."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for g in graphs:
        name = entry_name(g.backbone, g.image_size, g.precision)
        (folder / name).mkdir(exist_ok=True)
        for f in g.files:
            shutil.copyfile(g.path.parent / f, folder / name / f)
        entries.append({"backbone": g.backbone, "image_size": g.image_size, "precision": g.precision,
                        "model_input": g.model_input, "folder": name, "files": list(g.files), "contract": g.contract})
    index = {"format": GRAPHS_FORMAT, "engine": backend.engine, "backend": backend.name, "target": profile.name,
             "graphs": entries}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return folder


def make(graphs: list[Graph], measured: dict[str, dict], backend, profile: TargetProfile) -> dict:
    """A profile of this machine from latency.measure's results (name = entry_name of each graph)."""
    from .threads import engine

    m = machine_info()
    rows = []
    for g in graphs:
        r = measured[entry_name(g.backbone, g.image_size, g.precision)]
        rows.append({"backbone": g.backbone, "image_size": g.image_size, "precision": g.precision,
                     "model_input": g.model_input, "latency_ms": r["latency_ms"], "p90_ms": r["p90_ms"],
                     "runs": r["runs"], "executed_by": r["executed_by"]})
    return {"format": FORMAT, "engine": backend.engine, "backend": backend.name, "target": profile.name,
            "runtime_versions": backend.versions(), "cpu": m["cpu"], "cores": m["cores"], "threads": engine(),
            "settings": backend.settings(profile, validating=True), "taken_by": "edgetl bench --profile",
            "latencies": rows}


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")
    backbone: str
    image_size: int = Field(ge=1)
    precision: str
    model_input: str | None = None
    latency_ms: float = Field(gt=0)
    p90_ms: float | None = None
    runs: int | None = None
    executed_by: str | None = None


class _Profile(BaseModel):
    """What load() checks of a profile's JSON (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    engine: str
    target: str
    latencies: list[_Row]


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


@dataclass(frozen=True)
class DeviceProfile:
    path: Path
    data: dict

    @property
    def engine(self) -> str:
        return self.data["engine"]

    @property
    def target(self) -> str:
        return self.data["target"]

    def describe(self) -> str:
        versions = ", ".join(f"{k} {v}" for k, v in self.data.get("runtime_versions", {}).items())
        return (f"device profile {self.path.name} ({self.data.get('cpu', '?')}, {self.data.get('threads', '?')} "
                f"threads, {versions or self.engine})")

    def covers(self, pairs: list[tuple[str, int]], profiles: list[TargetProfile]) -> None:
        """UsageError (one line) unless every (backbone, size) x target is in the profile: checked
        before any configuration is trained."""
        for p in profiles:
            for b, s in pairs:
                self.latency(b, s, p)

    def latency(self, backbone: str, size: int, profile: TargetProfile) -> dict:
        """The profile's measurement of (backbone, size) at the precision and input `profile` ships."""
        for r in self.data["latencies"]:
            if (r["backbone"], int(r["image_size"]), r["precision"], r.get("model_input", profile.model_input)) == \
                    (backbone, size, profile.precisions[0], profile.model_input):
                return {"latency_ms": float(r["latency_ms"]), "p90_ms": r.get("p90_ms"), "runs": r.get("runs"),
                        "executed_by": r.get("executed_by", self.engine), "cached": False}
        raise UsageError(f"{self.path}: no latency of {backbone} at {size} px ({profile.precisions[0]}, "
                         f"{profile.model_input}) for target {profile.name}; fix: take the profile over this "
                         f"search space (`edgetl bench --profile OUT.json --target {profile.name}` with the same "
                         "[search] backbones and image_sizes)")


def load(path: Path, profiles: list[TargetProfile]) -> DeviceProfile:
    """The profile at `path`, checked: its format and fields, and that each target of `profiles` is the
    one it was taken for (same runtime, same target name); one line naming the file otherwise."""
    from . import backends

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--device-profile {path}: file not found; fix: check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--device-profile {path}: not a readable JSON profile ({type(e).__name__}); fix: take "
                         "one with `edgetl bench --profile` or the bundle's `predict.py --profile`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("latencies"), list):
        raise UsageError(f"--device-profile {path}: not an edgetl device profile (format {FORMAT}); fix: take one "
                         "with `edgetl bench --profile` or the bundle's `predict.py --profile`")
    try:
        _Profile.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"--device-profile {path}: {_first_error(e)}; fix: take the profile again with "
                         "`edgetl bench --profile` or the bundle's `predict.py --profile` (do not edit it by hand)"
                         ) from None
    dp = DeviceProfile(Path(path), data)
    for p in profiles:
        engine = backends.get(p).engine
        take = (f"fix: take the profile with a {p.name} bundle's predict.py --profile (or `edgetl bench --profile "
                f"OUT.json --target {p.name}`), or build target {dp.target} alone")
        if dp.engine != engine:
            raise UsageError(f"--device-profile {path}: measured with the {dp.engine} runtime, but target {p.name} "
                             f"runs {engine}; {take}")
        if dp.target != p.name:
            raise UsageError(f"--device-profile {path}: taken for target {dp.target}, but the build applies it to "
                             f"target {p.name} (a profile holds one device's timings); {take}")
    return dp

"""Bundle runtime: copied into every bundle as predict.py, next to preprocess.py and one engine
file (engine_<name>.py) that runs the model. Needs numpy, Pillow and that engine's runtime
(listed in runtime.json "requires"); never torch or edgetl.

    python predict.py IMAGE...              # prints "<file>\t<label>\t<probability>"
    python predict.py --json IMAGE...
    python predict.py --selftest            # golden inputs shipped in the bundle must give the recorded outputs
    python predict.py --bench [--batch 8]   # latency/throughput through this runtime
    python predict.py --profile GRAPHS [--out device.json]  # a device profile for `edgetl build --device-profile`
    python predict.py --model fp16 ...      # another model of the bundle (runtime.json "models")
    python predict.py --set device=GPU ...  # override a runtime setting (runtime.json "settings")
    python predict.py --no-verify ...       # skip the check of every file against manifest.json

Loading checks every file of the bundle against manifest.json (sha256 of each file, the manifest's
own digest) and refuses a bundle that differs (exit 1, the file named), unless --no-verify.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

if not __package__:  # in a bundle: it is checked against its manifest, so write no __pycache__ into it
    sys.dont_write_bytecode = True

import numpy as np

try:  # inside the edgetl package
    from .integrity import IntegrityError, check
    from .preprocess import ImageDecodeError, input_dtype, load_contract, load_rgb, preprocess, sample_crops, to_tensor
except ImportError:  # inside a bundle, run as a script
    from integrity import IntegrityError, check
    from preprocess import ImageDecodeError, input_dtype, load_contract, load_rgb, preprocess, sample_crops, to_tensor

HERE = Path(__file__).resolve().parent


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class BundleError(ValueError):
    """The bundle cannot serve the request (unknown model name, unreadable runtime.json)."""


class TamperedBundleError(BundleError):
    """A file of the bundle, or its manifest, differs from what the build wrote. `problems` lists each."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def verify_bundle(bundle: Path) -> None:
    """Every file against manifest.json (hashes, the manifest's own digest); TamperedBundleError if not."""
    try:
        check(bundle)
    except IntegrityError as e:
        raise TamperedBundleError(f"{e}; fix: restore or rebuild the bundle (or pass --no-verify)",
                                  e.problems) from None


def load_engine(name: str):
    """The engine module `engine_<name>`: the file beside this one (bundle), loaded by its path so
    that several bundles in one process each run their own copy; or edgetl.runtime's (package)."""
    if __package__:
        return importlib.import_module(f"{__package__}.engine_{name}")
    path = HERE / f"engine_{name}.py"
    key = f"_edgetl_engine_{name}_{abs(hash(str(path)))}"
    if key not in sys.modules:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: engine file missing")
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def read_runtime(bundle: Path) -> dict:
    return json.loads((Path(bundle) / "runtime.json").read_text(encoding="utf-8"))


def model_name(bundle: Path, runtime: dict, model: str | None) -> str:
    """The model to run (the default one unless named), or BundleError when runtime.json has no
    such model or was written by an older edgetl."""
    if "engine" not in runtime or "models" not in runtime:
        raise BundleError(f"{bundle}: runtime.json has no engine/models: the bundle was made by an older edgetl; "
                          "fix: rebuild it, or run that bundle's own predict.py")
    name = model or runtime["default_model"]
    if name not in runtime["models"]:
        raise BundleError(f"{bundle}: no model '{name}' in this bundle; fix: choose one of "
                          f"{', '.join(runtime['models'])}")
    return name


class Predictor:
    """One model + its preprocessing contract + labels. edgetl's parity gate runs models through
    this same class, so what was validated is what the device runs."""

    def __init__(self, engine, contract: dict, labels: list[str]):
        self.engine = engine
        self.contract = contract
        self.labels = labels

    @classmethod
    def from_bundle(cls, bundle=HERE, model: str | None = None, settings: dict | None = None, *,
                    verify: bool = True) -> Predictor:
        """The bundle's model; with `verify` (the default) only once every file matches manifest.json."""
        bundle = Path(bundle)
        if verify:
            verify_bundle(bundle)
        runtime = read_runtime(bundle)
        name = model_name(bundle, runtime, model)
        # the bundle's settings, then what this model needs on top (e.g. TensorRT INT8 mode off for a
        # float model), then the caller's --set overrides
        merged = {**runtime.get("settings", {}), **runtime.get("model_settings", {}).get(name, {}), **(settings or {})}
        engine = load_engine(runtime["engine"]).Engine(bundle / runtime["models"][name], merged)
        labels = (bundle / "labels.txt").read_text(encoding="utf-8").splitlines()
        return cls(engine, load_contract(bundle / "preprocess.json"), labels)

    @property
    def executed_by(self) -> str:
        """What actually ran the model (e.g. 'CPUExecutionProvider', 'OpenVINO CPU')."""
        return self.engine.executed_by

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.engine.run(np.ascontiguousarray(batch, dtype=input_dtype(self.contract)))

    def predict_files(self, paths) -> list[dict]:
        out = []
        for p in paths:
            try:
                x = preprocess(load_rgb(p), self.contract)[None]
            except ImageDecodeError as e:
                out.append({"file": str(p), "error": str(e)})
                continue
            probs = softmax(self.logits(x))[0]
            k = int(probs.argmax())
            top = np.argsort(-probs)[:3]
            out.append({"file": str(p), "label": self.labels[k], "index": k, "probability": float(probs[k]),
                        "top": [{"label": self.labels[i], "probability": float(probs[i])} for i in top]})
        return out

    def selftest(self, bundle=HERE, model: str | None = None) -> dict:
        """Golden inputs -> same top-1 as at build time, logits within the recorded tolerance."""
        bundle = Path(bundle)
        spec = json.loads((bundle / "golden" / "expected.json").read_text())
        runtime = read_runtime(bundle) if (bundle / "runtime.json").exists() else {}
        model = model or runtime.get("default_model")
        expected = spec["models"][model] if "models" in spec else spec
        failures, max_diff = [], 0.0
        for item in expected["items"]:
            x = preprocess(load_rgb(bundle / item["file"]), self.contract)[None]
            got = self.logits(x)[0]
            diff = float(np.abs(got - np.asarray(item["logits"], dtype=np.float32)).max())
            max_diff = max(max_diff, diff)
            if int(got.argmax()) != item["index"]:
                failures.append(f"{item['file']}: expected {item['label']}, got {self.labels[int(got.argmax())]}")
            elif diff > expected["logit_atol"]:
                failures.append(f"{item['file']}: logits differ by {diff:.4g} > {expected['logit_atol']}")
        return {"ok": not failures, "model": model, "n": len(expected["items"]), "max_logit_diff": max_diff,
                "executed_by": self.executed_by, "failures": failures}


def _rss_mb() -> float | None:
    """Peak resident memory of this process. VmHWM first: ru_maxrss survives exec, so a process
    started from a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover (Windows)
        return None


def benchmark(load, *, batch: int = 8, warmup: int = 10, runs: int = 50, seed: int = 0) -> dict:
    """Latency at batch 1 (p50/p90 of `runs` timed calls after `warmup`), throughput at `batch`,
    cold-load time (`load()` -> first result) and the process's peak RSS. `load` builds a Predictor;
    the inputs are random pixels, made into what the model takes by its contract."""
    t0 = time.perf_counter()
    predictor = load()
    crops = sample_crops(batch, predictor.contract, seed)
    x1 = to_tensor(crops[:1], predictor.contract)
    predictor.logits(x1)
    cold = time.perf_counter() - t0
    lat = _timed(predictor, x1, warmup, runs)
    xb = to_tensor(crops, predictor.contract)
    lat_b = _timed(predictor, xb, max(2, warmup // 2), max(5, runs // 4))
    return {"executed_by": predictor.executed_by, "cold_load_ms": round(cold * 1e3, 2),
            "batch1_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
            "batch1_p90_ms": round(float(np.percentile(lat, 90)) * 1e3, 3),
            "batch": batch, "batch_p50_ms": round(float(np.percentile(lat_b, 50)) * 1e3, 3),
            "throughput_ips": round(batch / float(np.percentile(lat_b, 50)), 1),
            "peak_rss_mb": None if _rss_mb() is None else round(_rss_mb(), 1), "runs": runs, "warmup": warmup}


def _timed(predictor, x, warmup: int, runs: int) -> np.ndarray:
    for _ in range(warmup):
        predictor.logits(x)
    out = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        predictor.logits(x)
        out[i] = time.perf_counter() - t
    return out


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cpu() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_profile(graphs: Path, bundle: Path = HERE, settings: dict | None = None, runs: int = 60,
                   warmup: int = 5, rounds: int = 5) -> dict:
    """A device profile (edgetl's device_profile.py reads it): batch-1 latency of every graph in
    `graphs` (written by `edgetl bench --profile ... --graphs DIR`) through this bundle's engine and
    settings, timed in turn for `rounds` rounds; with this device's CPU, threads and runtime versions."""
    graphs = Path(graphs)
    try:
        index = json.loads((graphs / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{graphs}: no readable index.json ({type(e).__name__}); fix: pass the folder that "
                          "`edgetl bench --profile OUT.json --graphs DIR` wrote") from None
    graph_list = index.get("graphs") if isinstance(index, dict) else None
    if not isinstance(graph_list, list) or not graph_list:
        raise BundleError(f"{graphs / 'index.json'}: no list of graphs; fix: pass the folder that "
                          "`edgetl bench --profile OUT.json --graphs DIR` wrote")
    if runs < rounds:
        raise BundleError(f"--runs {runs}: below the {rounds} rounds the graphs are timed in; fix: --runs {rounds} "
                          "or more")
    runtime = read_runtime(bundle)
    if index.get("engine") != runtime.get("engine"):
        raise BundleError(f"{graphs}: graphs for the {index.get('engine')} runtime, this bundle runs "
                          f"{runtime.get('engine')}; fix: export the graphs for this bundle's target")
    mine = _bundle_target(bundle)
    if mine is not None and index.get("target") != mine:
        raise BundleError(f"{graphs}: graphs for target {index.get('target')}, this bundle is target {mine}; fix: "
                          f"`edgetl bench --profile OUT.json --graphs DIR --target {mine}`, or a bundle of that target")
    merged = {**runtime.get("settings", {}), **(settings or {})}
    module = load_engine(runtime["engine"])
    engines, inputs, times = [], [], []
    for i, g in enumerate(graph_list):
        try:
            missing = [k for k in ("backbone", "image_size", "precision", "model_input") if k not in g]
            if missing:
                raise KeyError(missing[0])
            file = graphs / g["folder"] / g["files"][0]
            x = to_tensor(sample_crops(1, g["contract"], 0), g["contract"])
            inputs.append(np.ascontiguousarray(x, dtype=input_dtype(g["contract"])))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{graphs / 'index.json'}: graph entry {i} is malformed ({type(e).__name__}: {e}); "
                              "fix: write the folder again with `edgetl bench --profile OUT.json --graphs DIR`"
                              ) from None
        try:
            engines.append(module.Engine(file, merged))
        except Exception as e:  # each runtime raises its own types for a missing or broken model
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise BundleError(f"{file}: the {runtime['engine']} engine cannot load it ({type(e).__name__}: {first}); "
                              "fix: copy the graph folder from the build machine again, whole") from None
        times.append([])
    counts = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]  # `runs` in all
    for per_round in counts:
        for engine, x, t in zip(engines, inputs, times, strict=True):
            for _ in range(warmup):
                engine.run(x)
            for _ in range(per_round):
                t0 = time.perf_counter()
                engine.run(x)
                t.append(time.perf_counter() - t0)
    rows = []
    for g, engine, t in zip(graph_list, engines, times, strict=True):
        ms = np.asarray(t) * 1e3
        rows.append({**{k: g[k] for k in ("backbone", "image_size", "precision", "model_input")},
                     "latency_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
                     "runs": len(ms), "executed_by": engine.executed_by})
    import os

    return {"format": "edgetl-device-profile/1", "engine": runtime["engine"], "backend": runtime.get("backend"),
            "target": index.get("target"), "runtime_versions": _versions(), "cpu": _cpu(), "cores": os.cpu_count(),
            "threads": merged.get("threads") or os.cpu_count(), "settings": merged,
            "taken_by": "predict.py --profile", "latencies": rows}


def _bundle_target(bundle: Path) -> str | None:
    """The target this bundle was built for (manifest.json), or None where it cannot be read."""
    try:
        return json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError):
        return None


def _settings(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE, e.g. --set device=GPU")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with this bundle.")
    ap.add_argument("images", nargs="*")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--selftest", action="store_true", help="check the golden inputs; exit 1 on mismatch")
    ap.add_argument("--bench", action="store_true", help="measure latency, throughput and cold-load time")
    ap.add_argument("--batch", type=_positive, default=8, help="batch size for --bench throughput")
    ap.add_argument("--model", help="which of the bundle's models (runtime.json 'models'); default: the first")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a runtime setting, e.g. device=GPU, performance_hint=THROUGHPUT")
    ap.add_argument("--no-verify", action="store_true",
                    help="run even if the bundle's files differ from manifest.json")
    ap.add_argument("--profile", metavar="GRAPHS", type=Path,
                    help="time the graphs `edgetl bench --profile ... --graphs GRAPHS` wrote: a device profile")
    ap.add_argument("--out", type=Path, help="--profile: write the profile here (default: stdout)")
    ap.add_argument("--runs", type=_positive, default=60,
                    help="--profile: timed batch-1 runs per graph (5 or more: they are spread over 5 rounds)")
    args = ap.parse_args(argv)
    settings = _settings(args.set)
    if not args.no_verify:  # once, before any model is loaded (and outside --bench's cold-load time)
        try:
            verify_bundle(HERE)
        except TamperedBundleError as e:
            print(f"predict.py: error: {e}", file=sys.stderr)
            return 1

    def load(model=args.model):
        try:
            return Predictor.from_bundle(HERE, model=model, settings=settings, verify=False)
        except BundleError as e:
            ap.error(str(e))

    if args.profile is not None:
        try:
            prof = device_profile(args.profile, HERE, settings, runs=args.runs)
        except BundleError as e:
            print(f"predict.py: error: {e}", file=sys.stderr)
            return 2
        text = json.dumps(prof, indent=1) + "\n"
        if args.out:
            try:
                args.out.write_text(text, encoding="utf-8")
            except OSError as e:
                print(f"predict.py: error: --out {args.out}: cannot write ({e.strerror or type(e).__name__}); "
                      "fix: choose a writable path", file=sys.stderr)
                return 2
        else:
            print(text, end="")
        return 0
    if args.bench:
        result = benchmark(load, batch=args.batch)
        print(json.dumps(result) if args.json else "\n".join(f"{k}\t{v}" for k, v in result.items()))
        return 0
    if args.selftest:  # every model of the bundle unless --model names one
        models = [args.model] if args.model else list(read_runtime(HERE)["models"])
        results = [load(m).selftest(HERE, m) for m in models]
        if args.json:
            print(json.dumps(results[0] if args.model else {"ok": all(r["ok"] for r in results), "models": results}))
        for result in results if not args.json else []:
            status = "selftest passed" if result["ok"] else "selftest FAILED"
            print(f"{status} ({result['n']} golden inputs, model {result['model']} on {result['executed_by']}, "
                  f"max logit diff {result['max_logit_diff']:.3g})")
            for failure in result["failures"]:
                print(f"  {failure}")
        return 0 if all(r["ok"] for r in results) else 1
    predictor = load()
    if not args.images:
        ap.error("give IMAGE paths, --selftest or --bench")
    results = predictor.predict_files(args.images)
    if args.json:
        print(json.dumps({"predictions": results}))
    else:
        for r in results:
            line = f"error: {r['error']}" if "error" in r else f"{r['label']}\t{r['probability']:.4f}"
            print(f"{r['file']}\t{line}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

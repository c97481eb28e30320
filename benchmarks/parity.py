"""Parity before and after each recovery step, on the test split, with speed against FP32.

For every data set x backbone, ONE `edgetl build` trains the model once and builds many targets
from it: each variant below is a target profile derived from a built-in one (cpu / openvino) that
ships exactly one search candidate, so its gate row is that step's test-split result. The shipped
profiles (full search) are built alongside. Calibration sizes are compared by separate builds.

    python benchmarks/parity.py [--data shapes,digits,hard] [--backbones mobilenet_v2,efficientnet_lite0]
                                [--calibration-sizes 128,300] [--variants ptq,refit,...] [--json FILE]
    python benchmarks/parity.py --timing      # the shipped three-target build on digits, wall time

Nothing here tunes anything: every search inside a build looks at train + val only; the test
split rows are what the gate saw.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import write_digits, write_hard_digits  # noqa: E402

HEAD_OP = {"onnxruntime": "Gemm", "openvino": "MatMul"}
# The hard case, calibrated on its *val* split (never on test) so that the float model sits near 0.8
# top-1 (0.77 on val, feature-extract MobileNetV2, seed 0): low contrast, a random tint and ink
# polarity and a random shift, no sensor noise. As first generated (30 / 8 a class, 64 px, noise 28)
# the float model reached 0.19 on val, and no INT8 model could agree with it (0.57 on val evidence).
HARD = {"train_per_class": 80, "val_per_class": 20, "size": 96, "noise": 0.0}
# variant -> (candidate list, head kept float, other quantization settings)
VARIANTS = {
    "ptq": (["nncf_ptq"], False, {}),
    "ptq+refit": (["nncf_ptq+head_refit"], False, {}),
    "ptq-headfloat": (["nncf_ptq"], True, {}),
    "ptq-headfloat+refit": (["nncf_ptq+head_refit"], True, {}),
    "ort_static": (["ort_static"], False, {}),
    "ort_static+refit": (["ort_static+head_refit"], False, {}),
    # activation range estimators of onnxruntime's calibration (minmax is the default above)
    "ort_percentile+refit": (["ort_static+head_refit"], False, {"calibrate_method": "percentile"}),
    "ort_entropy+refit": (["ort_static+head_refit"], False, {"calibrate_method": "entropy"}),
    "qat": (["qat"], False, {}),
    "qat+refit": (["qat+head_refit"], False, {}),
    "qat-kl+refit": (["qat+head_refit"], False, {"qat_loss": "mse+kl"}),
    "mixed_precision": (["mixed_precision"], False, {}),
}
BASES = ("cpu", "openvino")


def _profile(base: str, variant: str, folder: Path) -> Path:
    from edgetl.profiles import load_profile

    p = load_profile(base).model_dump(exclude_none=True)
    candidates, head_float, settings = VARIANTS[variant]
    if base == "openvino" and candidates[0].startswith("ort_static"):
        return None
    p["quantization"].update(settings)
    p["name"] = f"{base}-{variant.replace('+', '-')}"
    p["description"] = f"benchmark variant {variant} of {base}"
    p["quantization"]["quantizers"] = candidates
    if head_float:
        p["quantization"]["float_op_types"] = [HEAD_OP[p["backend"]]]
    path = folder / f"{p['name']}.toml"
    path.write_text(tomli_w.dumps(p))
    return path


def build(args: list[str], out: Path) -> tuple[dict, float, int]:
    cmd = [sys.executable, "-m", "edgetl.cli", "build", "--json", "-q", "--out", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1, 3) or not proc.stdout.strip():
        sys.exit(f"edgetl build failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout), wall, proc.returncode


def rows_of(result: dict, data: str, backbone: str, calib: int) -> list[dict]:
    out = []
    for t in result["targets"]:
        if t.get("error"):
            out.append({"data": data, "backbone": backbone, "calibration": calib, "target": t["target"],
                        "error": t["error"]["message"][:120]})
            continue
        m = next(x for x in t["models"] if x["precision"] == "int8")
        met, q = m["metrics"], m["quantization"]
        attempts = q["attempts"]
        chosen = next((a for a in attempts if a["quantizer"] == q["chosen"]), attempts[-1] if attempts else {})
        sp = m.get("speed") or {}
        b = [k for k in sp if k.startswith("batch_") and k != "batch_1"]
        out.append({
            "data": data, "backbone": backbone, "calibration": calib, "target": t["target"],
            "chosen": q["chosen"], "val_agreement": (chosen.get("evidence") or {}).get("top1_agreement",
                                                                                     chosen.get("val_top1_agreement")),
            "reference_accuracy": met["reference_accuracy"], "accuracy": met["accuracy"],
            "drop_pp": met["accuracy_drop_pp"], "drop_upper95_pp": met.get("drop_upper95_pp"),
            "agreement": met["top1_agreement"], "agreement_lower95": met.get("agreement_lower95"),
            "n_test": met["n_test"], "float_convolutions": chosen.get("float_convolutions"),
            "float_nodes": len(q["float_nodes"]),
            "speed_b1": sp.get("batch_1", {}).get("ratio"), "speed_bn": sp[b[0]]["ratio"] if b else None,
            "speed_baseline": sp.get("baseline"),
            "search_seconds": round(sum(a.get("seconds", 0) for a in attempts), 1),
            "met": met["top1_agreement"] >= 0.99 and met["accuracy_drop_pp"] <= 0.5 and
            not chosen.get("float_convolutions"),
            "published": t["published"]})
    return out


def table(rows: list[dict]) -> str:
    head = ("| data | backbone | calib | target | chosen | val+views agr | test drop pp (≤ bound) | "
            "test agr (≥ bound) | float convs | vs FP32 b1 / b8 | search s | target met |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['backbone']} | {r['calibration']} | {r['target']} | error: "
                         f"{r['error']} |" + " |" * 7)
            continue

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        lines.append(
            f"| {r['data']} | {r['backbone']} | {r['calibration']} | {r['target']} | `{r['chosen']}` | "
            f"{f(r['val_agreement'], '.3f')} | {r['drop_pp']:+.2f} (≤ {f(r['drop_upper95_pp'], '+.2f')}) | "
            f"{r['agreement']:.4f} (≥ {f(r['agreement_lower95'], '.3f')}) | {f(r['float_convolutions'], 'd')} | "
            f"{f(r['speed_b1'], '.2f')}x / {f(r['speed_bn'], '.2f')}x | {r['search_seconds']:.0f} | "
            f"{'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def determinism(data, tmp: Path, backbone: str) -> None:
    """The cpu target alone and inside a three-target build: the same candidate, the same model bytes."""
    folder, extra = data
    models = {}
    for name, targets in (("cpu alone", ["cpu"]), ("cpu+openvino+gpu", ["cpu", "openvino", "gpu"])):
        out = tmp / f"det-{len(targets)}"
        res, wall, code = build(["--data", str(folder), *extra, "--backbone", backbone,
                                 *[x for t in targets for x in ("--target", t)]], out)
        cpu = next(t for t in res["targets"] if t["target"] == "cpu")
        manifest = json.loads((out / "cpu" / "manifest.json").read_text()) if cpu["published"] else {"files": {}}
        models[name] = (cpu["quantization"]["chosen"], manifest["files"].get("model.onnx"))
        rss = max(res.get("peak_rss_mb", {}).values(), default=float("nan"))
        print(f"hard / {backbone} / {name}: wall {wall:.1f} s, exit {code}, peak RSS {rss:.0f} MB; stages: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()), flush=True)
        for r in rows_of({"targets": [t for t in res["targets"] if t["target"] != "gpu"]}, "hard", backbone, 128):
            print(f"  {r['target']}: {r.get('chosen')} val+views agreement {r.get('val_agreement')} test drop "
                  f"{r.get('drop_pp')} agreement {r.get('agreement')} float convs {r.get('float_convolutions')} "
                  f"published {r.get('published')}", flush=True)
        for t in res["targets"]:
            for att in t["quantization"]["attempts"]:
                print(f"    {t['target']} {att['quantizer']}: " + str(att.get("decision") or att.get("skipped")
                                                                     or att.get("error")), flush=True)
    (c1, h1), (c2, h2) = models.values()
    print(f"cpu alone vs in three targets: chosen {c1} / {c2}; model.onnx sha256 "
          f"{'IDENTICAL' if h1 == h2 and h1 else 'DIFFERENT'} ({str(h1)[:16]} / {str(h2)[:16]})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="shapes,digits,hard", help="shapes, digits, hard (digits cut and degraded)")
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--calibration-sizes", default="128")
    ap.add_argument("--variants", default="ptq,ptq+refit,ptq-headfloat,ptq-headfloat+refit,qat,qat+refit",
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--no-shipped", action="store_true", help="skip the shipped cpu/openvino profiles")
    ap.add_argument("--timing", action="store_true", help="only: shipped three-target build on digits, wall time")
    ap.add_argument("--determinism", action="store_true",
                    help="only: the hard case, cpu alone vs cpu+openvino+gpu: wall, peak RSS, chosen, model sha256")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from edgetl.machine import machine_info

    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}", flush=True)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"shapes": (None, []), "digits": (write_digits(tmp / "digits"), ["--image-size", "128"]),
                # the hard real case: 10 classes, 80 train / 20 val a class, 797 test, degraded, 96 px
                "hard": (write_hard_digits(tmp / "hard", **HARD), ["--image-size", str(HARD["size"])])}
        if a.determinism:
            determinism(sets["hard"], tmp, a.backbones.split(",")[0])
            return
        if a.timing:
            res, wall, code = build(["--data", str(sets["digits"][0]), *sets["digits"][1], "--target", "cpu",
                                     "--target", "openvino", "--target", "gpu"], tmp / "timing")
            print(f"digits, three targets (cpu, openvino, gpu), mobilenet_v2, 128 px: wall {wall:.1f} s, exit {code}; "
                  "stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()))
            for r in rows_of({"targets": [t for t in res["targets"] if t["target"] != "gpu"]}, "digits",
                             "mobilenet_v2", 128):
                print(f"  {r['target']}: {r.get('chosen')} drop {r.get('drop_pp')} agreement {r.get('agreement')} "
                      f"float convs {r.get('float_convolutions')} published {r.get('published')}")
            return
        profiles = [p for base in BASES for v in variants if (p := _profile(base, v, tmp))]
        targets = [x for p in profiles for x in ("--target", str(p))]
        if not a.no_shipped:
            targets += ["--target", "cpu", "--target", "openvino"]
        rows = []
        for data in a.data.split(","):
            folder, extra = sets[data]
            for backbone in a.backbones.split(","):
                for calib in (int(c) for c in a.calibration_sizes.split(",")):
                    recipe = tmp / f"recipe-{calib}.toml"
                    recipe.write_text(f"[data]\ncalibration_size = {calib}\n")
                    args = [str(recipe), "--backbone", backbone, *extra, *targets]
                    if folder:
                        args += ["--data", str(folder)]
                    res, wall, code = build(args, tmp / f"out-{data}-{backbone}-{calib}")
                    got = rows_of(res, data, backbone, calib)
                    rows += got
                    print(f"\n{data} / {backbone} / calibration {calib}: wall {wall:.0f} s, exit {code}", flush=True)
                    print(table(got), flush=True)
        print("\nall rows\n" + table(rows))
        if a.json:
            a.json.write_text(json.dumps({"machine": m, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

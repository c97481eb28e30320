"""Bundle runtime for onnxruntime targets. Copied into bundles as predict.py.

Needs only numpy, Pillow and onnxruntime (no torch, no edgetl).

    python predict.py IMAGE...          # prints "<file>\t<label>\t<probability>"
    python predict.py --json IMAGE...
    python predict.py --selftest        # runs the golden inputs shipped in the bundle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:  # inside the edgetl package
    from .preprocess import ImageDecodeError, load_contract, load_rgb, preprocess
except ImportError:  # inside a bundle, run as a script
    from preprocess import ImageDecodeError, load_contract, load_rgb, preprocess

HERE = Path(__file__).resolve().parent


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Predictor:
    """Runs one ONNX model with its preprocessing contract. Used by edgetl's parity gate too."""

    def __init__(self, model_path, contract: dict, labels: list[str], providers=None, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        wanted = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), opts, providers=wanted)
        self.input_name = self.session.get_inputs()[0].name
        self.contract = contract
        self.labels = labels

    @classmethod
    def from_bundle(cls, bundle=HERE, **kw) -> Predictor:
        bundle = Path(bundle)
        runtime = json.loads((bundle / "runtime.json").read_text()) if (bundle / "runtime.json").exists() else {}
        labels = (bundle / "labels.txt").read_text(encoding="utf-8").splitlines()
        kw.setdefault("providers", runtime.get("providers"))
        return cls(bundle / runtime.get("model", "model.onnx"), load_contract(bundle / "preprocess.json"), labels, **kw)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

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

    def selftest(self, bundle=HERE) -> dict:
        """Golden inputs -> same top-1 as at build time, logits within the recorded tolerance."""
        bundle = Path(bundle)
        spec = json.loads((bundle / "golden" / "expected.json").read_text())
        failures, max_diff = [], 0.0
        for item in spec["items"]:
            x = preprocess(load_rgb(bundle / item["file"]), self.contract)[None]
            got = self.logits(x)[0]
            diff = float(np.abs(got - np.asarray(item["logits"], dtype=np.float32)).max())
            max_diff = max(max_diff, diff)
            if int(got.argmax()) != item["index"]:
                failures.append(f"{item['file']}: expected {item['label']}, got {self.labels[int(got.argmax())]}")
            elif diff > spec["logit_atol"]:
                failures.append(f"{item['file']}: logits differ by {diff:.4g} > {spec['logit_atol']}")
        return {"ok": not failures, "n": len(spec["items"]), "max_logit_diff": max_diff, "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with this bundle.")
    ap.add_argument("images", nargs="*")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--selftest", action="store_true", help="check the golden inputs; exit 1 on mismatch")
    args = ap.parse_args(argv)
    predictor = Predictor.from_bundle(HERE)
    if args.selftest:
        result = predictor.selftest(HERE)
        if args.json:
            print(json.dumps(result))
        else:
            status = "selftest passed" if result["ok"] else "selftest FAILED"
            print(f"{status} ({result['n']} golden inputs, max logit diff {result['max_logit_diff']:.3g})")
            for failure in result["failures"]:
                print(f"  {failure}")
        return 0 if result["ok"] else 1
    if not args.images:
        ap.error("give IMAGE paths or --selftest")
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

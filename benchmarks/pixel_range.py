"""First-layer options of pixel-input INT8 models (edgetl/first_layer.py), on the parity benchmark's
data sets: which one keeps the INT8 model closest to the float model.

    python benchmarks/pixel_range.py [--data hard,digits] [--backbone mobilenet_v2]
                                     [--variants ptq+refit,ort_static+refit] [--json FILE]

One `edgetl build` per data set, in this process, with the shipped cpu and openvino profiles (and
the cpu-arm64 one, S8S8) plus parity.py's single-candidate variants of cpu/openvino. At each gate the
INT8 model the search chose (float input) is made a pixel model once per option — "calibrated"
(the quantizer's range: clips), "full_range", "fold" — and each is run on the val split (the
search's evidence) and on the test split (the gate's): top-1 agreement with the float model, mean
squared logit difference from the float model, accuracy; and whether black vs (24, 19, 6) and white
vs (253, 243, 231) still differ. The build's own gate judged what ships (first_layer.FIRST_LAYER).
Nothing is tuned on the test split: the options are fixed rules, compared after the fact.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import write_digits, write_hard_digits  # noqa: E402
from parity import _profile  # noqa: E402

PAIRS = [((0, 0, 0), (24, 19, 6)), ((255, 255, 255), (253, 243, 231))]


def _judge(runner, x, reference, y) -> dict:
    from edgetl import parity

    logits = parity.logits_of(runner, x)
    return {"agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "mse": float(((logits - reference) ** 2).mean()), "accuracy": float((logits.argmax(1) == y).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="hard,digits")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--variants", default="ort_static+refit", help="parity.py variants built beside the shipped")
    ap.add_argument("--effort", choices=["low", "default", "max"], help="the recipe's quantize.effort")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from edgetl import backends, first_layer, model_input, target
    from edgetl.cli import cli
    from edgetl.machine import machine_info

    rows, current = [], {}
    original = target.make_model

    def make_model(precision, stem, backend, profile, fp32, tol, ctx, work):
        data = current.get("data")
        current.clear()
        current["data"] = data
        model = original(precision, stem, backend, profile, fp32, tol, ctx, work)
        if "art" not in current:
            return model
        art, contract = current["art"], current["contract"]
        raw = model_input.contract_for(model_input.RAW, contract)
        h, w = raw["input_size"]
        probe = np.stack([np.broadcast_to(np.asarray(p, np.uint8), (h, w, 3)) for pair in PAIRS for p in pair])
        for choice in first_layer.CHOICES:
            first_layer.FIRST_LAYER = choice
            try:
                pix = wrapped[type(backend)](backend, art, contract, work, f"{stem}.{choice}")
            finally:
                first_layer.FIRST_LAYER = first_layer.FOLD
            runner = backends.runner(backend, pix, raw, ctx.prepared.dataset.classes, profile)
            p = runner.logits(probe)
            row = {"data": current["data"], "target": profile.name, "chosen": art.meta.get("candidate",
                                                                                            art.meta.get("quantizer")),
                   "option": choice, "shipped": choice == first_layer.FOLD,
                   "black_differs": not np.array_equal(p[0], p[1]), "white_differs": not np.array_equal(p[2], p[3]),
                   "val": _judge(runner, model_input.view(ctx.search.val_x, raw), ctx.search.val_reference,
                                 ctx.search.val_y),
                   "test": _judge(runner, model_input.view(ctx.gate.x, raw), ctx.gate.reference, ctx.gate.y)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        return model

    wrapped = {}
    for cls in {type(backends.get(_load(n))) for n in ("cpu", "openvino")}:
        wrapped[cls] = cls.with_raw_input

        def spy(self, art, contract, workdir, stem, _orig=cls.with_raw_input):
            if "int8" in art.kind:
                current.update(art=art, contract=contract)
            return _orig(self, art, contract, workdir, stem)

        cls.with_raw_input = spy
    target.make_model = make_model

    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"digits": (write_digits(tmp / "digits"), ["--image-size", "128"]),
                "hard": (write_hard_digits(tmp / "hard"), ["--image-size", "64"]), "shapes": (None, [])}
        profiles = [p for base in ("cpu", "openvino") for v in a.variants.split(",") if v
                    if (p := _profile(base, v, tmp))]
        targets = ["--target", "cpu", "--target", "cpu-arm64", "--target", "openvino",
                   *[x for p in profiles for x in ("--target", str(p))]]
        for data in a.data.split(","):
            folder, extra = sets[data]
            current["data"] = data
            recipe = tmp / "recipe.toml"
            recipe.write_text(f'[quantize]\neffort = "{a.effort}"\n' if a.effort else "")
            args = ["build", str(recipe), "-q", "--json", "--backbone", a.backbone, "--seed", "0", *extra, *targets,
                    "--out", str(tmp / f"out-{data}")] + (["--data", str(folder)] if folder else [])
            _run(cli, args, current, data)
    print("\n| data | target | chosen | first layer | val agr | val logit MSE | test agr | test logit MSE | "
          "test acc | black/white differ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v, t = r["val"], r["test"]
        print(f"| {r['data']} | {r['target']} | `{r['chosen']}` | {r['option']}{' (ships)' if r['shipped'] else ''} | "
              f"{v['agreement']:.4f} | {v['mse']:.5f} | {t['agreement']:.4f} | {t['mse']:.5f} | {t['accuracy']:.4f} | "
              f"{'yes' if r['black_differs'] else 'NO'}/{'yes' if r['white_differs'] else 'NO'} |")
    if a.json:
        a.json.write_text(json.dumps({"machine": m, "rows": rows}, indent=1))


def _load(name):
    from edgetl.profiles import load_profile

    return load_profile(name)


def _run(cli, args, current, data) -> None:
    try:
        cli.main(args, standalone_mode=False)
    except SystemExit as e:  # exit 1: a gate missed (the rows are still measured)
        if e.code not in (0, 1, None):
            raise
    current["data"] = data


if __name__ == "__main__":
    main()

"""The build report from hand-made results (no model builds): bounds, speed, changed predictions, plots."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import charts, report
from edgetl.results import BuildResult, ModelResult, TargetResult

CLASSES = ["cat", "dog", "fox"]
REF_CONFUSION = [[70, 4, 2], [3, 71, 2], [1, 2, 71]]


def FakeTarget(target: str, published: bool, models: list[dict], misses=(), warnings=()) -> TargetResult:  # noqa: N802
    """A target as the pipeline records it, from report.json-shaped model entries."""
    return TargetResult(target, published, models=[ModelResult.from_dict(m) for m in models], misses=list(misses),
                        warnings=list(warnings))


def FakeResult(targets: list[TargetResult], reference: dict, ok: bool = True) -> BuildResult:  # noqa: N802
    """A build result with what report.py reads (no model built)."""
    return BuildResult(ok=ok, out="/tmp/out", targets=targets, data={"classes": CLASSES}, training={},
                       timings={"total": 12.5}, recipe={}, reference=reference,
                       machine={"cpu": "test cpu", "cores": 4})


def _metrics(**given) -> dict:
    """Gate metrics as report.json carries them: the given figures over neutral defaults."""
    return {"n_test": 228, "reference_accuracy": 0.9649, "accuracy": 0.9561, "accuracy_drop_pp": 0.8772,
            "accuracy_drop_ci95_pp": [0.0, 1.8], "top1_agreement": 0.9693, "logits_cosine_mean": 0.99,
            "logits_cosine_min": 0.9, "sqnr_db": 20.0, **given}


def _image(path: Path, size=(200, 150), colour=(200, 30, 30)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _model(precision: str, changed: list[dict], *, speed=None, quantization=None, confusion=None) -> dict:
    return {
        "precision": precision, "files": [], "misses": [], "latency_ms": 1.25, "validated_with": "ORT CPU",
        "sizes": {"model_bytes": 3_500_000}, "quantization": quantization, "speed": speed or {},
        "metrics": _metrics(drop_upper95_pp=1.7097, agreement_lower95=0.94501,
                            per_class=[{"class": "dog", "n": 76, "reference_recall": 0.93, "recall": 0.91,
                                        "change_pp": -2.0}],
                            confusion=confusion or [[69, 5, 2], [3, 70, 3], [1, 2, 71]], changed=changed),
    }


SPEED = {"baseline": "fp32 via ORT CPU", "method": "interleaved medians",
         "batch_8": {"ms": 4.0, "fp32_ms": 8.04, "ratio": 2.01}, "batch_1": {"ms": 1.0, "fp32_ms": 1.57, "ratio": 1.57}}


@pytest.fixture
def result(tmp_path) -> BuildResult:
    good = _image(tmp_path / "cat_01.png")
    other = _image(tmp_path / "dog 02.jpg", (40, 300), (30, 30, 200))
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really")
    int8 = _model("int8", [
        {"index": 3, "label": 0, "reference": 0, "predicted": 1, "file": good},
        {"index": 7, "label": 1, "reference": 1, "predicted": 2, "file": other},
        {"index": 9, "label": 2, "reference": 2, "predicted": 0, "file": str(tmp_path / "gone" / "moved.png")},
        {"index": 12, "label": 2, "reference": 1, "predicted": 0, "file": str(corrupt)},
    ], speed=SPEED, quantization={"chosen": "ptq", "attempts": [], "float_nodes": ["/head/Gemm", "/stem/Conv"]})
    fp16 = _model("fp16", [{"index": 7, "label": 1, "reference": 1, "predicted": 0, "file": other}])
    reference = {"accuracy": 0.9649, "n_test": 228, "fp32_onnx_bytes": 9_000_000, "latency_ms": 2.0,
                 "latency_measured_with": "ORT CPU", "confusion": REF_CONFUSION}
    return FakeResult([FakeTarget("cpu", True, [int8]), FakeTarget("gpu", True, [fp16])], reference)


def _thumbs(page: str) -> list[str]:
    return re.findall(r'<figure class="changed"><img [^>]*src="data:image/png;base64,([^"]+)"', page)


def test_table_shows_bounds_speed_and_float_layers(result):
    ref, int8, fp16 = report.cells(result)
    h = report.HEADER
    col = {name: h.index(name) for name in h}
    assert int8[col["drop (pp; 95 % upper bound)"]] == "+0.88 (≤ +1.71)"
    assert int8[col["agreement (95 % lower bound)"]] == "0.9693 (≥ 0.9450)"
    assert int8[col[report.SPEED]] == "1.57x b1, 2.01x b8"  # ordered by batch, non-batch keys ignored
    assert int8[col["float layers"]] == "2" and fp16[col["float layers"]] == "-"
    assert fp16[col[report.SPEED]] == "-"  # no speed recorded
    # the float reference is no target's speed baseline, and its timing is labelled as its own
    assert ref[col[report.SPEED]] == "-" and ref[col["drop (pp; 95 % upper bound)"]] == "+0.00"
    assert ref[col["measured with"]] == "ORT CPU; float input, timed during gating"
    assert int8[col["measured with"]] == "ORT CPU" and int8[col[report.LATENCY]] == "1.25"
    assert all(len(row) == len(h) for row in (ref, int8, fp16))


def test_markdown_table_and_changed_files(result):
    md = report.markdown(result)
    assert "| cpu int8 | 0.9561 | +0.88 (≤ +1.71) | 0.9693 (≥ 0.9450) |" in md
    assert "1.57x b1, 2.01x b8" in md and "1.00x" not in md
    assert "### Changed predictions: cpu int8: 4 of 228 test images" in md
    assert f"- `{result.targets[0].models[0].metrics.changed[0]['file']}` true cat: float cat → int8 dog" in md
    assert "true dog: float dog → fp16 cat" in md
    for c in result.targets[0].models[0].metrics.changed:
        assert f"`{c['file']}`" in md
    for line in md.splitlines():
        if line.startswith("| "):
            assert line.count(" | ") == len(report.HEADER) - 1


def test_html_thumbnails_captions_and_difference_plots(result, tmp_path):
    out = tmp_path / "report"
    report.write(out, result)
    page = (out / "report.html").read_text()
    thumbs = _thumbs(page)
    assert len(thumbs) == 3  # int8: 2 readable (1 moved, 1 corrupt); fp16: 1
    for b64 in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert max(im.size) <= 96 and im.mode == "RGB"
    assert "true: cat · float: cat → int8: dog" in page and "true: dog · float: dog → fp16: cat" in page
    # unreadable files: a grey placeholder and the path, never a failed report
    assert page.count('<div class="missing"') == 2
    assert "gone/moved.png (file not found)" in page and "broken.png (not an image Pillow can read)" in page
    assert "true: fox · float: fox → int8: cat" in page and "true: fox · float: dog → int8: cat" in page
    # one absolute matrix (the float reference), one difference per model
    assert page.count('alt="confusion: ') == 1 and 'alt="confusion: float reference (FP32)"' in page
    assert page.count('alt="confusion difference: ') == 2
    assert 'alt="confusion difference: cpu int8 − float reference"' in page
    assert "+0.88 (≤ +1.71)" in page and "1.57x b1, 2.01x b8" in page
    assert json.loads((out / "report.json").read_text())["targets"][0]["models"][0]["metrics"]["changed"]
    assert "cat_01.png" in (out / "report.md").read_text()


def test_changed_images_are_capped(result, tmp_path):
    img = _image(tmp_path / "same.png", (20, 20))
    changed = [{"index": i, "label": 0, "reference": 0, "predicted": 1, "file": img} for i in range(75)]
    result.targets[0].models[0].metrics.changed = changed
    page = report.html_page(result, {})
    assert len(_thumbs(page)) == 61  # 60 for cpu int8 + 1 for gpu fp16
    assert "and 15 more (report.json lists all)" in page
    md = report.markdown(result)
    assert md.count("`" + img + "`") == 20 and "and 55 more (report.json lists all)" in md


def test_failed_and_crashed_targets_without_speed_or_reference_matrix(tmp_path):
    """A model that missed its gate (no speed measured, no quantization record, no changed list), a target
    that crashed (no model), and a reference row without a confusion matrix."""
    old = {"precision": "int8", "misses": ["int8: accuracy drop 3.00 pp > 1 pp"], "latency_ms": 1.0,
           "validated_with": "ORT CPU", "sizes": {"model_bytes": 1_000_000}, "quantization": None,
           "metrics": _metrics(accuracy=0.9, accuracy_drop_pp=3.0, drop_upper95_pp=3.5, top1_agreement=0.95,
                               n_test=100, confusion=[[30, 3, 0], [0, 33, 0], [0, 0, 34]])}
    failed = FakeTarget("cpu", False, [old], misses=old["misses"])
    crashed = FakeTarget("openvino", False, [], misses=["internal error: boom"])
    result = FakeResult([failed, crashed], {"accuracy": 0.93, "n_test": 100}, ok=False)
    ref, row = report.cells(result)
    assert row[2] == "+3.00 (≤ +3.50)" and row[3] == "0.9500 (≥ 0.0000)"
    assert row[5] == "-" and row[6] == "-" and row[-1] == "FAILED"
    report.write(tmp_path, result)
    page = (tmp_path / "report.html").read_text()
    assert "Changed predictions" not in page and "SOME TARGETS FAILED" in page
    assert 'alt="confusion: cpu int8"' in page  # nothing to subtract: the model's own matrix
    assert "Changed predictions" not in (tmp_path / "report.md").read_text()


def test_changed_entry_without_a_file(result):
    entry = {"index": 5, "label": np.int64(0), "reference": 0, "predicted": 2}  # numpy ints name classes too
    result.targets[1].models[0].metrics.changed = [entry]
    page = report.html_page(result, {})
    assert "test image #5" in page and "true: cat · float: cat → fp16: fox" in page
    assert "test image #5 true cat: float cat → fp16 fox" in report.markdown(result)


def test_a_failing_plot_or_thumbnail_never_costs_the_report(result, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(charts, "_matrix", boom)
    monkeypatch.setattr(report, "thumbnail", boom)
    report.write(tmp_path, result)
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," not in page and page.count('<div class="missing"') == 5
    assert "no display" in page  # the reason is shown next to the path


def test_difference_plot_is_centred_on_zero(result, monkeypatch):
    seen = []
    real = charts._matrix

    def spy(plt, matrix, classes, title, *, difference):
        seen.append((difference, [list(map(int, row)) for row in matrix]))
        return real(plt, matrix, classes, title, difference=difference)

    monkeypatch.setattr(charts, "_matrix", spy)
    images = report.plots(result)
    assert [d for d, _ in seen] == [False, True, True]
    assert seen[0][1] == REF_CONFUSION
    assert seen[1][1] == [[-1, 1, 0], [0, -1, 1], [0, 0, 0]]  # model minus reference
    assert len(images) == 4  # reference matrix, two differences, the accuracy/latency/size plot
    # the scale: symmetric around zero for a difference (so white means "no change"), 0..max for counts
    assert charts.colour_limits(seen[1][1], difference=True) == (-1, 1)
    assert charts.colour_limits([[0, -5], [2, 0]], difference=True) == (-5, 5)
    assert charts.colour_limits([[0, 0], [0, 0]], difference=True) == (-1, 1)
    assert charts.colour_limits(REF_CONFUSION, difference=False) == (0, 71)


def test_class_names_are_never_tex(result, tmp_path):
    result.data["classes"] = ["$\\frac$", "a|b", "<x>"]
    report.write(tmp_path, result)
    page = (tmp_path / "report.html").read_text()
    assert page.count('alt="confusion difference: ') == 2 and "<x>" not in page
    assert "true: $\\frac$ · float: $\\frac$ → int8: a|b" in page


def test_built_report_says_which_timing_is_which(built):
    """The shared build's report.md: both timing columns labelled, the float reference's latency said
    to be its own measurement, and every model's latency the speed evidence's batch-1 time."""
    md = (built["out"] / "report.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert f"| {report.SPEED} |" in header and f"| {report.LATENCY} |" in header
    ref_row = next(line for line in md.splitlines() if line.startswith("| float reference"))
    assert "float input, timed during gating" in ref_row and "1.00x" not in ref_row
    assert "not the FP32 time the speed column divides by" in md
    built_report = json.loads((built["out"] / "report.json").read_text(encoding="utf-8"))
    models = [m for t in built_report["targets"] for m in t["models"]]
    assert models and all(m["latency_ms"] == m["speed"]["batch_1"]["ms"] > 0 for m in models)

"""The build report: OUT/report.json (everything), OUT/report.md (the parity table) and
OUT/report.html (table + confusion matrices + accuracy/latency/size plot, PNGs embedded)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def rows(result) -> list[dict]:
    """The parity table: the float reference, then every model of every target."""
    ref = result.reference
    out = [{"name": "float reference (FP32)", "target": "-", "precision": "fp32", "accuracy": ref.get("accuracy"),
            "drop_pp": 0.0, "agreement": 1.0, "size_mb": _mb(ref.get("fp32_onnx_bytes")),
            "latency_ms": ref.get("latency_ms"), "validated_with": ref.get("latency_measured_with", ""),
            "status": "reference", "per_class": [], "confusion": ref.get("confusion", [])}]
    for t in result.targets:
        for m in t.models:
            met = m["metrics"]
            out.append({"name": f"{t.target} {m['precision']}", "target": t.target, "precision": m["precision"],
                        "accuracy": met["accuracy"], "drop_pp": met["accuracy_drop_pp"],
                        "agreement": met["top1_agreement"], "size_mb": _mb(m["sizes"]["model_bytes"]),
                        "latency_ms": m["latency_ms"], "validated_with": m["validated_with"],
                        "status": "FAILED" if m["misses"] else ("published" if t.published else "not published"),
                        "per_class": met["per_class"], "confusion": met["confusion"]})
    return out


def _mb(n) -> float | None:
    return None if n is None else round(n / 1e6, 3)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = ["model", "top-1 accuracy", "drop (pp)", "agreement", "per-class recall change (pp, worst)", "size (MB)",
          "latency b=1 (ms)", "measured with", "status"]


def cells(result) -> list[list[str]]:
    """The parity table as text cells (one list per row), shared by the Markdown and HTML reports."""
    out = []
    for r in rows(result):
        worst = min(r["per_class"], key=lambda c: c["change_pp"], default=None)
        out.append([r["name"], _fmt(r["accuracy"], ".4f"), _fmt(r["drop_pp"], "+.2f"), _fmt(r["agreement"], ".4f"),
                    f"{worst['change_pp']:+.1f} ({worst['class']})" if worst else "-", _fmt(r["size_mb"], ".2f"),
                    _fmt(r["latency_ms"], ".2f"), r["validated_with"], r["status"]])
    return out


def notes(result) -> list[str]:
    lines = [f"`{t.target}` failed: {miss}" for t in result.targets if not t.published for miss in t.misses]
    lines += [f"`{t.target}`: {w}" for t in result.targets if not t.published for w in t.warnings]
    m = result.machine
    lines.append(f"n_test = {result.reference.get('n_test')}; latency: median of 30 batch-1 runs during the build on "
                 f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), through the runtime that validated the model "
                 "— use `edgetl bench` for careful numbers.")
    return lines


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def markdown(result) -> str:
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(_md(c) for c in row) + " |" for row in cells(result)]
    failed = [t for t in result.targets if not t.published]
    text = "\n".join(table) + "\n"
    if failed:
        text += "\nFailed targets (nothing published for them):\n\n" + "".join(
            f"- `{t.target}`: {_md(line)}\n" for t in failed for line in [*t.misses, *t.warnings])
    return text + "\n" + _md(notes(result)[-1]) + "\n"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(result) -> dict[str, str]:
    """name -> base64 PNG: one confusion matrix per row and the accuracy/latency/size scatter."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: report.html has no plots (pip install matplotlib)")
        return {}
    with matplotlib.rc_context({"text.parse_math": False}):  # class names are text, never TeX ("$x$")
        return _plots(result, plt)


def _plots(result, plt) -> dict[str, str]:
    classes = result.data["classes"]
    out = {}
    for r in rows(result):
        if not r["confusion"]:
            continue
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(classes), 1.0 + 0.5 * len(classes)))
        ax.imshow(r["confusion"], cmap="Blues")
        for i, row in enumerate(r["confusion"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(r["name"], fontsize=9)
        out[f"confusion: {r['name']}"] = _png(fig)
        plt.close(fig)
    pts = [r for r in rows(result) if r["latency_ms"] is not None and r["accuracy"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        sizes = [max(r["size_mb"] or 0.1, 0.1) for r in pts]
        ax.scatter([r["latency_ms"] for r in pts], [r["accuracy"] for r in pts], s=[60 * s for s in sizes],
                   c=["tab:red" if r["status"] == "FAILED" else "tab:blue" for r in pts], alpha=0.6)
        for r, s in zip(pts, sizes, strict=True):
            ax.annotate(f"{r['name']}\n{s:.1f} MB", (r["latency_ms"], r["accuracy"]), fontsize=7,
                        xytext=(5, 5), textcoords="offset points")
        ax.set_xlabel("latency, batch 1 (ms, build machine, through the validating runtime)")
        ax.set_ylabel("top-1 accuracy (test split)")
        ax.set_title("accuracy vs latency (marker area ~ model size)", fontsize=9, pad=12)
        ax.margins(x=0.2, y=0.25)
        out["accuracy vs latency vs size"] = _png(fig)
        plt.close(fig)
    return out


def html_page(result, images: dict[str, str]) -> str:
    esc = html.escape
    thead = "".join(f"<th>{esc(c)}</th>" for c in HEADER)
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells(result))
    paragraphs = "".join(f"<p>{esc(line)}</p>" for line in notes(result))
    figs = "".join(f'<figure><img alt="{esc(k)}" src="data:image/png;base64,{v}">'
                   f"<figcaption>{esc(k)}</figcaption></figure>" for k, v in images.items())
    status = "all targets passed" if result.ok else "SOME TARGETS FAILED"
    css = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:4px 8px;font-size:13px}figure{display:inline-block;margin:8px}")
    title = f"edgetl build report: {status}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{css}</style></head><body><h1>{esc(title)}</h1>"
            f"<p>{esc(result.out)} · total {result.timings.get('total', 0):.1f} s</p>"
            f"<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>{paragraphs}{figs}</body></html>\n")


def write(out: Path, result) -> None:
    """Write the three report files (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)

    put("report.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    put("report.md", "# edgetl build report\n\n" + markdown(result))
    try:
        images = plots(result)
    except Exception as e:  # a plot must never cost the report
        log.warning("report.html without plots: %s: %s", type(e).__name__, e)
        images = {}
    put("report.html", html_page(result, images))

"""The build report: OUT/report.json (everything), OUT/report.md (the parity table, the changed
predictions by how they moved) and OUT/report.html (table, the float reference's confusion matrix, each model's
confusion difference from it, the accuracy/latency/size plot and a thumbnail of every test image
whose prediction changed; PNGs embedded)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import numbers
import re
from pathlib import Path

from . import budget_report

log = logging.getLogger(__name__)


def rows(result) -> list[dict]:
    """The parity table: the float reference, then every model of every target (typed `ModelResult`s)."""
    ref = result.reference
    out = [{"name": "float reference (FP32)", "target": "-", "precision": "fp32", "accuracy": ref.get("accuracy"),
            "accuracy_drop_pp": 0.0, "drop_upper95_pp": None, "top1_agreement": 1.0, "agreement_lower95": None,
            "speed": "-", "float_layers": None, "size_mb": _mb(ref.get("fp32_onnx_bytes")),  # no target's baseline
            "latency_ms": ref.get("latency_ms"), "validated_with": _reference_timing(ref),
            "status": "reference", "per_class": [], "confusion": ref.get("confusion", []), "changed": [],
            "n_test": ref.get("n_test")}]
    for t in result.targets:
        for m in t.models:
            met, q = m.metrics, m.quantization
            out.append({"name": f"{t.target} {m.precision}", "target": t.target, "precision": m.precision,
                        "accuracy": met.accuracy, "accuracy_drop_pp": met.accuracy_drop_pp,
                        "drop_upper95_pp": met.drop_upper95_pp, "top1_agreement": met.top1_agreement,
                        "agreement_lower95": met.agreement_lower95, "speed": _speed(m.speed),
                        "float_layers": len(q.float_nodes) if q and m.precision == "int8" else None,
                        "size_mb": _mb(m.sizes.get("model_bytes")), "latency_ms": m.latency_ms,
                        "validated_with": m.validated_with,
                        "status": m.status(t.published),
                        "per_class": met.per_class, "confusion": met.confusion, "changed": met.changed,
                        "n_test": met.n_test})
    return out


def _reference_timing(ref: dict) -> str:
    """What timed the float reference, said apart from the models' speed evidence (the legend explains)."""
    ran = ref.get("latency_measured_with", "")
    return f"{ran}; float input, timed during gating" if ran else ""


def _mb(n) -> float | None:
    return None if n is None else round(n / 1e6, 3)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _speed(speed) -> str:
    """{"batch_1": {"ratio": 1.57, ...}, "batch_8": {...}, ...} -> "1.57x b1, 2.01x b8" ("-" if unknown)."""
    if not isinstance(speed, dict):
        return "-"
    found = []
    for key, v in speed.items():
        n = key.removeprefix("batch_")
        if key.startswith("batch_") and n.isdigit() and isinstance(v, dict) and v.get("ratio") is not None:
            found.append((int(n), f"{v['ratio']:.2f}x b{n}"))
    return ", ".join(text for _, text in sorted(found)) or "-"


def _with_bound(value, spec: str, bound, sign: str) -> str:
    """"+0.88 (≤ +2.10)": a point estimate and its one-sided 95 % bound (just the estimate if no bound)."""
    text = _fmt(value, spec)
    return text if value is None or bound is None else f"{text} ({sign} {format(bound, spec)})"


# The two timing columns answer different questions: SPEED compares a model with its own target's FP32
# model on the same runtime; LATENCY is its time on its own runtime, so rows compare runtimes too.
SPEED = "speed vs FP32 (same runtime)"
LATENCY = "latency b=1 (ms, own runtime)"
HEADER = ["model", "top-1 accuracy", "drop (pp; 95 % upper bound)", "agreement (95 % lower bound)",
          "per-class recall change (pp, worst)", SPEED, "float layers", "size (MB)", LATENCY,
          "measured with", "status"]


def cells(result) -> list[list[str]]:
    """The parity table as text cells (one list per row), shared by the Markdown and HTML reports."""
    out = []
    for r in rows(result):
        judged = [c for c in r["per_class"] if c.get("judged", True)]
        worst = min(judged or r["per_class"], key=lambda c: c["change_pp"], default=None)  # judged ones first
        unjudged = len(r["per_class"]) - len(judged)
        out.append([r["name"], _fmt(r["accuracy"], ".4f"),
                    _with_bound(r["accuracy_drop_pp"], "+.2f", r["drop_upper95_pp"], "≤"),
                    _with_bound(r["top1_agreement"], ".4f", r["agreement_lower95"], "≥"),
                    (f"{worst['change_pp']:+.1f} ({worst['class']})" if worst else "-")
                    + (f"; {unjudged} class(es) too small to judge" if unjudged else ""), r["speed"],
                    _fmt(r["float_layers"], "d"), _fmt(r["size_mb"], ".2f"), _fmt(r["latency_ms"], ".2f"),
                    r["validated_with"], r["status"]])
    return out


def notes(result) -> list[str]:
    """Failed targets' misses and warnings, published targets' warnings (NOT CERTIFIED among them),
    then the legend of the table."""
    lines = [f"`{t.target}` failed: {miss}" for t in result.targets if not t.published for miss in t.misses]
    lines += [f"`{t.target}`: {w}" for t in result.targets if not t.published for w in t.warnings]
    lines += [f"`{t.target}` ({t.status}): {w}" for t in result.targets if t.published for w in t.warnings]
    return lines + legend(result)


def legend(result) -> list[str]:
    """The lines under the parity table: bounds, rules, speed, per-model evidence, training."""
    m = result.machine
    return [*(f"Data warning: {w}" for w in result.data.get("warnings", [])),
        "In brackets: one-sided 95 % bounds on the test split — the drop is at most (≤) its bound (paired, "
        "unconditional: Tango's score bound with a half-image continuity correction, coverage >= 0.94 simulated, "
        "docs/gate-statistics.md), the agreement at least (≥) its bound (Clopper-Pearson). The gate's drop rule "
        "(recipe gate.rule, per model below): 'point' (the drop itself within the tolerance) or 'evidence' (a "
        "miss when the drop exceeds the tolerance by more than one test image or its lower bound is above the "
        "tolerance); 'auto' takes 'point' when one test image is worth at most half the tolerance. Under every "
        "rule a model whose upper bound is above the tolerance is 'published, NOT CERTIFIED' (a miss with "
        "gate.require_certified / --require-certified).",
        "The INT8 search judges agreement on the val images and seeded augmented views of them (never test); "
        "the first candidate that passes the gate's rule on val and meets the search target (overall and on "
        "clear images) ships, else the best agreement that passes the gate, with 'search target not met'; "
        "recipe quantize.effort says which candidates run (docs/search.md).",
        *model_lines(result),
        f"{SPEED}: the time of the target's own FP32 model over this model's, through the same runtime on the "
        "same pixels, at batch 1 (b1) and a larger batch, interleaved medians (above 1x is faster); it never "
        "compares runtimes. float layers: compute layers the INT8 model keeps in float.",
        f"n_test = {result.reference.get('n_test')}; {LATENCY}: each model's median batch-1 time through its own "
        f"runtime ('measured with'), timed alone after gating on {m.get('cpu', '?')} ({m.get('cores', '?')} "
        "cores): rows of different runtimes or input types compare those too. The float reference's latency is "
        "its FP32 ONNX with float input on onnxruntime's CPU provider, timed once during gating (idle engine "
        "threads asleep; under --jobs beside other targets): a rough figure, not the FP32 time the speed column "
        "divides by (report.json: speed.batch_1.fp32_ms) — use `edgetl bench` for careful numbers.",
    ] + _training_line(getattr(result, "training", None) or {})


def margin_line(by_margin) -> str:
    """"agreement 0.998 on 540 clear images, 0.91 on 60 borderline (margin < 0.2)"."""
    if not isinstance(by_margin, dict) or "clear" not in by_margin:
        return ""
    c, b = by_margin["clear"], by_margin["borderline"]
    fmt = lambda part: "-" if part.get("agreement") is None else f"{part['agreement']:.4f}"  # noqa: E731
    return (f"agreement {fmt(c)} on {c['n']} clear images, {fmt(b)} on {b['n']} borderline "
            f"(float top-1 minus top-2 probability < {by_margin.get('threshold', 0.2):g})")


def model_lines(result) -> list[str]:
    """Per model: agreement split by the float model's margin, the gate rule applied, the search's choice."""
    lines = []
    for t in result.targets:
        for m in t.models:
            met, q = m.metrics, m.quantization
            parts = [p for p in (margin_line(met.agreement_by_margin),) if p]
            if m.takes_pixels:
                parts.insert(0, "takes uint8 NHWC pixels (normalisation inside the model; gated so)")
            if met.gate_rule:
                parts.append(f"gate rule {met.gate_rule['applied']}" + (
                    "" if m.certified is not False else " (NOT CERTIFIED: see the warnings)"))
            chosen = next((a for a in q.attempts if a["quantizer"] == q.chosen), None) if q else None
            if chosen and chosen.get("evidence"):
                ev = chosen["evidence"]
                lo, hi = ev["agreement_ci95"]
                clear = ev.get("clear_agreement")
                parts.append(f"search chose {q.chosen}: agreement {ev['top1_agreement']:.4f} "
                             f"[{lo}, {hi}]" + ("" if clear is None else f", {clear:.4f} on clear images")
                             + f" on {ev['comparisons']} val comparisons ({ev['images']} images x "
                             f"{ev['views_per_image']} views)")
            if parts:
                lines.append(f"{t.target} {m.precision}: " + "; ".join(parts) + ".")
    return lines


def _training_line(tr: dict) -> list[str]:
    """Where the model trained and how many feature rows the cache gave."""
    if "device" not in tr:
        return []
    line = (f"Trained on {tr['device']} ({tr.get('processes', 1)} process(es), {tr.get('workers', 0)} decoding "
            "worker(s))")
    fc = tr.get("feature_cache")
    if fc and fc.get("enabled"):
        line += (f"; feature cache: {fc['hits']} of {fc['rows']} rows read, {fc['computed']} computed "
                 f"({fc['dir']})")
    elif fc:
        line += f"; feature cache off: {fc['rows']} rows computed"
    return [line + "."]


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _md_code(text: str) -> str:
    """`text` as a Markdown code span, whatever backticks it holds."""
    text = str(text).replace("\n", " ")
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


MD_CHANGED_CAP = 20
HTML_CHANGED_CAP = 60
THUMB_PX = 96


def _class(classes, i) -> str:
    """Class `i`'s name (its index as text when it has none)."""
    return str(classes[i]) if isinstance(i, numbers.Integral) and 0 <= i < len(classes) else str(i)


def _changed_rows(result) -> list[dict]:
    """Model rows with at least one test image whose top-1 differs from the float reference's."""
    return [r for r in rows(result)[1:] if r["changed"]]


def _changed_title(r: dict) -> str:
    n = f" of {r['n_test']}" if r["n_test"] is not None else ""
    return f"{r['name']}: {len(r['changed'])}{n} test images predicted differently from the float reference"


def markdown_changed(result) -> str:
    """report.md's changed predictions, per model, grouped by how they moved."""
    classes = (result.data or {}).get("classes") or []
    text = ""
    for r in _changed_rows(result):
        text += f"\n### Changed predictions: {_md(_changed_title(r))}\n"
        for kind, items in grouped(r["changed"]):
            text += f"\n#### {_md(kind)} ({len(items)})\n\n"
            for c in items[:MD_CHANGED_CAP]:
                where = _md_code(c["file"]) if c.get("file") else f"test image #{c.get('index', '?')}"
                text += (f"- {where} true {_md(_class(classes, c.get('label')))}: "
                         f"float {_md(_class(classes, c.get('reference')))} → "
                         f"{_md(r['precision'])} {_md(_class(classes, c.get('predicted')))}\n")
            if len(items) > MD_CHANGED_CAP:
                text += f"- and {len(items) - MD_CHANGED_CAP} more (report.json lists all)\n"
    return text


def grouped(changed: list[dict]) -> list[tuple[str, list[dict]]]:
    """Changed predictions by how they moved: right → wrong, wrong → right, wrong → other wrong."""
    from .parity import FLIP_KINDS, flip_kind

    def kind(c):  # older reports have no "kind": derive it; a damaged entry is just "changed"
        try:
            return c["kind"] if c.get("kind") in FLIP_KINDS else flip_kind(c["label"], c["reference"], c["predicted"])
        except (KeyError, TypeError):
            return "changed"

    groups: dict[str, list[dict]] = {k: [] for k in (*FLIP_KINDS, "changed")}
    for c in changed:
        groups[kind(c)].append(c)
    return [(k, items) for k, items in groups.items() if items]


def markdown(result) -> str:
    """report.md: the parity table, failed targets, the legend, the changed predictions."""
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(_md(c) for c in row) + " |" for row in cells(result)]
    failed = [t for t in result.targets if not t.published]
    text = "\n".join(table) + "\n"
    if failed:
        text += "\nFailed targets (nothing published for them):\n\n" + "".join(
            f"- `{t.target}`: {_md(line)}\n" for t in failed for line in [*t.misses, *t.warnings])
    warned = [t for t in result.targets if t.published and t.warnings]
    if warned:
        text += "\nWarnings of published targets:\n\n" + "".join(
            f"- `{t.target}` ({_md(t.status)}): {_md(w)}\n" for t in warned for w in t.warnings)
    text += "\n" + "".join(f"{_md(line)}\n\n" for line in legend(result))
    text += budget_report.markdown(getattr(result, "search", None))
    try:
        text += markdown_changed(result)
    except Exception as e:  # the list is a debugging aid: it must never cost the report
        log.warning("report.md without the changed predictions: %s: %s", type(e).__name__, e)
    return text.rstrip("\n") + "\n"


def plots(result) -> dict[str, str]:
    """name -> base64 PNG (charts.py): the float reference's confusion matrix, each model's difference
    from it, the accuracy/latency/size scatter."""
    from . import charts

    images = charts.plots(rows(result), result.data["classes"])
    if getattr(result, "search", None):  # the budget search's Pareto plot (its own section)
        images.update(charts.budget_plot(result.search))
    return images


def thumbnail(path) -> str:
    """A test image as a base64 PNG of at most THUMB_PX px a side (raises if it cannot be read)."""
    from .runtime.preprocess import load_rgb

    img = load_rgb(path)
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def changed_html(result) -> str:
    """Per model, a captioned thumbnail of every test image whose top-1 changed (capped)."""
    esc = html.escape
    classes = (result.data or {}).get("classes") or []
    root = (result.data or {}).get("root")
    cache: dict[str, tuple[str | None, str]] = {}
    sections = []
    for r in _changed_rows(result):
        groups = []
        for kind, items in grouped(r["changed"]):
            figs = [_figure(c, r, classes, root, cache) for c in items[:HTML_CHANGED_CAP]]
            more = (f"<p>and {len(items) - HTML_CHANGED_CAP} more (report.json lists all)</p>"
                    if len(items) > HTML_CHANGED_CAP else "")
            groups.append(f"<h4>{esc(kind)} ({len(items)})</h4><div>{''.join(figs)}</div>{more}")
        sections.append(f"<h3>{esc(_changed_title(r))}</h3>{''.join(groups)}")
    if not sections:
        return ""
    return "<h2>Changed predictions</h2>" + "".join(sections)


def _figure(c: dict, r: dict, classes, root, cache: dict) -> str:
    """One changed test image: thumbnail (or a blank box when its file cannot be read) and caption."""
    esc = html.escape
    file = str(c["file"]) if c.get("file") else None
    caption = (f"true: {_class(classes, c.get('label'))} · float: {_class(classes, c.get('reference'))} "
               f"→ {r['precision']}: {_class(classes, c.get('predicted'))}")
    if file and file not in cache:
        full = Path(root, file) if root and not Path(file).is_absolute() else Path(file)  # data-relative
        try:
            cache[file] = (thumbnail(full), Path(file).name)
        except Exception as e:  # a moved or unreadable image must never cost the report
            reason = (str(e) or type(e).__name__) if full.exists() else "file not found"
            cache[file] = (None, f"{file} ({reason})")
    data, where = cache[file] if file else (None, f"test image #{c.get('index', '?')} (no file recorded)")
    pic = (f'<img alt="{esc(caption)}" title="{esc(file)}" src="data:image/png;base64,{data}">' if data else
           f'<div class="missing" title="{esc(where)}"></div>')
    return (f'<figure class="changed">{pic}<figcaption>{esc(caption)}<br>'
            f"<small>{esc(where)}</small></figcaption></figure>")


def html_page(result, images: dict[str, str]) -> str:
    """report.html: the table, notes, plots and changed images, self-contained."""
    esc = html.escape
    thead = "".join(f"<th>{esc(c)}</th>" for c in HEADER)
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells(result))
    paragraphs = "".join(f"<p>{esc(line)}</p>" for line in notes(result))
    figs = "".join(f'<figure><img alt="{esc(k)}" src="data:image/png;base64,{v}">'
                   f"<figcaption>{esc(k)}</figcaption></figure>" for k, v in images.items()
                   if k != budget_report.PLOT)
    figs += budget_report.html_section(getattr(result, "search", None), images)
    try:
        changed = changed_html(result)
    except Exception as e:  # a debugging aid: it must never cost the report
        log.warning("report.html without the changed predictions: %s: %s", type(e).__name__, e)
        changed = ""
    status = "all targets passed" if result.ok else "SOME TARGETS FAILED"
    css = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:4px 8px;font-size:13px}figure{display:inline-block;margin:8px;vertical-align:top}"
           f"figure.changed{{width:{THUMB_PX + 64}px;font-size:11px;text-align:center}}"
           f"figure.changed img,.missing{{max-width:{THUMB_PX}px;max-height:{THUMB_PX}px}}"
           f".missing{{width:{THUMB_PX}px;height:{THUMB_PX}px;background:#bbb;margin:auto}}"
           "figure.changed small{color:#666;word-break:break-all}")
    title = f"edgetl build report: {status}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{css}</style></head><body><h1>{esc(title)}</h1>"
            f"<p>{esc(result.out)} · total {result.timings.get('total', 0):.1f} s</p>"
            f"<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>{paragraphs}{figs}{changed}"
            "</body></html>\n")


def write(out: Path, result) -> None:
    """Write the three report files (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out / name)
        finally:  # a full disk or an interrupt leaves no half-written file
            tmp.unlink(missing_ok=True)

    put("report.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    put("report.md", "# edgetl build report\n\n" + markdown(result))
    try:
        images = plots(result)
    except Exception as e:  # a plot must never cost the report
        log.warning("report.html without plots: %s: %s", type(e).__name__, e)
        images = {}
    put("report.html", html_page(result, images))

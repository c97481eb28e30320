"""The report's charts (report.html): confusion matrices and their differences, the accuracy /
latency / size scatter, as base64 PNGs. Input: report.rows() (the float reference first)."""

from __future__ import annotations

import base64
import io
import logging

log = logging.getLogger(__name__)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(table: list[dict], classes: list[str]) -> dict[str, str]:
    """name -> base64 PNG: the float reference's confusion matrix (table[0]), each model's confusion
    difference from it, and the accuracy/latency/size scatter."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: report.html has no plots (pip install matplotlib)")
        return {}
    with matplotlib.rc_context({"text.parse_math": False}):  # class names are text, never TeX ("$x$")
        return _plots(table, classes, plt)


def _matrix(plt, matrix, classes: list[str], title: str, *, difference: bool) -> str:
    """A confusion matrix (Blues) or a difference of two (RdBu centred on 0, zeros faint) as base64 PNG."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    m = np.asarray(matrix, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(classes) + (0.8 if difference else 0), 1.0 + 0.5 * len(classes)))
    lo, lim = colour_limits(m, difference=difference)
    if difference:
        im = ax.imshow(m, cmap="RdBu", vmin=lo, vmax=lim)
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.ax.tick_params(labelsize=7)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    else:
        ax.imshow(m, cmap="Blues", vmin=lo, vmax=lim)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            if difference and v == 0:
                ax.text(j, i, "0", ha="center", va="center", fontsize=7, color="#c0c0c0")
            else:
                strong = abs(int(v)) > 0.6 * lim
                ax.text(j, i, f"{int(v):+d}" if difference else str(int(v)), ha="center", va="center", fontsize=8,
                        color="white" if strong else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def colour_limits(m, *, difference: bool) -> tuple[int, int]:
    """The colour scale: a difference is centred on zero (-L..L, L its largest magnitude, at least 1);
    a matrix of counts runs from 0 to its largest count."""
    import numpy as np

    lim = max(1, int(np.abs(np.asarray(m)).max(initial=0)))
    return (-lim, lim) if difference else (0, lim)


def _plots(table: list[dict], classes: list[str], plt) -> dict[str, str]:
    import numpy as np

    out = {}
    reference = table[0]["confusion"]
    if reference:
        out[f"confusion: {table[0]['name']}"] = _matrix(plt, reference, classes, table[0]["name"], difference=False)
    for r in table[1:]:
        if not r["confusion"]:
            continue
        if reference and np.shape(reference) == np.shape(r["confusion"]):
            diff = np.asarray(r["confusion"]) - np.asarray(reference)
            title = (f"{r['name']} − float reference\n(diagonal: + more right; "
                     "off-diagonal: + more confused)")
            out[f"confusion difference: {r['name']} − float reference"] = _matrix(plt, diff, classes, title,
                                                                                  difference=True)
        else:  # no reference matrix to subtract (an older result): the model's own
            out[f"confusion: {r['name']}"] = _matrix(plt, r["confusion"], classes, r["name"], difference=False)
    pts = [r for r in table if r["latency_ms"] is not None and r["accuracy"] is not None]
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


def budget_plot(search: dict) -> dict[str, str]:
    """{title: base64 PNG}: the budget search's Pareto plot: val accuracy vs batch-1 latency (worst
    target) of every configuration, marker area ~ model size, the budget a vertical line, the Pareto
    front a step line, the chosen configuration ringed. {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: report.html has no plots (pip install matplotlib)")
        return {}
    from .budget_report import PLOT

    with matplotlib.rc_context({"text.parse_math": False}):
        configs = search["configurations"]
        lat = [c["latency_ms"] for c in configs]
        acc = [c["val_accuracy"] for c in configs]
        mb = [max(max(c["model_bytes"].values(), default=0) / 1e6, 0.1) for c in configs]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(lat, acc, s=[60 * m for m in mb], alpha=0.6,
                   c=["tab:blue" if c["fits"] else "tab:gray" for c in configs])
        front, best = [], -1.0
        for c in sorted(configs, key=lambda c: (c["latency_ms"], -c["val_accuracy"])):
            if c["val_accuracy"] > best:
                front.append(c)
                best = c["val_accuracy"]
        ax.step([c["latency_ms"] for c in front], [c["val_accuracy"] for c in front], where="post", color="tab:blue",
                lw=1, alpha=0.5, label="Pareto front")
        for c, m in zip(configs, mb, strict=True):
            ax.annotate(f"{c['backbone']}@{c['image_size']}\n{m:.1f} MB", (c["latency_ms"], c["val_accuracy"]),
                        fontsize=7, xytext=(5, 5), textcoords="offset points")
        ax.axvline(search["latency_ms"], color="tab:red", ls="--", lw=1, label=f"budget {search['latency_ms']:g} ms")
        ch = search["chosen"]
        ax.scatter([ch["latency_ms"]], [ch["val_accuracy"]], s=400, facecolors="none", edgecolors="tab:green",
                   linewidths=2, label=f"chosen: {ch['backbone']}@{ch['image_size']}")
        ax.set_xlabel("latency, batch 1, ms (worst target; " + ("device profile" if search.get("device_profile")
                                                               else "build machine") + ")")
        ax.set_ylabel("val accuracy (feature-extract)")
        ax.set_title("budget search (marker area ~ model size; grey: over the budget)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.margins(x=0.2, y=0.2)
        try:
            return {PLOT: _png(fig)}
        finally:
            plt.close(fig)

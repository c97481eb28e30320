"""The report's budget-search section: the table of every configuration tried and the Pareto plot
(charts.budget_plot). Empty when no search chose the configuration."""

from __future__ import annotations

import html

HEADER = ["configuration", "val accuracy", "latency ms (worst target)", "per target", "model MB", "fits", "chosen"]
PLOT = "budget search: val accuracy vs latency"


def rows(search: dict | None) -> list[list[str]]:
    """One row of text cells per configuration tried, in the order they were tried."""
    if not search:
        return []
    chosen = (search["chosen"]["backbone"], search["chosen"]["image_size"])
    out = []
    for c in search["configurations"]:
        per = ", ".join(f"{k} {v['latency_ms']:.3f}" for k, v in c["latency_by_target"].items())
        mb = max(c["model_bytes"].values(), default=0) / 1e6
        out.append([f"{c['backbone']} @ {c['image_size']} px", f"{c['val_accuracy']:.4f}", f"{c['latency_ms']:.3f}",
                    per, f"{mb:.2f}" if mb else "-", "yes" if c["fits"] else "no",
                    "CHOSEN" if (c["backbone"], c["image_size"]) == chosen else ""])
    return out


def _lines(search: dict) -> list[str]:
    return [f"Budget {search['latency_ms']:g} ms at batch 1; latencies {search['latency_source']}.",
            f"Chosen: {search['chosen']['backbone']} at {search['chosen']['image_size']} px: {search['reason']}.",
            f"Decided by {search.get('decided_by', '')}; val accuracy from feature-extract training (the test "
            "split is read only by the chosen model's gate)."]


def markdown(search: dict | None) -> str:
    """The section for report.md ("" without a search)."""
    if not search:
        return ""
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in rows(search)]
    return "\n## Budget search\n\n" + "".join(f"{line}\n\n" for line in _lines(search)) + "\n".join(table) + "\n"


def html_section(search: dict | None, images: dict[str, str]) -> str:
    """The section for report.html, with its plot ("" without a search)."""
    if not search:
        return ""
    esc = html.escape
    thead = "".join(f"<th>{esc(c)}</th>" for c in HEADER)
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows(search))
    plot = images.get(PLOT)
    fig = (f'<figure><img alt="{esc(PLOT)}" src="data:image/png;base64,{plot}"><figcaption>{esc(PLOT)}'
           "</figcaption></figure>" if plot else "")
    return ("<h2>Budget search</h2>" + "".join(f"<p>{esc(line)}</p>" for line in _lines(search))
            + f"<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>{fig}")

"""The gate's statistics, exactly: the coverage of the drop's 95 % upper bound and the error rates of
the gate's rules, by enumerating every outcome of a test split weighted by its probability (no
sampling error). Prints docs/gate-statistics.md's tables:

    python benchmarks/gate_statistics.py > /tmp/tables.md

A test split of n images where the model loses (right for the float model, wrong for it) each image
with probability `lost` and gains one with probability `gained`: b (lost images) and c (gained ones)
are trinomial, b ~ Bin(n, lost), c | b ~ Bin(n - b, gained / (1 - lost)). The true drop is
lost - gained. tests/test_gate_statistics.py checks these functions against seeded multinomial
draws and asserts the coverage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgetl import parity  # noqa: E402

NS = (20, 46, 120, 200, 600)
LOST = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)
GAINED = (0.0, 0.005, 0.01, 0.03)
RULE_NS = (46, 120, 200, 600)
WORSE = ((0.03, 0.0), (0.04, 0.01))  # a model truly 3 pp worse, with and without gains
EVEN = ((0.01, 0.01), (0.02, 0.02))  # a model with no true drop, 2 % and 4 % of the images discordant
TOLERANCE_PP = 1.0  # the built-in profiles' max_accuracy_drop_pp
TAIL = 1e-13  # outcomes less likely than this are left out (their mass is reported)


def outcomes(n: int, lost: float, gained: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(b values, c values, P(b, c)) over every outcome but a negligible tail."""
    from scipy.stats import binom

    q = gained / (1.0 - lost) if lost < 1 else 0.0
    b = np.arange(int(binom.isf(TAIL, n, lost)) + 2 if lost > 0 else 1)
    b = b[b <= n]
    c = np.arange(int(binom.isf(TAIL, n, q)) + 2 if q > 0 else 1)
    c = c[c <= n]
    weight = binom.pmf(b[:, None], n, lost) * binom.pmf(c[None, :], n - b[:, None], q)
    return b, c, weight


def coverage(n: int, lost: float, gained: float, *, continuity: float = parity.CONTINUITY_IMAGES) -> float:
    """P(drop_upper_bound_pp >= the true drop): the one-sided coverage of the 95 % upper bound (with
    `continuity` other than the shipped one: Tango's bound so corrected, for comparison)."""
    b, c, w = outcomes(n, lost, gained)
    true_pp = (lost - gained) * 100.0
    ok = np.array([[bi + ci <= n and upper_pp(int(bi), int(ci), n, continuity) >= true_pp - 1e-9 for ci in c]
                   for bi in b])
    return float((w * ok).sum())


def upper_pp(b: int, c: int, n: int, continuity: float = parity.CONTINUITY_IMAGES) -> float:
    """The bound the gate computes (drop_upper_bound_pp), or Tango's with another correction."""
    if continuity == parity.CONTINUITY_IMAGES:
        return parity.drop_upper_bound_pp(b, c, n)
    return 100.0 * parity.tango_upper(b, c, n, 0.95, continuity)


def report_for(b: int, c: int, n: int) -> parity.ParityReport:
    """The figures the gate reads, as parity.evaluate records them for b lost and c gained images
    (the float model right on all others; agreement and logits out of the way)."""
    drop = round((b - c) / n * 100.0, 4)
    return parity.ParityReport(
        n_test=n, reference_accuracy=1.0, accuracy=1.0 - drop / 100, accuracy_drop_pp=drop,
        accuracy_drop_ci95_pp=(drop, drop), top1_agreement=1.0, logits_cosine_mean=1.0, logits_cosine_min=1.0,
        sqnr_db=99.0, discordant={"reference_only_correct": b, "target_only_correct": c}, one_image_pp=100.0 / n,
        drop_upper95_pp=parity.drop_upper_bound_pp(b, c, n), drop_lower95_pp=-parity.drop_upper_bound_pp(c, b, n))


def passes(rep: parity.ParityReport, rule: str, tolerance_pp: float, require_certified: bool) -> bool:
    """The gate's verdict on the drop (parity.drop_misses, parity.certified: the functions the gate runs)."""
    applied = parity.resolve_rule(rule, rep.n_test, tolerance_pp)
    ok = not parity.drop_misses(rep, tolerance_pp, applied)
    return ok and (not require_certified or parity.certified(rep, tolerance_pp))


def pass_probability(n: int, lost: float, gained: float, rule: str, *, tolerance_pp: float = TOLERANCE_PP,
                     require_certified: bool = False) -> float:
    """P(the gate passes the model) under `rule` (point, evidence, auto), optionally --require-certified."""
    b, c, w = outcomes(n, lost, gained)
    ok = np.array([[bi + ci <= n and passes(report_for(int(bi), int(ci), n), rule, tolerance_pp, require_certified)
                    for ci in c] for bi in b])
    return float((w * ok).sum())


def coverage_table() -> tuple[str, tuple[float, tuple]]:
    """The coverage grid as Markdown, and its minimum with where it occurs."""
    lines = ["| lost | gained | true drop (pp) | " + " | ".join(f"n = {n}" for n in NS) + " |",
             "|---|---|---|" + "---|" * len(NS)]
    worst = (2.0, ())
    for lost in LOST:
        for gained in GAINED:
            row = []
            for n in NS:
                cv = coverage(n, lost, gained)
                worst = min(worst, (cv, (n, lost, gained)))
                row.append(f"{cv:.3f}")
            lines.append(f"| {lost:g} | {gained:g} | {(lost - gained) * 100:+.1f} | " + " | ".join(row) + " |")
    return "\n".join(lines), worst


def plain_tango_minimum() -> tuple[float, tuple]:
    """Tango's bound without the continuity correction: its worst coverage on the same grid."""
    return min((coverage(n, lo, g, continuity=0.0), (n, lo, g)) for n in NS for lo in LOST for g in GAINED)


RULES = (("point", "point", False), ("evidence", "evidence", False), ("auto (default)", "auto", False),
         ("auto + require_certified", "auto", True))


def rule_table(scenarios, *, failing: bool) -> str:
    """P(exit 0) (or P(gate miss) with `failing`) per scenario, n and rule, tolerance 1 pp."""
    head = "| lost / gained | n | " + " | ".join(name for name, _, _ in RULES) + " |"
    lines = [head, "|---|---|" + "---|" * len(RULES)]
    for lost, gained in scenarios:
        for n in RULE_NS:
            cells = []
            for _, rule, required in RULES:
                p = pass_probability(n, lost, gained, rule, require_certified=required)
                cells.append(f"{1 - p if failing else p:.3f}")
            lines.append(f"| {lost:g} / {gained:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    table, (cv, (n, lost, gained)) = coverage_table()
    plain, (pn, pl, pg) = plain_tango_minimum()
    print("## Coverage of the 95 % upper bound: P(bound >= true drop)\n")
    print(table)
    print(f"\nMinimum {cv:.4f} at n = {n}, lost {lost:g}, gained {gained:g}. Plain Tango (no continuity "
          f"correction) on the same grid: minimum {plain:.4f} at n = {pn}, lost {pl:g}, gained {pg:g}.\n")
    print(f"## A model truly 3 pp worse: P(exit 0), tolerance {TOLERANCE_PP:g} pp\n")
    print(rule_table(WORSE, failing=False))
    print(f"\n## A model with no true drop: P(gate miss), tolerance {TOLERANCE_PP:g} pp\n")
    print(rule_table(EVEN, failing=True))


if __name__ == "__main__":
    main()

"""The INT8 search's rule (edgetl/choice.py) on synthetic scores: which candidates run, which ships."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgetl.choice import TIE, Candidate, Scores, decide

GATE = ("top-1 agreement 0.8800 < 0.9",)
TARGET = ("top-1 agreement 0.9600 < 0.97",)


def S(name, agreement, mse=1.0, *, int8=True, broken=False, met=True, clear=True):  # noqa: N802
    """Scores: feasible by default; `met=False` misses the overall target, `clear=False` the clear one."""
    missed = (() if met else TARGET) + (() if clear else ("clear-image agreement 0.9800 < 0.99",))
    return Scores(name, agreement, mse, int8, GATE if broken else (), missed, 0.99 if clear else 0.98, not clear)


def run(scores: list[Scores | str], effort="default", expensive=()):
    """decide() over fixed scores; returns (shipped name, decisions, warnings, names scored)."""
    ran = []

    def score(k):
        ran.append(k)
        return scores[k]

    cands = [Candidate(s if isinstance(s, str) else s.name, i in expensive) for i, s in enumerate(scores)]
    out = decide(cands, effort, score)
    name = None if out.chosen is None else cands[out.chosen].name
    return name, out.decisions, out.warnings, [cands[k].name for k in ran]


def test_the_first_feasible_fully_int8_candidate_ships():
    name, dec, warn, ran = run([S("a", 0.95, met=False), S("b", 0.975), S("c", 0.99)])
    assert name == "b" and ran == ["a", "b"] and not warn
    assert dec[0].startswith("not feasible: top-1 agreement 0.9600 < 0.97")
    assert dec[1] == "chosen: the first feasible fully-INT8 candidate"
    assert dec[2].startswith("skipped: b is feasible")


def test_none_feasible_ships_the_best_agreement_that_passes_the_gate_with_a_warning():
    name, dec, warn, _ = run([S("a", 0.96, met=False), S("b", 0.99, broken=True), S("c", 0.965, met=False)])
    assert name == "c"  # b agrees more, but the gate's rule on val refuses it
    assert dec[1].startswith("not feasible: top-1 agreement 0.8800 < 0.9")
    assert dec[2].startswith("chosen: no candidate is feasible")
    assert len(warn) == 1 and warn[0].startswith("search target not met") and "0.9650" in warn[0]


@pytest.mark.parametrize("gap, winner", [(0.002, "b"), (TIE, "b"), (0.003, "a")])
def test_a_tie_within_a_quarter_point_goes_to_the_lower_logit_error(gap, winner):
    name, _, _, _ = run([S("a", 0.95 + gap, mse=2.0, met=False), S("b", 0.95, mse=1.0, met=False)])
    assert name == winner


def test_an_exact_tie_goes_to_the_cheaper_candidate():
    assert run([S("a", 0.95, met=False), S("b", 0.95, met=False)])[0] == "a"
    assert run([S("a", 0.95, met=False), S("b", 0.95, met=False)], effort="max")[0] == "a"
    assert run([S("a", 0.99), S("b", 0.99)], effort="max")[0] == "a"


def test_mixed_precision_only_when_feasible_and_no_fully_int8_candidate_is():
    # feasible mixed, nothing INT8 feasible: mixed ships
    assert run([S("q", 0.95, met=False), S("mp", 0.98, int8=False)])[0] == "mp"
    # a later fully-INT8 candidate is feasible: it ships (the search went on past the mixed one)
    name, dec, _, ran = run([S("mp", 0.99, int8=False), S("q", 0.975)])
    assert name == "q" and ran == ["mp", "q"] and dec[0].startswith("feasible; not chosen: q ships")
    # mixed agrees more but is not feasible: the fully-INT8 candidate ships, with the warning
    name, _, warn, _ = run([S("q", 0.95, met=False), S("mp", 0.965, int8=False, met=False)])
    assert name == "q" and warn
    # every fully-INT8 candidate broken: a mixed one that is not ships rather than a sure gate failure
    assert run([S("q", 0.5, broken=True), S("mp", 0.95, int8=False, met=False)])[0] == "mp"
    # everything broken: the best fully-INT8 one (the gate will refuse it; the target says why)
    name, dec, warn, _ = run([S("q", 0.5, broken=True), S("mp", 0.8, int8=False, broken=True)])
    assert name == "q" and "every candidate misses the gate on val" in warn[0]


def test_default_effort_skips_the_expensive_candidate_where_the_cheap_one_passes_gate_and_clear_target():
    cheap = S("ptq", 0.967, met=False)  # misses the 0.97 target on borderline images only
    name, dec, warn, ran = run([cheap, S("ort", 0.938, met=False), S("qat", 0.970), S("mp", 0.96, int8=False)],
                               expensive={2, 3})
    assert name == "ptq" and ran == ["ptq", "ort"]  # the cheap ones run until one is feasible: none is
    assert dec[2].startswith("skipped: expensive, and the best so far, ptq, passes the gate on val and meets "
                             "the clear-image target (clear-image agreement 0.9900)")
    assert dec[3].startswith("skipped: expensive") and warn[0].startswith("search target not met")


@pytest.mark.parametrize("miss", ["gate", "clear"])
def test_default_effort_runs_the_expensive_candidate_where_the_best_so_far_misses(miss):
    first = S("ptq", 0.95, met=False, broken=miss == "gate", clear=miss == "gate")
    name, dec, _, ran = run([first, S("qat", 0.975)], expensive={1})
    assert ran == ["ptq", "qat"] and name == "qat" and dec[1].startswith("chosen")


def test_an_expensive_candidate_first_runs_and_a_feasible_one_stops_the_rest():
    name, dec, _, ran = run([S("qat", 0.98), S("ptq", 0.99)], expensive={0})
    assert name == "qat" and ran == ["qat"] and dec[1].startswith("skipped: qat is feasible")


def test_max_effort_runs_every_candidate_and_ships_the_best_feasible():
    name, dec, warn, ran = run([S("a", 0.975, mse=3.0), S("b", 0.99, mse=2.0), S("c", 0.988, mse=1.0),
                                S("d", 0.999, int8=False)], effort="max", expensive={2, 3})
    assert ran == ["a", "b", "c", "d"] and name == "c" and not warn  # b and c tie (0.2 pp): c's error is lower
    assert dec[0].startswith("feasible; not chosen: c ships") and dec[3].startswith("feasible; not chosen")


def test_low_effort_runs_the_first_candidate_only():
    name, dec, warn, ran = run([S("a", 0.9, met=False), S("b", 0.99)], effort="low")
    assert name == "a" and ran == ["a"] and warn
    assert dec[1] == "skipped: quantize.effort 'low' builds the first candidate only"


def test_low_effort_takes_the_first_candidate_that_builds():
    name, dec, _, ran = run(["RuntimeError: boom", S("b", 0.9, met=False), S("c", 0.99)], effort="low")
    assert name == "b" and ran == ["RuntimeError: boom", "b"] and dec[2].startswith("skipped: quantize.effort 'low'")


def test_a_mixed_precision_candidate_never_stops_an_escalation():
    """Broken fully-INT8 PTQ, a feasible mixed-precision model, then QAT: QAT runs (nothing fully INT8
    passes the gate on val), and ships when it is feasible."""
    name, dec, _, ran = run([S("ptq", 0.85, broken=True), S("mp", 0.99, int8=False), S("qat", 0.975)],
                            expensive={1, 2})
    assert ran == ["ptq", "mp", "qat"] and name == "qat"
    name, _, _, ran = run([S("ptq", 0.96, met=False, clear=False), S("mp", 0.99, int8=False, met=False),
                           S("qat", 0.975)], expensive={1, 2})
    assert ran == ["ptq", "mp", "qat"] and name == "qat"


def test_a_failed_candidate_is_recorded_and_the_next_one_runs():
    name, dec, _, ran = run(["RuntimeError: boom", S("b", 0.99)])
    assert name == "b" and dec[0] == "failed: RuntimeError: boom" and ran == ["RuntimeError: boom", "b"]
    name, dec, warn, _ = run(["boom", "bang"])
    assert name is None and dec == ["failed: boom", "failed: bang"] and not warn


def test_an_unknown_effort_is_refused():
    with pytest.raises(ValueError, match="effort"):
        run([S("a", 0.99)], effort="most")


def _random_scores(rng, n):
    return [S(f"c{i}", float(rng.choice([0.9, 0.95, 0.96, 0.968, 0.97, 0.972, 0.99])), float(rng.random()),
              int8=bool(rng.random() < 0.7), broken=bool(rng.random() < 0.2), met=bool(rng.random() < 0.4),
              clear=bool(rng.random() < 0.7)) for i in range(n)]


def test_the_rule_holds_on_every_random_case():
    """Invariants over 3000 random score lists and every effort and expensive pattern: what ships is
    feasible fully-INT8 whenever one ran; mixed precision only when feasible or when every fully-INT8
    candidate that ran is broken; never a broken one when another is not; a warning exactly when
    nothing feasible ships; default effort never runs more than max, and runs every cheap candidate
    before the first feasible fully-INT8 one; every decision is one of the five kinds."""
    rng = np.random.default_rng(0)
    for _ in range(3000):
        scores = _random_scores(rng, int(rng.integers(1, 6)))
        expensive = {i for i in range(len(scores)) if rng.random() < 0.4}
        runs = {}
        for effort in ("low", "default", "max"):
            name, dec, warn, ran = runs[effort] = run(scores, effort, expensive)
            done = [s for s in scores if s.name in ran]
            shipped = next(s for s in scores if s.name == name)
            assert all(d.split(":")[0].split(";")[0] in ("chosen", "feasible", "not feasible", "skipped") for d in dec)
            assert sum(d.startswith("chosen") for d in dec) == 1
            if any(s.int8 and s.feasible for s in done):
                assert shipped.int8 and shipped.feasible and not warn
            elif not shipped.int8:
                assert shipped.feasible or all(s.broken for s in done if s.int8)
            if any(not s.broken for s in done):
                assert not shipped.broken
            assert bool(warn) == (not shipped.feasible)
            if effort == "max":
                assert ran == [s.name for s in scores]
                feasible = [s for s in done if s.int8 and s.feasible]
                if feasible:
                    top = max(s.agreement for s in feasible)
                    assert shipped.agreement >= top - TIE - 1e-12
        assert set(runs["low"][3]) <= set(runs["default"][3]) <= set(runs["max"][3])
        first = next((i for i, s in enumerate(scores) if s.int8 and s.feasible and s.name in runs["default"][3]),
                     len(scores))
        cheap_before = [s.name for i, s in enumerate(scores[:first]) if i not in expensive]
        assert set(cheap_before) <= set(runs["default"][3])


def test_every_pattern_of_two_candidates():
    """Exhaustive over two candidates x (int8, broken, met, clear) x expensive second: the shipped one is
    never worse in the rule's order than the other when both ran."""
    rank = lambda s: (s.int8 and s.feasible, s.feasible, not s.broken, s.int8)  # noqa: E731
    for flags in itertools.product([False, True], repeat=9):
        a = S("a", 0.95, int8=flags[0], broken=flags[1], met=flags[2], clear=flags[3])
        b = S("b", 0.96, int8=flags[4], broken=flags[5], met=flags[6], clear=flags[7])
        name, _, _, ran = run([a, b], "default", {1} if flags[8] else set())
        if len(ran) == 2:
            shipped, other = (a, b) if name == "a" else (b, a)
            assert rank(shipped) >= rank(other)


# --- the knobs: quantize.effort (and escalate), the profile's clear-image target, a deprecated field ---------


def test_effort_from_the_recipe_the_cli_and_the_older_escalate(tmp_path):
    from click.testing import CliRunner

    from edgetl.cli import build
    from edgetl.errors import UsageError
    from edgetl.recipe import CLI_KEYS, load_recipe

    assert load_recipe().quantize.level == "default"
    f = tmp_path / "r.toml"
    f.write_text("[quantize]\nescalate = false\n")
    assert load_recipe(f).quantize.level == "low"  # the older switch: escalate = false is effort "low"
    assert load_recipe(f, {"quantize.effort": "max"}).quantize.level == "max"  # effort wins when set
    f.write_text('[quantize]\neffort = "max"\n')
    assert load_recipe(f).quantize.level == "max"
    assert CLI_KEYS["effort"] == "quantize.effort"
    assert load_recipe(None, {CLI_KEYS["effort"]: "low"}).quantize.level == "low"
    f.write_text('[quantize]\neffort = "most"\n')
    with pytest.raises(UsageError, match="quantize.effort"):
        load_recipe(f)
    res = CliRunner().invoke(build, ["--effort", "most"])
    assert res.exit_code == 2 and "'most' is not one of 'low', 'default', 'max'" in res.output
    # a recipe written back keeps what it meant (None is not written: escalate = false stays "low")
    r = load_recipe(None, {"quantize.escalate": False})
    assert "effort" not in r.to_toml_dict()["quantize"]


def test_a_profile_with_the_deprecated_escalate_noise_cut_still_loads(tmp_path, caplog):
    from edgetl.profiles import load_profile

    f = tmp_path / "p.toml"
    f.write_text('name = "p"\nbackend = "onnxruntime"\n[quantization]\nquantizers = ["nncf_ptq"]\n'
                 'escalate_noise_cut = 0.5\n[tolerances]\nsearch_clear_agreement = 0.995\n')
    with caplog.at_level("WARNING"):
        p = load_profile(str(f))
    assert p.tolerances.search_clear_agreement == 0.995
    assert any("escalate_noise_cut is deprecated and ignored" in r.message for r in caplog.records)
    assert load_profile("cpu").tolerances.search_clear_agreement == 0.98

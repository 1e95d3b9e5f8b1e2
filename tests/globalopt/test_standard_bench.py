"""The pure parts of the BBOB / GKLS benchmarks (benchmarks/bbob_bench.py, gkls_bench.py).

No optional benchmark package (cocoex, gkls, globe, cma, nlopt, dlib) is imported here: the
scoring, the task plan and the cache round trip are checked on hand-made records.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bbob_bench  # noqa: E402
import bbob_gkls_common as common  # noqa: E402
import gkls_bench  # noqa: E402
import iteration_survey  # noqa: E402

OPTIONAL = ("cocoex", "gkls", "globe", "cma", "nlopt", "dlib")


def test_importing_the_benchmarks_pulls_no_optional_package() -> None:
    # the scripts must import (and their tests run in CI) without the globalopt-bench extra
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); "
        "import bbob_bench, gkls_bench, iteration_survey; "
        f"print([m for m in {OPTIONAL!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_first_hit_reads_the_best_so_far_trace() -> None:
    trace = [(1, 5.0), (7, 1.0 + 2e-4), (12, 1.0 + 5e-5), (40, 1.0)]
    assert common.first_hit(trace, 1.0, 1e-4) == 12
    assert common.first_hit(trace, 1.0, 0.0) == 40
    assert common.first_hit(trace, 1.0, 10.0) == 1
    assert common.first_hit(trace, 0.0, 1e-4) is None
    assert common.first_hit([], 0.0, 1.0) is None


def test_bbob_targets_are_coco_s_51() -> None:
    t = common.bbob_targets()
    assert len(t) == 51
    assert t[0] == pytest.approx(100.0) and t[-1] == pytest.approx(1e-8)
    assert np.allclose(np.diff(np.log10(t)), -0.2)


def test_ecdf_area_by_hand() -> None:
    # budget 100 evals/d -> U = 2 decades; a pair hit at 10/d contributes (2 - 1)/2, one hit
    # below d evaluations counts as hit at once (1), a miss or a hit past the budget 0
    assert common.ecdf_area([10.0], 100) == pytest.approx(0.5)
    assert common.ecdf_area([0.5], 100) == pytest.approx(1.0)
    assert common.ecdf_area([None, 150.0], 100) == 0.0
    assert common.ecdf_area([1.0, 10.0, 100.0, None], 100) == pytest.approx((1 + 0.5 + 0) / 4)
    assert math.isnan(common.ecdf_area([], 100))
    with pytest.raises(ValueError):
        common.ecdf_area([1.0], 1)


def test_ecdf_area_equals_the_integral_of_the_curve() -> None:
    rng = np.random.default_rng(0)
    hits = [None if v > 300 else float(v) for v in 10 ** rng.uniform(-0.5, 2.7, 200)]
    u = np.linspace(0.0, 2.0, 200_001)
    curve = common.ecdf_curve(hits, 10**u)
    integral = float(np.mean(curve))  # uniform grid over [0, U]: mean = (1/U) * integral
    assert common.ecdf_area(hits, 100) == pytest.approx(integral, abs=1e-4)
    # earlier hits never lower the area
    faster = [None if h is None else h / 2 for h in hits]
    assert common.ecdf_area(faster, 100) >= common.ecdf_area(hits, 100)


def _rec(solver: str, trace: list[tuple[int, float]], budget: int, **kw: object) -> dict:
    return {"solver": solver, "trace": trace, "fstar": -1.0, "budget": budget, "dim": 2, "key": "p",
            "seed": 0, "error": None, "wall_s": 0.0, **kw}


def test_gkls_success_needs_the_tolerance_within_the_budget() -> None:
    r = _rec("bpgrad", [(3, 0.0), (150, -0.99995), (400, -1.0)], 2000)
    assert gkls_bench.success(r, 200)  # -0.99995 is within 1e-4 of -1 at evaluation 150
    assert not gkls_bench.success(r, 149)
    assert not gkls_bench.success(r, 200, tol=1e-5)
    assert gkls_bench.success(r, 400, tol=1e-5)
    # a local minimum at -0.9 is not the global one at any budget
    assert not gkls_bench.success(_rec("bpgrad", [(5, -0.9)], 2000), 2000)


def test_budget_aware_runs_answer_only_their_own_budget() -> None:
    ecp_small = _rec("ECP", [(10, -1.0)], 200)
    ecp_big = _rec("ECP", [(10, -1.0)], 2000)
    direct = _rec("scipy direct", [(10, -1.0)], 2000)
    assert gkls_bench.pick([ecp_small, ecp_big, direct], 200) == [ecp_small, direct]
    assert gkls_bench.pick([ecp_small, ecp_big, direct], 2000) == [ecp_big, direct]
    # a run shorter than the budget asked for cannot answer it
    assert gkls_bench.pick([_rec("scipy direct", [], 200)], 2000) == []


def test_gkls_table_bolds_the_most_solved_in_each_row() -> None:
    def recs(solver: str, solved: int) -> list[dict]:
        return [
            _rec(solver, [(50, -1.0 if k <= solved else -0.5)], 200, difficulty="simple", k=k)
            for k in range(1, 5)
        ]

    text = gkls_bench.summarize(recs("bpgrad", 2) + recs("scipy direct", 3), [100])
    row = next(line for line in text.splitlines() if line.startswith("| simple d=2"))
    assert row.endswith("| 4 | 2 | **3** |")
    # a solver that has finished only functions 1-2 shows its own count and n, and is not compared
    partial = [r for r in recs("AdaLIPO+", 4) if r["k"] <= 2]
    text = gkls_bench.summarize(recs("bpgrad", 2) + recs("scipy direct", 3) + partial, [100])
    row = next(line for line in text.splitlines() if line.startswith("| simple d=2"))
    assert row.endswith("| 4 | 2 | 2/2 | **3** |")  # columns: bpgrad, AdaLIPO+, direct


def test_task_plan_and_cache_round_trip(tmp_path: Path) -> None:
    probs = [("p1", {"x": 1})]
    tasks = common.tasks_for(probs, ["bpgrad", "ECP", "CMA-ES"], [100, 1000], [0, 1], "t")
    got = sorted((t.solver, t.seed, t.budget) for t in tasks)
    assert got == [
        ("CMA-ES", 0, 1000), ("CMA-ES", 1, 1000),  # stochastic, one run at the largest budget
        ("ECP", 0, 100), ("ECP", 0, 1000), ("ECP", 1, 100), ("ECP", 1, 1000),  # budget-aware
        ("bpgrad", 0, 1000),  # deterministic
    ]
    calls = []

    def worker(t: common.Task) -> dict:
        calls.append(t)
        err = "AttributeError('mid-refactor')" if t.solver == "CMA-ES" else None
        return {"key": t.key, "solver": t.solver, "seed": t.seed, "budget": t.budget,
                "error": err}

    common.run_tasks(tasks, tmp_path, worker)
    assert len(calls) == len(tasks)
    cached = common.load_cache(tmp_path)
    # environment errors are not cached (the next invocation retries them), results are
    assert sorted(r["solver"] for r in cached) == ["ECP"] * 4 + ["bpgrad"]
    calls.clear()
    common.run_tasks(tasks, tmp_path, worker)
    assert sorted(t.solver for t in calls) == ["CMA-ES", "CMA-ES"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_bbob_hits_per_pair_and_table() -> None:
    # d = 2, budget 10·d = 20 evaluations: f - f_opt = 9e-4 at evaluation 4 solves the 26 targets
    # 1e2 .. 1e-3 at 2 evaluations/d and none below
    r = _rec("bpgrad", [(4, -1.0 + 9e-4)], 20, f=1, instance=1)
    hits = bbob_bench.per_dim_hits([r], 10)
    assert len(hits) == 51
    assert hits[:26] == [2.0] * 26 and hits[26:] == [None] * 25
    text = bbob_bench.summarize([r], [2], 10)
    assert f"| bpgrad | **{common.ecdf_area(hits, 10):.3f}** | 51 % |" in text
    other = dict(r, key="f02", solver="scipy direct", trace=[])
    assert bbob_bench.common_problems([r, other]) == []  # no problem finished by both
    assert bbob_bench.common_problems([r, dict(other, key=r.get("key"))]) != []


def test_gkls_classes_are_the_published_eight() -> None:
    assert len(gkls_bench.CLASSES) == 8
    assert gkls_bench.CLASSES[("hard", 2)] == (0.90, 0.10)
    assert gkls_bench.CLASSES[("simple", 5)] == (0.66, 0.30)
    assert gkls_bench.parse_key(gkls_bench.class_key("hard", 4, 17)) == ("hard", 4, 17)


def test_bbob_paired_difference_is_the_difference_of_areas() -> None:
    # two problems; bpgrad solves every target of the first at 2 evaluations/d, direct none;
    # both solve the second's first 26 targets at the same evaluation
    recs = []
    for solver, first in (("bpgrad", [(4, -1.0)]), ("scipy direct", [])):
        recs.append(_rec(solver, first, 20, key="f01", f=1, instance=1))
        recs.append(_rec(solver, [(6, -1.0 + 9e-4)], 20, key="f02", f=2, instance=1))
    text = bbob_bench.paired(recs, [2], 10, "bpgrad", resamples=200)
    area = {s: float(bbob_bench.summarize([r for r in recs if r["solver"] == s], [2], 10)
                     .split(f"| {s} | ")[1].split(" |")[0].strip("*")) for s in ("bpgrad",
                                                                                  "scipy direct")}
    row = next(line for line in text.splitlines() if line.startswith("| scipy direct |"))
    mean = float(row.split("| ")[2].split(" [")[0])
    assert abs(mean - (area["bpgrad"] - area["scipy direct"])) < 2e-3  # rounding of the tables
    lo, hi = (float(v) for v in row.split("[")[1].split("]")[0].split(", "))
    assert 0 <= lo <= mean <= hi  # either problem favours bpgrad or ties: never below 0


def test_iteration_survey_counts_the_runs_each_cap_would_cut_by_kind_of_l() -> None:
    def row(key: str, nit: int) -> dict[str, object]:
        return {"suite": "x", "key": key, "budget": 100, "nit": nit, "nfev": 100, "status": 2,
                "wall_s": 0.0}

    text = iteration_survey.report(
        [row("f05", 1500), row("g1", 40), row("g2", 60), row("S:box0:known", 700)])
    estimated, known = (line for line in text.splitlines() if line.startswith("| 0.") or
                        line.startswith("| 7."))
    # estimated L: ratios 15, 0.4, 0.6 -> caps 1..10 cut one run, 20 and 50 none
    assert estimated.endswith("| 1 | 1 | 1 | 1 | 0 | 0 |")
    # known L (the key's suffix): ratio 7 -> caps 1, 2, 5 cut it, 10 and above do not
    assert known.endswith("| 1 | 1 | 1 | 0 | 0 | 0 |")
    listed = [line for line in text.splitlines() if line.startswith("| x |")]
    assert [line.split(" | ")[1] for line in listed] == ["f05", "S:box0:known"]  # >= 5·maxfev

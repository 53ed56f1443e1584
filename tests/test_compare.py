"""The solver comparison: counts within the step budget, honest ratios, every solver in the figure."""

import json

import pytest
import torch

from vars_deq import cli
from vars_deq.compare import compare_solvers, format_table, synthetic_problems, target_checks
from vars_deq.plots import plot_convergence

pytestmark = pytest.mark.usefixtures("one_thread")

TOLS = (1e-2, 1e-4, 1e-6)




@pytest.fixture(scope="module")
def results():
    prob = synthetic_problems(2.0, batch=4, tokens=12, atoms=16, channels=3)
    return compare_solvers(prob, ["ista", "fista", "anderson", "torchdeq_anderson", "torchdeq_broyden"], TOLS,
                           max_steps=30)


def test_iteration_counts_stay_within_the_step_budget(results):
    # TorchDEQ's Broyden also evaluates T at its start point: 31 evaluations for 30 steps
    for name, r in results.items():
        for key in ("0.01", "0.0001", "1e-06"):
            row = r["by_tol"][key]
            assert 1 <= row["iterations_all"] <= 30 and row["iterations_mean"] <= 30, name
            assert 0 <= row["converged_fraction"] <= 1
        assert r["log10_max_residual_trace"], name  # every solver has a residual trace to plot
        assert max(k for k, _ in r["log10_max_residual_trace"]) <= 30
    assert results["torchdeq_broyden"]["log10_gap_trace"] is None and results["ista"]["log10_gap_trace"]


def test_table_names_the_energy_gap_tolerance_and_fills_it(results):
    table = format_table({"suite": results}, 1e-4)
    header = next(line for line in table.splitlines() if line.startswith("solver"))
    assert "E gap@1e-06" in header
    rows = [line for line in table.splitlines() if line.split() and line.split()[0] in results]
    assert len(rows) == len(results) and all(row.split()[-1] != "-" for row in rows)
    # a solver that left problems above the tolerance shows the budget as a bound
    for row in rows:
        name = row.split()[0]
        frac = results[name]["by_tol"]["0.0001"]["converged_fraction"]
        assert row.split()[2].startswith(">") == (frac < 1)


def _fake(converged):
    def row(frac, its, secs):
        return {"by_tol": {"0.0001": {"iterations_mean": its, "iterations_all": its, "seconds": secs,
                                      "converged_fraction": frac, "rel_energy_gap_max": None}}}

    return {"anderson": row(1.0, 10.0, 0.1), "ista": row(converged, 40.0, 0.2), "fista": row(1.0, 20.0, 0.1),
            "torchdeq_anderson": row(1.0, 12.0, 0.4), "fista_rank1": row(1.0, 8.0, 0.05)}


def test_a_ratio_against_an_unconverged_solver_is_none_with_a_reason():
    ok = target_checks(_fake(1.0), 1e-4)
    assert ok["anderson_vs_ista_iterations"] == pytest.approx(0.25)
    assert ok["anderson_vs_fista_iterations"] == pytest.approx(0.5)
    assert ok["anderson_vs_torchdeq_anderson_time"] == pytest.approx(0.25)
    assert ok["fista_rank1_vs_fista_time"] == pytest.approx(0.5)
    assert ok["notes"] == {}
    bad = target_checks(_fake(0.5), 1e-4)
    assert bad["anderson_vs_ista_iterations"] is None
    assert bad["notes"]["anderson_vs_ista_iterations"] == (
        "ista brought only 50% of the problems below 0.0001 within the step budget")
    assert bad["anderson_vs_fista_iterations"] == pytest.approx(0.5)
    missing = target_checks({k: v for k, v in _fake(1.0).items() if k != "torchdeq_anderson"}, 1e-4)
    assert missing["anderson_vs_torchdeq_anderson_time"] is None
    assert missing["notes"]["anderson_vs_torchdeq_anderson_time"] == "torchdeq_anderson was not run"
    json.dumps(bad, allow_nan=False)


def test_plot_draws_every_solver_and_the_tolerance(results, tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    save = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved["fig"] = fig
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    path = tmp_path / "c.png"
    plot_convergence({"suite": results}, path, "test", tol=1e-4)
    assert path.read_bytes()[:4] == b"\x89PNG"
    residual_ax, gap_ax, _ = saved["fig"].axes[:3]
    lines = {line.get_label(): line for line in residual_ax.get_lines()}
    assert set(results) | {"tol 0.0001"} == set(lines)
    styles = {(line.get_linestyle(), line.get_marker()) for name, line in lines.items() if name in results}
    assert len(styles) == len(results)  # no two solvers drawn alike
    assert "torchdeq_anderson" in " ".join(t.get_text() for t in gap_ax.texts)


def test_compare_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--solvers", "ista", "anderson", "torchdeq_broyden", "--tols", "1e-2", "1e-4",
                     "--synthetic", "--deit", "--max-steps", "20", "--num-images", "2", "--output", str(out),
                     "--no-progress", "--threads", "1", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "E gap@0.0001" in printed and f"wrote {out / 'compare.json'}" in printed
    payload = json.loads((out / "compare.json").read_text())
    assert payload["max_steps"] == 20 and payload["energy_gap_tol"] == 1e-4
    (suite,) = payload["results"]
    for r in payload["results"][suite].values():
        assert r["by_tol"]["0.0001"]["iterations_all"] <= 20
    checks = payload["targets"][suite]
    for ratio in ("anderson_vs_ista_iterations", "anderson_vs_fista_iterations", "anderson_vs_torchdeq_anderson_time"):
        assert (checks[ratio] is None) == (ratio in checks["notes"])
    assert "fista was not run" == checks["notes"]["anderson_vs_fista_iterations"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"

"""Solvers: energy monotonicity, FISTA's O(1/k^2) bound, agreement with each other and with
scikit-learn's Lasso, batched = per-problem, per-problem convergence, loop arguments."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    DTYPES,
    LassoCase,
    dense_energy,
    energy_scale,
    eps,
    lasso_cases,
    reference_solution,
    spread_dictionary,
)
from hypothesis import given
from hypothesis import strategies as st

import vars_deq as vd
from vars_deq.dictionaries.dense import DenseOperator

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SOLVER_NAMES = sorted(n for n in vd.SOLVERS if not n.startswith("torchdeq"))
MONOTONE = ["ista", "mfista", "anderson"]


def _start(prob, z0):
    if z0 == "zeros":
        return torch.zeros(prob.code_shape, dtype=prob.x.dtype)
    return prob.D.encode(prob.x).expand(prob.code_shape)


# ---------------------------------------------------------------------------------------------
# energy never increases (ISTA, monotone FISTA, energy-safeguarded Anderson)
# ---------------------------------------------------------------------------------------------


@given(
    case=lasso_cases(max_log10_cond=4.0, m_range=(1, 20), lam_frac=(0.005, 0.8)),
    solver=st.sampled_from(MONOTONE),
    z0=st.sampled_from(["encode", "zeros"]),
    steps=st.integers(1, 60),
)
def test_energy_never_increases(case, solver, z0, steps):
    """E(z_{k+1}) <= E(z_k) along the iterates, from E(z_0) on. The tolerance is a few dozen
    machine epsilons of the energy's magnitude E(0) = 1/2 ||x||^2 (the solvers compare energies
    in the Gram form 1/2 <z, Gz> - <z, b> + 1/2 ||x||^2, whose rounding is relative to ||x||^2)."""
    prob = case.problem()
    sol = vd.solve(prob, solver, max_steps=steps, tol=None, z0=z0, trace=True)
    trace = sol.stats.energy_trace
    assert trace is not None and trace.shape == (steps, *case.batch)
    e = torch.cat([prob.energy(_start(prob, z0))[None], trace]).double()
    assert not bool(torch.isnan(e).any())
    assert bool(torch.isfinite(e[1:]).all())  # nonneg iterates stay feasible (E(encode) may be inf)
    tol = 64 * eps(case.dtype) * (energy_scale(case.x) + e[1:].abs().amax(0))
    up = e[1:] - e[:-1]
    assert bool((up <= tol).all()), (up.amax(), tol, e)
    # the output T(z_last) is no worse than the start either
    assert bool((sol.stats.energy.double() <= e[0] + tol).all())


@given(
    case=lasso_cases(max_log10_cond=4.0, nonneg=True, overcomplete=True),
    solver=st.sampled_from(MONOTONE),
)
def test_energy_never_increases_nonneg_overcomplete(case, solver):
    """The hardest mix for the safeguards: projected (nonneg) codes, rank-deficient Gram."""
    prob = case.problem()
    sol = vd.solve(prob, solver, max_steps=40, tol=None, z0="zeros", trace=True)
    e = torch.cat([energy_scale(case.x).to(case.dtype)[None], sol.stats.energy_trace]).double()
    tol = 64 * eps(case.dtype) * (energy_scale(case.x) + e.abs().amax(0))
    assert bool((e[1:] - e[:-1] <= tol).all())


# ---------------------------------------------------------------------------------------------
# FISTA: E(x_k) - E* <= 2 L ||x_0 - x*||^2 / (k + 1)^2
# ---------------------------------------------------------------------------------------------


@given(
    case=lasso_cases(dtypes=(torch.float64,), max_log10_cond=1.0, lam_frac=(0.05, 0.8)),
    z0=st.sampled_from(["zeros", "encode"]),
    steps=st.integers(1, 80),
)
def test_fista_rate_bound(case, z0, steps):
    prob = case.problem()
    z_star, e_star, _ = reference_solution(case)
    sol = vd.solve(prob, "fista", max_steps=steps, tol=None, z0=z0, trace=True)
    e = sol.stats.energy_trace  # E(x_k), k = 1..steps
    assert bool((e >= e_star - 1e-9 * (1 + e_star.abs())).all())  # E* is the minimum
    L = (1.0 / prob.flat().eta.reshape(-1)).expand(prob.num_problems).reshape(case.batch)
    x0 = _start(prob, z0)
    dist2 = (x0 - z_star).pow(2).sum((-2, -1))
    k = torch.arange(1, steps + 1, dtype=torch.float64).reshape(-1, *([1] * len(case.batch)))
    bound = 2 * L * dist2 / (k + 1) ** 2
    gap = e - e_star
    slack = 1e-9 * (1 + e_star.abs())
    assert bool((gap <= bound * (1 + 1e-7) + slack).all()), (gap, bound)


# ---------------------------------------------------------------------------------------------
# all solvers agree with each other and with scikit-learn's Lasso
# ---------------------------------------------------------------------------------------------


def _sklearn_solution(case: LassoCase) -> torch.Tensor:
    """Codes from sklearn.linear_model.Lasso, one fit per column of x (alpha = lam / N)."""
    from sklearn.linear_model import Lasso

    out = torch.zeros(*case.batch, case.M, case.C, dtype=torch.float64)
    for idx, D, x, lam in case.per_problem():
        D = D.double().numpy()
        x = x.double().numpy()
        lam = float(lam) if not isinstance(lam, torch.Tensor) else float(lam.reshape(-1)[0])
        for c in range(case.C):
            model = Lasso(
                alpha=lam / case.N,
                fit_intercept=False,
                positive=case.nonneg,
                tol=1e-14,
                max_iter=200_000,
                selection="cyclic",
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(D, x[:, c])
            out[idx][:, c] = torch.from_numpy(np.asarray(model.coef_, dtype=np.float64))
    return out


@pytest.mark.filterwarnings("ignore::vars_deq.ConvergenceWarning")
@given(
    case=lasso_cases(
        dtypes=(torch.float64,),
        max_log10_cond=1.0,
        kinds=("gaussian", "spread"),
        n_range=(2, 8),
        m_range=(1, 12),
        batches=((), (2,)),
        lam_frac=(0.1, 0.8),
    )
)
def test_solvers_agree_with_each_other_and_with_sklearn(case):
    """Every solver's fit D z, energy and (where the minimizer is unique, M <= N) codes match
    scikit-learn's coordinate-descent Lasso. The fit and the energy are unique for any lasso.

    Convergence is required of the momentum methods always, and of the other guarded solvers
    whenever ISTA converges in a quarter of their budget (they must not be much worse than the
    plain step they fall back on). Some draws are nearly degenerate (an atom with
    |D^T r| / lam = 0.9997 at the optimum that ISTA can only drop by a slow linear drift of its
    code: 1e5+ steps); Anderson cannot extrapolate a drift, may then stop unconverged, and must
    say so."""
    D, x, lam = case.dense()
    z_sk = _sklearn_solution(case)
    e_sk = dense_energy(D, x, lam, z_sk, case.nonneg)
    xnorm = x.flatten(-2).norm(dim=-1)
    prob = case.problem()
    budget = 10_000
    ista = vd.solve(prob, "ista", max_steps=budget, tol=1e-10, z0="zeros")
    ista_ok = bool((ista.stats.steps <= budget // 4).all()) and bool(ista.converged.all())
    for name in SOLVER_NAMES:
        sol = vd.solve(prob, name, max_steps=budget, tol=1e-10, z0="zeros")
        e = prob.energy(sol.z)
        # nobody beats the optimum
        assert bool((e >= e_sk - 1e-9 * energy_scale(x) - 1e-12).all()), (name, e, e_sk)
        must_converge = "fista" in name or (ista_ok and name not in ("ista", "anderson_plain"))
        if not bool(sol.converged.all()):
            assert not must_converge, (name, sol.stats.residual, sol.stats.steps)
            assert bool((sol.stats.residual[~sol.converged] >= 1e-10).all())  # reported honestly
            continue
        # the energy is the optimum's (both solve to ~1e-10; the gap is second order)
        assert bool(((e - e_sk).abs() <= 1e-8 * energy_scale(x) + 1e-12).all()), (name, e, e_sk)
        # the fit D z is unique
        fit, fit_sk = D @ sol.z, D @ z_sk
        err = (fit - fit_sk).flatten(-2).norm(dim=-1) / xnorm.clamp_min(1e-12)
        assert bool((err <= 1e-5).all()), (name, err)
        if case.M <= case.N:
            zerr = (sol.z - z_sk).flatten(-2).norm(dim=-1) / (z_sk.flatten(-2).norm(dim=-1) + 1e-3)
            assert bool((zerr <= 1e-4).all()), (name, zerr)


# ---------------------------------------------------------------------------------------------
# regression cases
# ---------------------------------------------------------------------------------------------


_D2 = [[-0.5127618362523092, 0.277809156693393], [0.7853528833077547, -0.23047390399058734]]
_CASES_2X2 = {  # x, lam, z*: found by the sklearn property above
    "relative-guard cycle": ([-0.15595744154707583, 0.14811306662477774], 0.024536256004276693,
                             [0.19524046829154248, 0.0]),
    "absolute-guard cycle": ([-0.5977065499782365, 0.18215918630046884], 0.02683695926645058,
                             [0.0, -1.390634603259]),
}


@pytest.mark.filterwarnings("ignore::vars_deq.ConvergenceWarning")
@pytest.mark.parametrize("case", sorted(_CASES_2X2))
@pytest.mark.parametrize("solver", [n for n in SOLVER_NAMES if n != "anderson_plain"])
def test_guarded_solvers_converge_on_2x2_problems(solver, case):
    """Regression: 2 x 2 lassos that ISTA solves in 18 and 208 steps. Anderson with the residual
    safeguard cycled on them forever: the guard reacts only after a bad accelerated step, takes
    one plain step from the bad point, and re-accelerates from the same memory into the same bad
    point (a period-6 cycle at residual ~8e-3 on the second case, with relative or absolute
    residuals alike)."""
    x, lam, z_star = _CASES_2X2[case]
    D = torch.tensor(_D2, dtype=torch.float64)
    prob = vd.SparseCoding(D, torch.tensor(x, dtype=torch.float64)[:, None], lam)
    sol = vd.solve(prob, solver, max_steps=2000, tol=1e-10)
    assert bool(sol.converged), (solver, float(sol.stats.residual), int(sol.stats.steps))
    torch.testing.assert_close(sol.z, torch.tensor(z_star, dtype=torch.float64)[:, None], rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# batched solve equals per-problem solves
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::vars_deq.ConvergenceWarning")
@given(
    case=lasso_cases(max_log10_cond=2.0, batches=((3,), (2, 2))),
    solver=st.sampled_from(SOLVER_NAMES),
    tol=st.sampled_from([None, 1e-4]),
)
def test_batched_solve_equals_per_problem_solves(case, solver, tol):
    """Same iterates batched or alone. A batched and a single matmul round differently; ISTA and
    FISTA are continuous in the iterate, so that stays at rounding level. The solvers with
    discrete decisions (monotone/restart tests, Anderson's safeguards) compare energies that
    are equal up to rounding once converged, and may branch apart there: their runs may differ
    by the size of the last steps, ~ the final residual times ||z||. In float32 such a branch
    can open before convergence (an Anderson candidate accepted alone and rejected in the batch
    sends the runs apart by O(1) until both converge), so float32 checks ISTA and FISTA only."""
    if case.dtype == torch.float32 and solver not in ("ista", "fista"):
        solver = "fista" if "fista" in solver else "ista"
    prob = case.problem()
    sol = vd.solve(prob, solver, max_steps=40, tol=tol)
    # the per-problem report is consistent with itself
    from vars_deq.equilibrium import REPORT_TOL

    assert sol.converged.shape == case.batch and sol.stats.steps.shape == case.batch
    assert torch.equal(sol.converged, sol.stats.residual < (REPORT_TOL if tol is None else tol))
    assert bool((sol.stats.steps <= 40).all()) and bool((sol.stats.steps >= 1).all())
    if tol is not None:
        assert bool((sol.converged | (sol.stats.steps == 40)).all())  # stopped early => converged
    torch.testing.assert_close(sol.stats.energy, prob.energy(sol.z))
    base = 1e-10 if case.dtype == torch.float64 else 2e-4
    for idx, D, x, lam in case.per_problem():
        one = vd.solve(vd.SparseCoding(D, x, lam, nonneg=case.nonneg), solver, max_steps=40, tol=tol)
        zs = one.z.abs().amax() + 1e-3
        atol = base
        if solver not in ("ista", "fista"):
            atol += 100 * max(float(sol.stats.residual[idx]), float(one.stats.residual))
        torch.testing.assert_close(sol.z[idx] / zs, one.z / zs, rtol=0, atol=atol)
        if tol is not None and case.dtype == torch.float64:
            # stopping is a per-problem decision: same steps and verdict alone as in the batch
            assert int(sol.stats.steps[idx]) == int(one.stats.steps)
            assert bool(sol.converged[idx]) == bool(one.converged)
        elif tol is None:
            assert int(sol.stats.steps[idx]) == int(one.stats.steps) == 40


# ---------------------------------------------------------------------------------------------
# per-problem convergence
# ---------------------------------------------------------------------------------------------


def _graded_problems(dtype=torch.float64, seed=0, conds=(0.0, 1.0, 2.0, 2.5)):
    """One problem per condition number: easy ones converge in a few steps, hard ones in many."""
    g = torch.Generator().manual_seed(seed)
    N = M = 8
    D = torch.stack([spread_dictionary(N, M, c, g) for c in conds])
    x = torch.randn(len(conds), N, 2, generator=g, dtype=torch.float64)
    return D.to(dtype), x.to(dtype)


class CountingOperator(DenseOperator):
    """A dense operator that counts how many problems every Gram product touches."""

    def __init__(self, weight, counter, gram=None, use_gram=None):
        super().__init__(weight, gram, use_gram)
        self.counter = counter

    def normal(self, z):
        self.counter.append(z.shape[0])
        return super().normal(z)

    def flatten(self, batch_shape):
        f = super().flatten(batch_shape)
        return CountingOperator(f.weight, self.counter, f.gram, f.use_gram)

    def take(self, index):
        t = super().take(index)
        return CountingOperator(t.weight, self.counter, t.gram, t.use_gram)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", ["ista", "fista", "mfista", "anderson"])
def test_each_problem_stops_on_its_own(solver, dtype):
    D, x = _graded_problems(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    prob = vd.SparseCoding(D, x, 0.05)
    sol = vd.solve(prob, solver, max_steps=5000, tol=tol, trace=True)
    steps = sol.stats.steps
    assert bool(sol.converged.all())
    assert bool((sol.stats.residual < tol).all())
    assert len(set(steps.tolist())) > 1, steps  # the problems stop at their own counts, not together
    assert int(steps[0]) < int(steps[-1])
    # a problem alone takes the same number of steps as inside the batch
    for p in range(len(steps)):
        one = vd.solve(vd.SparseCoding(D[p], x[p], 0.05), solver, max_steps=5000, tol=tol)
        assert int(one.stats.steps) == int(steps[p])
        torch.testing.assert_close(one.z, sol.z[p])
    # the traces end where each problem stopped (NaN afterwards)
    rt, et = sol.stats.residual_trace, sol.stats.energy_trace
    assert rt.shape[0] == int(steps.max()) and et.shape[0] == int(steps.max())
    for p in range(len(steps)):
        s = int(steps[p])
        assert bool(torch.isfinite(rt[:s, p]).all()) and bool(torch.isnan(rt[s:, p]).all())
        assert bool(torch.isfinite(et[:s, p]).all()) and bool(torch.isnan(et[s:, p]).all())
        assert float(rt[s - 1, p]) == float(sol.stats.residual[p])


@pytest.mark.parametrize("compact", [0.0, None])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("solver,extra", [("ista", 0), ("fista", 0), ("mfista", 1)])
def test_stopped_problems_cost_no_more_products(solver, extra, fused, compact, monkeypatch):
    """Dropping a stopped problem at once (COMPACT_FRACTION 0, COMPACT_PAYBACK 0), Gram products
    touch only the problems still running: sum of batch rows = sum of steps (+ one product per problem at the
    start of MFISTA, whose energies need G x_0), with the fused no-grad step (its products counted
    where it forms them) and without it. With the default fraction f, stopped rows stay below f of
    the batch, so the products are at most sum of steps / (1 - f)."""
    from vars_deq import equilibrium, problems
    D, x = _graded_problems(conds=(0.0, 0.3, 0.6, 1.0, 1.3, 1.6, 2.0, 2.5))
    monkeypatch.setattr(equilibrium, "COMPACT_PAYBACK", 0.0)  # the fraction alone decides (payback: below)
    if compact is not None:
        monkeypatch.setattr(equilibrium, "COMPACT_FRACTION", compact)
    fraction = equilibrium.COMPACT_FRACTION
    counter = []
    monkeypatch.setattr(problems, "STEP_MAP", fused)
    plain_pre_threshold = problems.StepMap.pre_threshold

    def counted(self, z):
        counter.append(z.shape[0])
        return plain_pre_threshold(self, z)

    monkeypatch.setattr(problems.StepMap, "pre_threshold", counted)
    op = CountingOperator(D, counter)
    prob = vd.SparseCoding(op, x, 0.05)
    sol = vd.solve(prob, solver, max_steps=5000, tol=1e-8)
    assert bool(sol.converged.all())
    assert len(set(sol.stats.steps.tolist())) >= 4  # problems stop at several steps, not all at once
    own = int(sol.stats.steps.sum()) + extra * prob.num_problems
    assert sol.stats.rows_iterated == sum(counter) - extra * prob.num_problems  # the stat counts them too
    if fraction == 0:
        assert sum(counter) == own
    else:
        assert own <= sum(counter) <= int(sol.stats.steps.sum()) / (1 - fraction) + extra * prob.num_problems


def _drops(prob, payback=None):
    """The batch sizes left after each drop of stopped problems in one FISTA solve to 1e-8, with
    COMPACT_PAYBACK as it is or as given."""
    from vars_deq import equilibrium, problems
    sizes = []
    plain_take = problems.LassoBatch.take

    def take(self, index):
        sizes.append(int(index.numel()))
        return plain_take(self, index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(problems.LassoBatch, "take", take)
        if payback is not None:
            mp.setattr(equilibrium, "COMPACT_PAYBACK", payback)
        sol = vd.solve(prob, "fista", max_steps=5000, tol=1e-8)
    assert bool(sol.converged.all())
    return sizes, sol


def test_stopped_problems_leave_the_batch_only_where_the_drop_pays_back():
    """COMPACT_PAYBACK: a drop waits until stopped rows x steps since the first stop reach
    COMPACT_PAYBACK x batch rows. Two groups of copies stop at two steps: no drop is made (the
    fraction alone makes one); problems of spread conditioning stop hundreds of steps apart:
    stopped ones are dropped, and each drop met the rule at the step it was made (checked against
    the stopping steps); an infinite payback never drops."""
    from vars_deq import equilibrium
    D, x = _graded_problems(conds=(0.0, 0.3, 0.6, 1.0, 1.3, 1.6, 2.0, 2.5))
    # four copies of an easy problem stop together, a quarter and more of the batch (the fraction
    # alone would drop them), then four copies of a hard one: no stop comes after the first before
    # the batch ends, so no drop pays
    pick = torch.tensor([0] * 4 + [7] * 4)
    two = vd.SparseCoding(DenseOperator(D[pick]), x[pick], 0.05)
    sizes, sol = _drops(two)
    assert len(set(sol.stats.steps.tolist())) == 2 and sizes == []
    assert _drops(two, payback=0.0)[0] == [4]
    spread = vd.SparseCoding(DenseOperator(D), x, 0.05)
    sizes, sol = _drops(spread)
    steps = sorted(sol.stats.steps.tolist())
    assert sizes, "problems stopping hundreds of steps apart were never dropped"
    first, batch, removed = steps[0], len(steps), 0
    for left in sizes:
        # a drop removes every problem stopped in the batch; it came at the latest of their stops
        stopped = batch - left
        k = steps[removed + stopped - 1] - 1  # the loop's 0-based step
        assert stopped >= equilibrium.COMPACT_FRACTION * batch
        assert stopped * (k - (first - 1)) >= equilibrium.COMPACT_PAYBACK * batch
        batch, removed = left, removed + stopped
    assert _drops(spread, payback=math.inf)[0] == []


@given(case=lasso_cases(dtypes=(torch.float64,), max_log10_cond=2.5, batches=((6,), (3, 3))),
       solver=st.sampled_from(["ista", "fista"]), fraction=st.sampled_from([0.25, 0.5, 1.0]),
       payback=st.sampled_from([0.0, 1.0, 4.0, math.inf]))
def test_when_stopped_problems_leave_the_batch_changes_nothing(case, solver, fraction, payback):
    """Per-problem stopping records each problem at the step it stops; when it leaves the batch
    (at once: COMPACT_FRACTION 0 and COMPACT_PAYBACK 0; with others: 0.25, 0.5, and a payback of
    1 or 4 steps; never: 1 or an infinite payback) changes no output, step count,
    residual or trace, since the problems are separable (to rounding: a batched matmul of other
    rows may round differently, and the iterates carry that; in float64, so that it stays far
    below the stopping decisions: float32 can move a residual across tol). ISTA and FISTA are
    continuous in the iterate; the solvers with discrete decisions (restarts, the monotone choice,
    Anderson's safeguards and mixing) can branch apart on such rounding, as in
    test_batched_solve_equals_per_problem_solves, and leave the batch through the same code."""
    from vars_deq import equilibrium

    prob = case.problem()
    runs = []
    for f, b in ((0.0, 0.0), (fraction, payback)):
        old = equilibrium.COMPACT_FRACTION, equilibrium.COMPACT_PAYBACK
        equilibrium.COMPACT_FRACTION, equilibrium.COMPACT_PAYBACK = f, b
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", vd.ConvergenceWarning)  # capped problems compare too
                runs.append(vd.solve(prob, solver, max_steps=300, tol=1e-6, trace=True))
        finally:
            equilibrium.COMPACT_FRACTION, equilibrium.COMPACT_PAYBACK = old
    a, b = runs
    assert torch.equal(a.stats.steps, b.stats.steps) and torch.equal(a.converged, b.converged)
    torch.testing.assert_close(b.z, a.z, rtol=1e-9, atol=1e-12)
    # residuals are differences of O(||z||) iterates: their rounding is absolute, ~1e-12 here
    torch.testing.assert_close(b.stats.residual, a.stats.residual, rtol=0, atol=1e-10)
    torch.testing.assert_close(b.stats.residual_trace, a.stats.residual_trace, equal_nan=True, rtol=0, atol=1e-10)
    assert torch.equal(torch.isnan(a.stats.energy_trace), torch.isnan(b.stats.energy_trace))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_capped_solve_reports_unconverged_and_warns(solver, dtype):
    D, x = _graded_problems(dtype, conds=(2.0, 2.5, 3.0))
    prob = vd.SparseCoding(D, x, 0.01)
    with pytest.warns(vd.ConvergenceWarning, match=r"3 of 3 problems"):
        sol = vd.solve(prob, solver, max_steps=3, tol=1e-9)
    assert not bool(sol.converged.any())
    assert sol.converged.shape == (3,) and sol.converged.dtype == torch.bool
    assert bool((sol.stats.steps == 3).all())
    assert bool((sol.stats.residual >= 1e-9).all())


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_partly_converged_solve_says_which(solver):
    D, x = _graded_problems(conds=(0.0, 3.0))
    prob = vd.SparseCoding(D, x, 0.05)
    with pytest.warns(vd.ConvergenceWarning, match=r"1 of 2 problems"):
        sol = vd.solve(prob, solver, max_steps=25, tol=1e-6)
    assert sol.converged.tolist() == [True, False]
    assert float(sol.stats.residual[0]) < 1e-6 <= float(sol.stats.residual[1])
    assert int(sol.stats.steps[1]) == 25


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("max_steps", [1, 7])
def test_tol_none_runs_exactly_max_steps(solver, max_steps):
    D, x = _graded_problems()
    prob = vd.SparseCoding(D, x, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fixed-step runs never warn
        sol = vd.solve(prob, solver, max_steps=max_steps, tol=None, trace=True)
    assert bool((sol.stats.steps == max_steps).all())
    assert sol.stats.residual_trace.shape == (max_steps, 4)
    assert bool(torch.isfinite(sol.stats.residual_trace).all())
    assert bool(torch.isfinite(sol.stats.energy_trace).all())
    # converged is reported against the documented fixed-step threshold
    from vars_deq.equilibrium import REPORT_TOL

    assert torch.equal(sol.converged, sol.stats.residual < REPORT_TOL)


@given(case=lasso_cases(max_log10_cond=3.0), steps=st.integers(1, 25), z0=st.sampled_from(["encode", "zeros"]))
def test_fixed_step_ista_is_the_iterated_prox_grad_map(case, steps, z0):
    """tol=None, ISTA: the output is exactly T^k(z0) (k = max_steps), with no early exit."""
    prob = case.problem()
    z = _start(prob, z0)
    for _ in range(steps):
        z = prob.prox_grad(z)
    sol = vd.solve(prob, "ista", max_steps=steps, tol=None, z0=z0)
    scale = z.abs().amax() + 1e-6
    # float32: a step cancels terms up to cond x larger than its output, so rounding of different
    # (equally valid) product orders shows at ~1e-5 of the output
    atol = 1e-12 if case.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(sol.z / scale, z / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("z0", ["encode", None, "zeros", "tensor"])
def test_zero_steps_return_z0(solver, z0):
    D, x = _graded_problems()
    prob = vd.SparseCoding(D, x, 0.05)
    if z0 == "tensor":
        z0 = torch.randn(prob.code_shape, dtype=torch.float64)
        expected = z0
    elif z0 == "zeros":
        expected = torch.zeros(prob.code_shape, dtype=torch.float64)
    else:
        expected = D.transpose(-1, -2) @ x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vd.ConvergenceWarning)
        sol = vd.solve(prob, solver, max_steps=0, tol=1e-4, z0=z0)
    torch.testing.assert_close(sol.z, expected, rtol=1e-12, atol=1e-12)
    assert bool((sol.stats.steps == 0).all())
    torch.testing.assert_close(sol.stats.residual, prob.residual(expected))


@pytest.mark.parametrize("shape", [(0, 6, 3), (2, 0, 6, 3), (2, 6, 0)])
def test_empty_batches_solve_to_empty_codes(shape):
    """No problems is not an error: the codes come back empty, shaped right, for every solver.
    No channels is refused up front, with a ValueError naming x."""
    D = torch.randn(6, 9, dtype=torch.float64)
    x = torch.zeros(shape, dtype=torch.float64)
    if shape[-1] == 0:
        with pytest.raises(ValueError, match="x must have at least one token and one channel"):
            vd.SparseCoding(D, x, 0.1)
        return
    for solver in SOLVER_NAMES:
        for tol in (1e-4, None):
            sol = vd.solve(vd.SparseCoding(D, x, 0.1), solver, max_steps=5, tol=tol)
            assert sol.z.shape == (*shape[:-2], 9, shape[-1]), (solver, tol)
            assert sol.converged.shape == shape[:-2], (solver, tol)
            assert sol.stats.steps.shape == shape[:-2], (solver, tol)


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------


def _small_problem():
    D, x = _graded_problems(conds=(0.0,))
    return vd.SparseCoding(D, x, 0.1)


@pytest.mark.parametrize("name", ["nope", "ISTA", "fista ", "", 3, None])
def test_unknown_solver_lists_valid_names(name):
    with pytest.raises(ValueError) as info:
        vd.solve(_small_problem(), name)
    msg = str(info.value)
    assert "solver" in msg
    for valid in SOLVER_NAMES:
        assert repr(valid) in msg or valid in msg


@pytest.mark.parametrize("max_steps", [-1, -100, 2.5, "10", True])
def test_bad_max_steps_raises(max_steps):
    with pytest.raises(ValueError, match=r"max_steps"):
        vd.solve(_small_problem(), "ista", max_steps=max_steps)


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan"), float("inf"), "1e-4"])
def test_bad_tol_raises(tol):
    with pytest.raises(ValueError, match=r"tol"):
        vd.solve(_small_problem(), "ista", tol=tol)


@pytest.mark.parametrize("safeguard", ["Energy", "none", "objective", ""])
def test_unknown_safeguard_lists_valid_names(safeguard):
    with pytest.raises(ValueError, match=r"safeguard") as info:
        vd.Anderson(safeguard=safeguard)
    for valid in ("energy", "residual", "None"):
        assert valid in str(info.value)


@pytest.mark.parametrize("restart", ["Function", "adaptive", "", True])
def test_unknown_restart_lists_valid_names(restart):
    with pytest.raises(ValueError, match=r"restart") as info:
        vd.FISTA(restart=restart)
    for valid in ("function", "gradient", "None"):
        assert valid in str(info.value)


@pytest.mark.parametrize("memory", [0, -1, 2.0])
def test_bad_anderson_memory_raises(memory):
    with pytest.raises(ValueError, match=r"memory"):
        vd.Anderson(memory=memory)


@pytest.mark.parametrize("z0", ["random", "Zeros", torch.zeros(1, 8, 3)])
def test_bad_z0_raises(z0):
    with pytest.raises(ValueError, match=r"z0"):
        vd.solve(_small_problem(), "ista", z0=z0)


def test_solver_objects_and_names_are_interchangeable():
    prob = _small_problem()
    for name, obj in [("ista", vd.ISTA()), ("mfista", vd.FISTA(monotone=True)), ("anderson", vd.Anderson())]:
        a = vd.solve(prob, name, max_steps=30, tol=None)
        b = vd.solve(prob, obj, max_steps=30, tol=None)
        torch.testing.assert_close(a.z, b.z, rtol=0, atol=0)

"""FISTA in the rank-one-plus-identity metric (solvers/fista_rank1.py): the metric majorizes the
Gram, the prox solves its optimality conditions, FISTA's bound holds in the metric's norm, and the
metric pays where one eigenvalue dominates. The solver is also in every registry-wide test
(test_solvers, test_problems: agreement with scikit-learn, per-problem stopping, batching)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vars_deq as vd
from vars_deq.solvers.fista_rank1 import METRIC_MARGIN, metric_prox, rank_one_metric

from conftest import coherent_dictionary, lasso_cases, reference_solution

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _gram(prob: vd.SparseCoding) -> torch.Tensor:
    flat = prob.flat()
    P, M = flat.b.shape[0], flat.b.shape[1]
    return flat.normal(torch.eye(M, dtype=flat.b.dtype).expand(P, M, M))


def _metric(v, a, c):
    return a * torch.eye(v.shape[-2], dtype=v.dtype) + c * v @ v.transpose(-1, -2)


@given(case=lasso_cases(dtypes=(torch.float64,)))
def test_the_metric_majorizes_the_gram(case):
    """W - G >= delta I, delta = METRIC_MARGIN lambda_1, and W's top eigenvalue is lambda_1 + delta
    (the metric is no looser than FISTA's step along the top eigenvector)."""
    gram = _gram(case.problem())
    v, a, c = rank_one_metric(gram)
    w = _metric(v, a, c)
    top = torch.linalg.eigvalsh(gram)[..., -1]
    delta = METRIC_MARGIN * top
    gap = torch.linalg.eigvalsh(w - gram)[..., 0]
    assert bool((gap >= delta * (1 - 1e-6) - 1e-12).all()), (gap, delta)
    assert torch.allclose(torch.linalg.eigvalsh(w)[..., -1], top + delta, rtol=1e-9, atol=1e-12)


def _prox_kkt(x0, z, v, a, c, lam, nonneg):
    """Largest violation of 0 in W (z - x0) + lam d||z||_1 (+ the orthant's normal cone)."""
    r = _metric(v, a, c) @ (x0 - z)  # must lie in lam d||z||_1
    on = z != 0
    bad_on = (r - lam * torch.sign(z)).abs() * on
    bad_off = ((r - lam).clamp_min(0) if nonneg else (r.abs() - lam).clamp_min(0)) * ~on
    return torch.maximum(bad_on, bad_off).amax()


@given(
    m=st.integers(1, 24), cols=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
    log_a=st.floats(-2.0, 1.0), log_ratio=st.floats(-3.0, 3.0), lam=st.floats(0.01, 2.0), nonneg=st.booleans(),
)
@settings(deadline=None)
def test_the_prox_solves_its_optimality_conditions(m, cols, seed, log_a, log_ratio, lam, nonneg):
    """Newton on each column's multiplier, from 0, reaches the exact W-prox: W (x0 - z) lies in
    lam d||z||_1 (float64, to rounding), for every ratio c / a from 1e-3 to 1e3."""
    gen = torch.Generator().manual_seed(seed)
    x0 = 2 * torch.randn(1, m, cols, generator=gen, dtype=torch.float64)
    v = torch.randn(1, m, 1, generator=gen, dtype=torch.float64)
    v = v / v.norm()
    a = torch.full((1, 1, 1), 10.0 ** log_a, dtype=torch.float64)
    c = a * 10.0 ** log_ratio
    z, _ = metric_prox(x0, lam, v, a, c / a, (c / a) * v, nonneg, torch.zeros(1, 1, cols, dtype=torch.float64), 60)
    scale = (a + c).item() * (1 + x0.abs().max().item())
    assert _prox_kkt(x0, z, v, a, c, lam, nonneg).item() <= 1e-9 * scale


@given(
    case=lasso_cases(dtypes=(torch.float64,), max_log10_cond=1.0, lam_frac=(0.05, 0.8)),
    z0=st.sampled_from(["zeros", "encode"]),
    steps=st.integers(1, 40),
)
@settings(deadline=None)
def test_rate_bound_in_the_metric(case, z0, steps):
    """E(x_k) - E* <= 2 ||x_0 - x*||_W^2 / (k + 1)^2 (FISTA's bound in the metric's norm; with an
    exact prox: 10 Newton steps from the previous multiplier, 20 on the first step)."""
    prob = case.problem()
    z_star, e_star, _ = reference_solution(case)
    sol = vd.solve(prob, vd.RankOneFISTA(newton_steps=10), max_steps=steps, tol=None, z0=z0, trace=True)
    e = sol.stats.energy_trace  # E(x_k), k = 1..steps
    v, a, c = rank_one_metric(_gram(prob))
    flat = prob.flat()
    x0 = {"zeros": torch.zeros_like(flat.b), "encode": flat.b}[z0]
    diff = x0 - z_star.reshape(flat.b.shape)
    dist2 = (diff * (_metric(v, a, c) @ diff)).sum((-2, -1)).reshape(case.batch)
    k = torch.arange(1, steps + 1, dtype=torch.float64).reshape(-1, *([1] * len(case.batch)))
    bound = 2 * dist2 / (k + 1) ** 2
    slack = 1e-9 * (1 + e_star.abs())
    assert bool((e - e_star <= bound * (1 + 1e-7) + slack).all()), (e - e_star, bound)


@pytest.mark.parametrize("nonneg", [False, True])
def test_the_metric_cuts_steps_where_one_eigenvalue_dominates(nonneg):
    """Atoms around one direction (the Gram's top eigenvalue far above the rest): to the same
    residual, under a quarter of FISTA's steps (20-40x fewer here), to the same energy."""
    gen = torch.Generator().manual_seed(0)
    D = coherent_dictionary(32, 48, gen, batch=(4,), spread=0.3)
    x = torch.randn(4, 32, 8, generator=gen, dtype=torch.float64)
    prob = vd.SparseCoding(D, x, 0.2, nonneg=nonneg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", vd.ConvergenceWarning)
        plain = vd.solve(prob, "fista", max_steps=6000, tol=1e-7)
        metric = vd.solve(prob, "fista_rank1", max_steps=6000, tol=1e-7)
    assert bool((metric.stats.steps < 0.25 * plain.stats.steps).all()), (metric.stats.steps, plain.stats.steps)
    e_plain, e_metric = prob.energy(plain.z), prob.energy(metric.z)
    assert torch.allclose(e_metric, e_plain, rtol=1e-7), (e_metric, e_plain)


@pytest.mark.parametrize("newton_steps", [0, -1, 1.5, True, "3"])
def test_bad_newton_steps_raises(newton_steps):
    with pytest.raises(ValueError, match="newton_steps"):
        vd.RankOneFISTA(newton_steps=newton_steps)

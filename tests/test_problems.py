"""SparseCoding against direct dense formulas; zero solutions, scaling, KKT at the solution; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DTYPES,
    dense_energy,
    dense_lipschitz,
    energy_scale,
    eps,
    lasso_cases,
)
from hypothesis import given
from hypothesis import strategies as st

import vars_deq as vd

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SOLVER_NAMES = sorted(n for n in vd.SOLVERS if not n.startswith("torchdeq"))


def _random_codes(case, gen, sparsity=0.5):
    """Codes (*batch, M, C) with exact zeros (both KKT branches), nonnegative for nonneg problems."""
    shape = (*case.batch, case.M, case.C)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    z = z * (torch.rand(*shape, generator=gen, dtype=torch.float64) < sparsity)
    if case.nonneg:
        z = z.abs()
    return z.to(case.dtype)


def _eta(prob):
    """The step 1/L the problem uses, shaped like its batch."""
    eta = prob.flat().eta.reshape(-1).double()
    return eta.expand(prob.num_problems).reshape(prob.batch_shape)


def _dense_T(D, x, lam, z, eta, nonneg):
    g = D.transpose(-1, -2) @ (D @ z - x)
    u = z - eta[..., None, None] * g
    t = eta[..., None, None] * lam
    return torch.relu(u - t) if nonneg else torch.sign(u) * torch.relu(u.abs() - t)


def _dense_kkt(D, x, lam, z, nonneg):
    g = D.transpose(-1, -2) @ (D @ z - x)
    if nonneg:
        v = torch.where(z > 0, (g + lam).abs(), torch.relu(-(g + lam)))
        v = torch.maximum(v, torch.relu(-z))
    else:
        v = torch.where(z != 0, (g + lam * torch.sign(z)).abs(), torch.relu(g.abs() - lam))
    return v.flatten(-2).amax(-1)


def _tols(dtype):
    return {"rtol": 1e-11, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}


# ---------------------------------------------------------------------------------------------
# evaluations against dense formulas
# ---------------------------------------------------------------------------------------------


@given(case=lasso_cases(max_log10_cond=4.0), zseed=st.integers(0, 2**31 - 1))
def test_evaluations_match_dense_formulas(case, zseed):
    gen = torch.Generator().manual_seed(zseed)
    z = _random_codes(case, gen)
    prob = case.problem()
    D, x, lam = case.dense()
    zd = z.double()
    scale = energy_scale(x) + dense_energy(D, x, lam, zd, case.nonneg) + 1.0
    tol = _tols(case.dtype)

    # the step: 1/eta = L >= ||D||^2, and "exact" is exact for explicit atoms
    eta = _eta(prob)
    L_true = dense_lipschitz(D)
    assert bool((1.0 / eta >= L_true * (1 - 64 * eps(case.dtype))).all())
    torch.testing.assert_close(1.0 / eta, L_true, rtol=64 * eps(case.dtype), atol=0.0)

    # energy 1/2 ||x - Dz||^2 + lam ||z||_1
    e = prob.energy(z)
    assert e.shape == case.batch
    torch.testing.assert_close(e.double() / scale, dense_energy(D, x, lam, zd, case.nonneg) / scale, **tol)

    # gradient of the smooth part
    g_ref = D.transpose(-1, -2) @ (D @ zd - x)
    gscale = (D.transpose(-1, -2) @ x).abs().amax() + L_true.max() * zd.abs().amax() + 1.0
    g = prob.gradient(z)
    assert g.shape == z.shape
    torch.testing.assert_close(g.double() / gscale, g_ref / gscale, **tol)

    # T(z) = S_{eta lam}(z - eta grad)
    T_ref = _dense_T(D, x, lam, zd, eta, case.nonneg)
    tscale = (zd.abs().amax() + (eta[..., None, None] * g_ref).abs().amax() + 1.0)
    T = prob.prox_grad(z)
    assert T.shape == z.shape
    torch.testing.assert_close(T.double() / tscale, T_ref / tscale, **tol)
    if case.nonneg:
        assert bool((T >= 0).all())

    # relative fixed-point residual ||T z - z|| / max(||z||, eps)
    num = (T_ref - zd).flatten(-2).norm(dim=-1)
    den = zd.flatten(-2).norm(dim=-1).clamp_min(1e-12)
    r = prob.residual(z)
    assert r.shape == case.batch
    rtol = 1e-9 if case.dtype == torch.float64 else 2e-3
    atol = rtol * tscale / den
    assert bool(((r.double() - num / den).abs() <= rtol * (num / den) + atol).all()), (r, num / den)

    # KKT violation
    k_ref = _dense_kkt(D, x, lam, zd, case.nonneg)
    k = prob.kkt_violation(z)
    assert k.shape == case.batch
    torch.testing.assert_close(k.double() / gscale, k_ref / gscale, **tol)


@given(case=lasso_cases(nonneg=True), zseed=st.integers(0, 2**31 - 1))
def test_nonneg_energy_is_infinite_off_the_orthant(case, zseed):
    gen = torch.Generator().manual_seed(zseed)
    z = _random_codes(case, gen).clone()
    flat = z.view(-1, case.M * case.C)
    flat[0, int(torch.randint(case.M * case.C, (1,), generator=gen))] = -0.5
    e = case.problem().energy(z).reshape(-1)
    assert math.isinf(float(e[0])) and float(e[0]) > 0
    assert bool(torch.isfinite(e[1:]).all())
    # the KKT violation sees the negative entry
    assert float(case.problem().kkt_violation(z).reshape(-1)[0]) >= 0.5 - 1e-6


# ---------------------------------------------------------------------------------------------
# lam >= ||D^T x||_inf: the zero solution
# ---------------------------------------------------------------------------------------------


def _lam_max(prob):
    """||D^T x||_inf per problem (nonneg: max(D^T x)) computed with the library's own D^T x."""
    b = prob.flat().b
    m = b.amax((-2, -1)) if prob.nonneg else b.abs().amax((-2, -1))
    return m.clamp_min(0).reshape(prob.batch_shape)


@given(case=lasso_cases(), solver=st.sampled_from(SOLVER_NAMES))
def test_lam_at_lam_max_from_zeros_gives_exact_zero(case, solver):
    """lam = ||D^T x||_inf exactly: T(0) = S_{eta lam}(eta D^T x) = 0, so any solver started at 0
    returns exact zeros after one step, converged."""
    lam_max = _lam_max(case.problem())
    prob = vd.SparseCoding(case.D, case.x, lam_max[..., None, None], nonneg=case.nonneg)
    sol = vd.solve(prob, solver, max_steps=50, tol=1e-6, z0="zeros")
    assert bool((sol.z == 0).all())
    assert bool(sol.converged.all())
    assert bool((sol.stats.steps == 1).all())
    assert bool((prob.kkt_violation(sol.z) == 0).all())


@given(
    case=lasso_cases(max_log10_cond=1.0, kinds=("gaussian", "spread")),
    solver=st.sampled_from(SOLVER_NAMES),
    factor=st.floats(1.01, 4.0),
    z0=st.sampled_from(["encode", "random"]),
    zseed=st.integers(0, 2**31 - 1),
)
def test_lam_above_lam_max_gives_exact_zero(case, solver, factor, z0, zseed):
    """lam > ||D^T x||_inf: 0 is the unique minimizer and every solver reaches it exactly."""
    prob0 = case.problem()
    lam = factor * _lam_max(prob0)
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))[..., None, None]
    prob = vd.SparseCoding(case.D, case.x, lam, nonneg=case.nonneg)
    if z0 == "random":
        z0 = _random_codes(case, torch.Generator().manual_seed(zseed))
    sol = vd.solve(prob, solver, max_steps=3000, tol=1e-9, z0=z0)
    assert bool(sol.converged.all()), sol.stats.residual
    assert bool((sol.z == 0).all()), sol.z.abs().amax()
    torch.testing.assert_close(prob.energy(sol.z).double(), energy_scale(case.x), rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------------------------------------
# scaling: Z*(a x, a lam) = a Z*
# ---------------------------------------------------------------------------------------------


def _scaled(case, a):
    lam = case.lam * a
    return vd.SparseCoding(case.D, case.x * a, lam, nonneg=case.nonneg)


@pytest.mark.filterwarnings("ignore::vars_deq.ConvergenceWarning")
@given(case=lasso_cases(max_log10_cond=2.0), solver=st.sampled_from(SOLVER_NAMES), k=st.integers(-4, 4))
def test_scaling_by_power_of_two_is_exact(case, solver, k):
    """With a = 2^k every operation of every solver scales exactly (the step 1/L does not depend
    on x; Anderson's ridge is relative), so the whole run is the same up to the factor a."""
    a = 2.0**k
    sol = vd.solve(case.problem(), solver, max_steps=60, tol=1e-5)
    sol_a = vd.solve(_scaled(case, a), solver, max_steps=60, tol=1e-5)
    torch.testing.assert_close(sol_a.z, a * sol.z, rtol=1e-5 if case.dtype == torch.float32 else 1e-12, atol=0.0)
    assert torch.equal(sol_a.stats.steps, sol.stats.steps)
    assert torch.equal(sol_a.converged, sol.converged)


@given(
    case=lasso_cases(dtypes=(torch.float64,), max_log10_cond=1.0, kinds=("gaussian", "spread")),
    a=st.floats(0.05, 20.0),
)
def test_scaling_of_the_minimizer(case, a):
    """Z*(a x, a lam) = a Z*: the fit D Z* and the energy (a^2 E*) are unique, so compare them."""
    prob, prob_a = case.problem(), _scaled(case, a)
    sol = vd.solve(prob, "fista_restart", max_steps=20000, tol=1e-10)
    sol_a = vd.solve(prob_a, "fista_restart", max_steps=20000, tol=1e-10)
    assert bool(sol.converged.all()) and bool(sol_a.converged.all())
    D, x, _ = case.dense()
    fit, fit_a = D @ sol.z, D @ sol_a.z
    scale = x.flatten(-2).norm(dim=-1)[..., None, None]
    torch.testing.assert_close(fit_a / (a * scale), fit / scale, rtol=0, atol=1e-7)
    torch.testing.assert_close(prob_a.energy(sol_a.z), a * a * prob.energy(sol.z), rtol=1e-9, atol=1e-12)
    if case.M <= case.N:  # strongly convex (cond <= 10 on the range): the codes are unique too
        zs = sol.z.flatten(-2).norm(dim=-1)[..., None, None] + 1e-3
        torch.testing.assert_close(sol_a.z / (a * zs), sol.z / zs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# KKT at the solution
# ---------------------------------------------------------------------------------------------


@given(
    case=lasso_cases(max_log10_cond=1.0, kinds=("gaussian", "spread", "coherent")),
    solver=st.sampled_from(["ista", "fista", "mfista", "fista_restart", "anderson"]),
)
def test_kkt_violation_small_at_the_solution(case, solver):
    """z = T(p) satisfies 0 in grad f(z) + d g(z) + w with w = grad f(z) - grad f(p) + (p - z)/eta, so
    kkt_violation(z) <= ||w|| <= 2 L ||z - p|| = 2 L res ||p|| <= 2 L res ||z|| / (1 - res)."""
    tol = 1e-10 if case.dtype == torch.float64 else 1e-5
    prob = case.problem()
    sol = vd.solve(prob, solver, max_steps=4000, tol=tol)
    res = sol.stats.residual.double()
    L = 1.0 / _eta(prob)
    D, x, lam = case.dense()
    znorm = sol.z.double().flatten(-2).norm(dim=-1)
    bound = 2 * L * res * znorm / (1 - res).clamp_min(1e-12)
    b_inf = (D.transpose(-1, -2) @ x).abs().amax((-2, -1))
    slack = 64 * eps(case.dtype) * (L * sol.z.double().abs().amax((-2, -1)) + b_inf + lam.amax((-2, -1)))
    kkt = prob.kkt_violation(sol.z).double()
    assert bool((kkt <= bound * 1.001 + slack).all()), (kkt, bound, slack)
    # and where the solve converged the violation is small relative to lam
    conv = sol.converged
    small = 1e-6 if case.dtype == torch.float64 else 1e-2
    assert bool((kkt[conv] <= small * (b_inf[conv] + 1.0)).all()), (kkt, b_inf)


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument
# ---------------------------------------------------------------------------------------------


def _good(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(2, 6, 9, generator=g, dtype=dtype)
    x = torch.randn(2, 6, 3, generator=g, dtype=dtype)
    return D, x


def test_good_input_builds():
    D, x = _good()
    prob = vd.SparseCoding(D, x, 0.1)
    assert prob.code_shape == (2, 9, 3) and prob.batch_shape == (2,) and prob.num_problems == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["x", "D"])
def test_non_finite_input_raises(where, bad):
    D, x = _good()
    (x if where == "x" else D)[1, 2, 0] = bad
    with pytest.raises(ValueError, match=rf"^{where}\b.*(NaN|Inf)"):
        vd.SparseCoding(D, x, 0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_lam_raises(bad):
    D, x = _good()
    with pytest.raises(ValueError, match=r"\blam\b"):
        vd.SparseCoding(D, x, bad)
    with pytest.raises(ValueError, match=r"\blam\b"):
        vd.SparseCoding(D, x, torch.tensor([[[bad]], [[0.1]]], dtype=torch.float64))


def test_non_finite_dense_dictionary_raises():
    D, _ = _good()
    D[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"weight.*(NaN|Inf)"):
        vd.DenseDictionary(D)


@pytest.mark.parametrize("lam", [-0.1, -1e-12, "tensor"])
def test_negative_lam_raises(lam):
    D, x = _good()
    if lam == "tensor":
        lam = torch.tensor([0.1, -0.2], dtype=torch.float64)[:, None, None]
    with pytest.raises(ValueError, match=r"\blam\b.*>= 0"):
        vd.SparseCoding(D, x, lam)


def test_token_count_mismatch_raises():
    D, x = _good()
    with pytest.raises(ValueError, match=r"\bN=6\b.*\bN=5\b|\bN=5\b.*\bN=6\b") as info:
        vd.SparseCoding(D[:, :5], x, 0.1)
    assert "D" in str(info.value) and "x" in str(info.value)
    with pytest.raises(ValueError, match=r"\bN="):
        vd.SparseCoding(D, x[:, :5], 0.1)


@pytest.mark.parametrize("d_batch", [(3,), (2, 2), (3, 2)])
def test_non_broadcastable_batch_raises(d_batch):
    _, x = _good()  # problems (2,)
    D = torch.randn(*d_batch, 6, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\bD\b.*leading dims"):
        vd.SparseCoding(D, x, 0.1)


def test_dictionary_batch_may_broadcast_up_but_not_grow_the_problems():
    D, x = _good()
    vd.SparseCoding(D[:1], x, 0.1)  # (1, N, M) broadcasts over 2 problems
    vd.SparseCoding(D[0], x, 0.1)  # shared
    with pytest.raises(ValueError, match=r"\bD\b"):
        vd.SparseCoding(D, x[:1], 0.1)  # D would add problems x does not have


@pytest.mark.parametrize("shape", [(4,), (2, 9, 4), (2, 8, 1), (3, 1, 1), (1, 2, 9, 3)])
def test_lam_shape_mismatch_raises(shape):
    D, x = _good()  # codes (2, 9, 3)
    lam = torch.full(shape, 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\blam\b.*shape"):
        vd.SparseCoding(D, x, lam)


@pytest.mark.parametrize("shape", [(), (1,), (3,), (9, 1), (2, 1, 1), (2, 9, 3), (1, 1, 3)])
def test_lam_shapes_that_broadcast_are_accepted(shape):
    D, x = _good()
    lam = torch.full(shape, 0.1, dtype=torch.float64)
    prob = vd.SparseCoding(D, x, lam)
    z = torch.ones(prob.code_shape, dtype=torch.float64)
    # lam * ||z||_1 with z = 1 everywhere
    ref = dense_energy(D, x, lam.expand(2, 9, 3), z)
    torch.testing.assert_close(prob.energy(z), ref)


@pytest.mark.parametrize("mode", ["Exact", "svd", "", None])
def test_unknown_lipschitz_mode_raises(mode):
    D, x = _good()
    with pytest.raises(ValueError, match=r"lipschitz.*exact.*power.*gershgorin"):
        vd.SparseCoding(D, x, 0.1, lipschitz=mode)


def test_bad_x_and_D_types_raise():
    D, x = _good()
    with pytest.raises(ValueError, match=r"^x\b"):
        vd.SparseCoding(D, x[0, 0], 0.1)  # 1-d
    with pytest.raises(ValueError, match=r"^x\b"):
        vd.SparseCoding(D, x.numpy(), 0.1)
    with pytest.raises(ValueError, match=r"^D\b"):
        vd.SparseCoding(D.numpy(), x, 0.1)


def test_code_shape_checked_by_evaluations():
    D, x = _good()
    prob = vd.SparseCoding(D, x, 0.1)
    z = torch.zeros(2, 9, 2, dtype=torch.float64)
    for fn in (prob.energy, prob.gradient, prob.prox_grad, prob.residual, prob.kkt_violation):
        with pytest.raises(ValueError, match=r"codes"):
            fn(z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_signal_has_zero_solution(dtype):
    D, x = _good(dtype)
    x = torch.zeros_like(x)
    prob = vd.SparseCoding(D, x, 0.0)
    sol = vd.solve(prob, "ista", max_steps=5, tol=None, z0="encode")
    assert bool((sol.z == 0).all())
    assert bool((prob.energy(sol.z) == 0).all())


def test_dtype_mismatch_is_rejected_up_front():
    """D in float32 with x in float64: a ValueError at construction that names both dtypes, never a
    RuntimeError from deep inside a solve."""
    D, x = _good()
    with pytest.raises(ValueError, match="torch.float32 but x is torch.float64"):
        vd.SparseCoding(D.float(), x, 0.1)

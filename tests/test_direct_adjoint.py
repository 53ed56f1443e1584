"""The direct adjoint on the active set: support_solve against dense per-column solves, its
singular fallback, dtypes and chunking, the lasso implicit gradient it gives, and the cost model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import vars_deq as vd
from vars_deq import direct_adjoint
from vars_deq.direct_adjoint import (
    CG_ITERATION_COST,
    CG_ITERATIONS_PER_ATOM,
    DIRECT_COST,
    cg_flops,
    cg_budget,
    cg_worth_trying,
    direct_flops,
    support_groups,
    support_solve,
)
from vars_deq.prox import active_mask

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def dense_reference(gram, mask, rhs, eta, ridge=0.0):
    """Per-column torch.linalg.solve of (eta_p G_p[S, S] + ridge I) u_S = rhs_S (a loop, test only)."""
    P, M, C = rhs.shape
    gram = gram.expand(P, M, M)
    eta = torch.as_tensor(eta, dtype=rhs.dtype).broadcast_to((P, 1, 1))
    u = torch.zeros_like(rhs)
    for p in range(P):
        for c in range(C):
            S = mask[p, :, c].nonzero()[:, 0]
            if len(S):
                A = eta[p, 0, 0] * gram[p][S][:, S] + ridge * torch.eye(len(S), dtype=rhs.dtype)
                u[p, S, c] = torch.linalg.solve(A, rhs[p, S, c])
    return u


def honest_residual(gram, mask, rhs, eta, u, ridge=0.0):
    """max over columns of ||A u_S - rhs_S|| / ||rhs_S|| (0 where rhs_S = 0), per problem."""
    P, M, C = rhs.shape
    gram = gram.expand(P, M, M)
    eta = torch.as_tensor(eta, dtype=rhs.dtype).broadcast_to((P, 1, 1))
    m = mask.to(rhs.dtype)
    r = m * (eta * (gram @ (m * u)) + ridge * u) - m * rhs
    b = (m * rhs).norm(dim=1)
    rel = torch.where(b > 0, r.norm(dim=1) / torch.where(b > 0, b, 1.0), r.norm(dim=1))
    return rel.amax(-1)


@st.composite
def spd_cases(draw, shared=None):
    """Well-conditioned random support systems: Gram of N >= M + 4 Gaussian atoms per problem."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    P, M, C = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    shared_ = draw(st.booleans(), label="shared") if shared is None else shared
    density = draw(st.sampled_from((0.0, 0.3, 0.7, 1.0)), label="density")
    per_problem_eta = draw(st.booleans(), label="eta tensor")
    ridge = draw(st.sampled_from((0.0, 1e-3, 0.5, 10.0)), label="ridge")
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(1 if shared_ else P, 2 * M + 4, M, generator=g, dtype=F64)
    gram = D.transpose(1, 2) @ D
    mask = torch.rand(P, M, C, generator=g, dtype=F64) < density
    rhs = torch.randn(P, M, C, generator=g, dtype=F64)
    eta = torch.rand(P, 1, 1, generator=g, dtype=F64) + 0.1 if per_problem_eta else 0.7
    return gram, mask, rhs, eta, ridge


@given(spd_cases())
def test_matches_dense_solve_and_reports_small_residual(case):
    gram, mask, rhs, eta, ridge = case
    u, rel = support_solve(gram, mask, rhs, eta, ridge)
    ref = dense_reference(gram, mask, rhs, eta, ridge)
    torch.testing.assert_close(u, ref, rtol=1e-10, atol=1e-10 * max(1.0, ref.abs().max().item()))
    assert torch.equal(u[~mask], torch.zeros_like(u[~mask]))  # u = 0 off the support, pads included
    assert rel.shape == (rhs.shape[0],) and rel.dtype == F64
    assert bool((rel < 1e-12).all())
    torch.testing.assert_close(rel, honest_residual(gram, mask, rhs, eta, u, ridge), atol=1e-13, rtol=0)


@given(spd_cases(shared=True))
def test_shared_gram_equals_expanded_gram(case):
    gram, mask, rhs, eta, ridge = case
    expanded = gram.expand(rhs.shape[0], -1, -1).contiguous()
    u1, rel1 = support_solve(gram, mask, rhs, eta, ridge)
    u2, rel2 = support_solve(expanded, mask, rhs, eta, ridge)
    torch.testing.assert_close(u1, u2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rel1, rel2, rtol=0, atol=1e-15)


@given(spd_cases())
def test_entries_off_the_support_are_ignored(case):
    gram, mask, rhs, eta, ridge = case
    noisy = torch.where(mask, rhs, 1e30)
    u_noisy, u = support_solve(gram, mask, noisy, eta, ridge)[0], support_solve(gram, mask, rhs, eta, ridge)[0]
    assert torch.equal(u_noisy, u)


@pytest.mark.parametrize("fill", [False, True], ids=["empty", "full"])
def test_empty_and_full_supports(fill):
    g = torch.Generator().manual_seed(3)
    D = torch.randn(2, 15, 6, generator=g, dtype=F64)
    gram = D.transpose(1, 2) @ D
    mask = torch.full((2, 6, 3), fill)
    rhs = torch.randn(2, 6, 3, generator=g, dtype=F64)
    u, rel = support_solve(gram, mask, rhs, 0.25)
    if fill:
        torch.testing.assert_close(u, torch.linalg.solve(0.25 * gram, rhs), rtol=1e-12, atol=1e-12)
        assert bool((rel < 1e-13).all())
    else:
        assert torch.equal(u, torch.zeros_like(u)) and torch.equal(rel, torch.zeros_like(rel))


def test_columns_with_different_support_sizes():
    """Column c holds c random atoms (0 to M), so every pad length from M down to 0 occurs."""
    g = torch.Generator().manual_seed(4)
    P, M = 2, 7
    D = torch.randn(P, 20, M, generator=g, dtype=F64)
    gram = D.transpose(1, 2) @ D
    mask = torch.zeros(P, M, M + 1, dtype=torch.bool)
    for p in range(P):
        for c in range(M + 1):
            mask[p, torch.randperm(M, generator=g)[:c], c] = True
    rhs = torch.randn(P, M, M + 1, generator=g, dtype=F64)
    eta = torch.tensor([0.3, 2.0], dtype=F64).reshape(P, 1, 1)
    u, rel = support_solve(gram, mask, rhs, eta, 0.0)
    torch.testing.assert_close(u, dense_reference(gram, mask, rhs, eta), rtol=1e-11, atol=1e-11)
    assert torch.equal(u[~mask], torch.zeros_like(u[~mask]))
    assert bool((rel < 1e-12).all())


def test_mask_may_be_zero_one_and_rhs_zero_on_support_gives_zero_residual():
    g = torch.Generator().manual_seed(5)
    D = torch.randn(1, 9, 4, generator=g, dtype=F64)
    gram = D.transpose(1, 2) @ D
    mask = (torch.rand(3, 4, 2, generator=g) < 0.5).to(F64)
    rhs = (1 - mask) * torch.randn(3, 4, 2, generator=g, dtype=F64)  # zero on the support
    u, rel = support_solve(gram, mask, rhs, 1.0)
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(rel, torch.zeros_like(rel))
    rhs = torch.randn(3, 4, 2, generator=g, dtype=F64)
    assert torch.equal(support_solve(gram, mask, rhs, 1.0)[0], support_solve(gram, mask.bool(), rhs, 1.0)[0])


# -- singular support systems -------------------------------------------------------------------


def singular_case(seed, n=3, m=7, c=2):
    """Problem 0: N=20 tokens (G_SS SPD); problem 1: N=n < m atoms, full support (G_SS of rank n)."""
    g = torch.Generator().manual_seed(seed)
    D0 = torch.randn(20, m, generator=g, dtype=F64)
    D1 = torch.randn(n, m, generator=g, dtype=F64)
    gram = torch.stack([D0.T @ D0, D1.T @ D1])
    mask = torch.rand(2, m, c, generator=g) < 0.7
    mask[1] = True
    rhs = torch.randn(2, m, c, generator=g, dtype=F64)
    return gram, mask, rhs


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), eta=st.sampled_from((1e-3, 0.1, 1.0)))
def test_singular_support_falls_back_to_minimum_norm_least_squares(seed, n, eta):
    """Documented fallback: where G_SS is singular u_S = pinv(A) rhs_S, finite; the residual is the
    honest one (large for an rhs outside A's range); the nonsingular columns stay exact."""
    gram, mask, rhs = singular_case(seed, n=n)
    u, rel = support_solve(gram, mask, rhs, eta)
    assert bool(torch.isfinite(u).all())
    A1 = eta * gram[1]
    pinv_solution = torch.linalg.pinv(A1, hermitian=True) @ rhs[1]
    torch.testing.assert_close(u[1], pinv_solution, rtol=1e-8, atol=1e-8 * rhs.abs().max().item() / eta)
    torch.testing.assert_close(u[:1], dense_reference(gram[:1], mask[:1], rhs[:1], eta), rtol=1e-10, atol=1e-10 / eta)
    torch.testing.assert_close(rel, honest_residual(gram, mask, rhs, eta, u), rtol=1e-8, atol=1e-12)
    assert rel[0] < 1e-12 and rel[1] > 1e-3  # a random rhs is not in the rank-n range of A1

    consistent = A1 @ rhs[1]  # in A1's range: the fallback solves it exactly
    u_c, rel_c = support_solve(gram[1:], mask[1:], consistent[None], eta)
    assert rel_c[0] < 1e-9
    torch.testing.assert_close(A1 @ u_c[0], consistent, rtol=1e-9, atol=1e-9 * consistent.abs().max().item())


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5))
def test_singular_support_in_float32_is_detected(seed, n):
    """In float32 rounding leaves a rank-n Gram with tiny (not failed) pivots: the pivot test
    still sends it to the fallback instead of a huge Cholesky solution."""
    gram, mask, rhs = singular_case(seed, n=n)
    u, _ = support_solve(gram[1:].float(), mask[1:], rhs[1:].float(), 0.1)
    ref = torch.linalg.pinv(0.1 * gram[1], hermitian=True) @ rhs[1]
    assert ((u[0].double() - ref).norm() / ref.norm()).item() < 1e-3


def test_ridge_makes_a_singular_support_system_exact():
    gram, mask, rhs = singular_case(7)
    u, rel = support_solve(gram, mask, rhs, 0.5, ridge=1e-2)
    torch.testing.assert_close(u, dense_reference(gram, mask, rhs, 0.5, ridge=1e-2), rtol=1e-9, atol=1e-9)
    assert bool((rel < 1e-12).all())


# -- dtypes, chunking, validation ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_computes_in_float32(dtype):
    g = torch.Generator().manual_seed(8)
    D = torch.randn(2, 16, 6, generator=g)
    gram = (D.transpose(1, 2) @ D).to(dtype)
    mask = torch.rand(2, 6, 3, generator=g) < 0.6
    rhs = torch.randn(2, 6, 3, generator=g).to(dtype)
    u, rel = support_solve(gram, mask, rhs, 0.1)
    assert u.dtype == dtype and rel.dtype == torch.float32 and bool(torch.isfinite(u).all())
    u32, rel32 = support_solve(gram.float(), mask, rhs.float(), 0.1)
    assert torch.equal(u, u32.to(dtype)) and torch.equal(rel, rel32)
    assert bool((rel < 1e-5).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(support_solve(gram.float(), mask, rhs.float(), 0.1)[0], u32)


@given(case=spd_cases(), bucket=st.sampled_from((1, 2, 3)))
def test_solve_grouped_by_support_size_equals_one_padded_group(case, bucket):
    """Columns factorized in groups of one padded support size (the fast path) give the solve of
    every column padded to the largest support (one group), to rounding."""
    gram, mask, rhs, eta, ridge = case
    before = direct_adjoint.SUPPORT_BUCKET
    try:
        direct_adjoint.SUPPORT_BUCKET = 10**6  # every column padded to the largest support
        one = support_solve(gram, mask, rhs, eta, ridge)
        direct_adjoint.SUPPORT_BUCKET = bucket
        grouped = support_solve(gram, mask, rhs, eta, ridge)
        groups = support_groups(mask)
    finally:
        direct_adjoint.SUPPORT_BUCKET = before
    torch.testing.assert_close(grouped[0], one[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grouped[1], one[1], rtol=0, atol=1e-12)
    sizes = mask.sum(-2).flatten()
    assert sum(groups.values()) == int((sizes > 0).sum())
    assert all(s % bucket == 0 or s == int(sizes.max()) for s in groups)


def test_columns_of_many_support_sizes_match_dense_solves():
    """M = 40 atoms, supports of 1 to 40: several groups of SUPPORT_BUCKET, each exact."""
    g = torch.Generator().manual_seed(3)
    P, M, C = 2, 40, 12
    D = torch.randn(P, 2 * M, M, generator=g, dtype=F64)
    gram = D.transpose(1, 2) @ D
    sizes = torch.linspace(1, M, P * C).round().long().reshape(P, C)
    ranks = torch.rand(P, M, C, generator=g).argsort(1).argsort(1)
    mask = ranks < sizes[:, None, :]
    rhs = torch.randn(P, M, C, generator=g, dtype=F64)
    assert len(support_groups(mask)) == M // direct_adjoint.SUPPORT_BUCKET
    u, rel = support_solve(gram, mask, rhs, 0.3)
    torch.testing.assert_close(u, dense_reference(gram, mask, rhs, 0.3), rtol=1e-9, atol=1e-9)
    assert float(rel.max()) < 1e-10


@given(spd_cases())
def test_chunked_solve_equals_one_chunk(case):
    gram, mask, rhs, eta, ridge = case
    whole = support_solve(gram, mask, rhs, eta, ridge)
    before = direct_adjoint.GATHER_BUDGET_BYTES
    direct_adjoint.GATHER_BUDGET_BYTES = 1  # one column per chunk
    try:
        chunked = support_solve(gram, mask, rhs, eta, ridge)
    finally:
        direct_adjoint.GATHER_BUDGET_BYTES = before
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-15)


# -- the co-support (Schur complement) path ------------------------------------------------------


@given(spd_cases())
def test_complement_path_equals_the_support_path(case):
    """Columns with more atoms on than off solved on their co-support through A^{-1} (the fast
    path) give the per-support Cholesky solve (the plain one) to rounding, and its residual."""
    gram, mask, rhs, eta, ridge = case
    fast = support_solve(gram, mask, rhs, eta, ridge)
    plain = support_solve(gram, mask, rhs, eta, ridge, complement=False)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-10, atol=1e-10 * max(1.0, plain[0].abs().max().item()))
    assert torch.equal(fast[0][~mask], torch.zeros_like(fast[0][~mask]))
    torch.testing.assert_close(fast[1], honest_residual(gram, mask, rhs, eta, fast[0], ridge), atol=1e-13, rtol=0)


def _spy_complement(monkeypatch):
    """Records (problems, dense-row mask) of every co-support solve."""
    calls = []
    real = direct_adjoint._solve_complement

    def spy(inverse, gram, keep, rhs_rows, eta_p, ridge, co, wide):
        calls.append((inverse.shape[0], co.clone()))
        return real(inverse, gram, keep, rhs_rows, eta_p, ridge, co, wide)

    monkeypatch.setattr(direct_adjoint, "_solve_complement", spy)
    return calls


SIZES = (2, 5, 8, 9, 10, 10, 11, 12, 12, 12)  # of M = 12: eight columns dense (12 - s < 0.7 s)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_dense_supports_take_the_complement_path_and_stay_exact(monkeypatch, dtype):
    """Problem 0 (N = 40 >= M = 12, 8 of 10 columns dense) goes through A^{-1}; problem 1 (N = 5 < M,
    A singular) keeps the per-support path and its pseudo-inverse fallback; problem 2 (N = 40, 2 of
    10 columns dense) keeps it too: the path's per-problem cost would not pay."""
    g = torch.Generator().manual_seed(11)
    M, C = 12, len(SIZES)
    D = [torch.randn(n, M, generator=g, dtype=F64) for n in (40, 5, 40)]
    gram = torch.stack([d.T @ d for d in D])
    ranks = torch.rand(3, M, C, generator=g).argsort(1).argsort(1)
    sizes = torch.tensor([SIZES, SIZES, tuple(reversed(SIZES))])
    sizes[2] = torch.tensor((2, 3, 4, 5, 6, 6, 5, 4, 12, 12))
    mask = ranks < sizes[:, None, :]
    rhs = torch.randn(3, M, C, generator=g, dtype=F64)
    calls = _spy_complement(monkeypatch)
    u, rel = support_solve(gram.to(dtype), mask, rhs.to(dtype), 0.2)
    assert len(calls) == 1 and calls[0][0] == 1  # problem 0 alone
    assert torch.equal(calls[0][1], torch.tensor(SIZES) > 7)
    u_plain, rel_plain = support_solve(gram.to(dtype), mask, rhs.to(dtype), 0.2, complement=False)
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(u[0].double(), dense_reference(gram[:1], mask[:1], rhs[:1], 0.2)[0], rtol=tol, atol=tol)
    assert torch.equal(u[1:], u_plain[1:]) and torch.equal(rel[1:], rel_plain[1:])
    assert u.dtype == dtype and rel.dtype == dtype and float(rel[0]) < (1e-12 if dtype == F64 else 1e-6)


def test_a_ridge_opens_the_complement_path_on_a_singular_gram(monkeypatch):
    gram, mask, rhs = singular_case(7)  # problem 1: rank 3 of 7 atoms, full support
    calls = _spy_complement(monkeypatch)
    u, rel = support_solve(gram, mask, rhs, 0.5, ridge=1e-2)
    assert len(calls) == 1 and bool(calls[0][1][-mask.shape[-1]:].all())  # problem 1 (the last) went through A^{-1}
    torch.testing.assert_close(u, dense_reference(gram, mask, rhs, 0.5, ridge=1e-2), rtol=1e-9, atol=1e-9)
    assert bool((rel < 1e-12).all())


def test_support_groups_counts_dense_columns_at_their_co_support_size():
    mask = torch.zeros(2, 16, 4, dtype=torch.bool)
    for c, s in enumerate((3, 13, 14, 16)):  # problem 0: 3 of 4 columns dense (16 - s < 0.7 s)
        mask[0, :s, c] = True
    for c, s in enumerate((3, 4, 5, 13)):  # problem 1: 1 of 4
        mask[1, :s, c] = True
    assert support_groups(mask) == {8: 4, 16: 4}
    # on their supports: 3 (problem 0) and 3, 4, 5 pad to 8, and problem 1's dense 13 stays (the
    # largest of them, so unpadded); problem 0's 13 and 14 on leave 3 and 2 off (both padded to 3),
    # its 16 on leaves no system
    assert support_groups(mask, complement=True) == {8: 4, 13: 1, 3: 2}


def test_invalid_arguments_raise():
    gram, mask, rhs = torch.eye(3)[None], torch.ones(2, 3, 1, dtype=torch.bool), torch.ones(2, 3, 1)
    with pytest.raises(ValueError, match="rhs"):
        support_solve(gram, mask[0], rhs[0], 1.0)
    with pytest.raises(ValueError, match="mask"):
        support_solve(gram, mask[:, :2], rhs, 1.0)
    with pytest.raises(ValueError, match="gram"):
        support_solve(torch.eye(3).expand(3, 3, 3), mask, rhs, 1.0)
    with pytest.raises(ValueError, match="gram"):
        support_solve(torch.eye(2)[None], mask, rhs, 1.0)
    with pytest.raises(ValueError, match="ridge"):
        support_solve(gram, mask, rhs, 1.0, ridge=-1.0)
    with pytest.raises(ValueError, match="eta"):
        support_solve(gram, mask, rhs, torch.ones(3, 1, 1))


# -- the lasso implicit gradient ----------------------------------------------------------------


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), nonneg=st.booleans(), frac=st.floats(0.1, 0.6))
def test_lasso_implicit_gradient_matches_finite_differences(seed, nonneg, frac):
    """Where the support S and signs s = sign(z_S) are stable, the lasso solution is

        z_S = G_SS^{-1} (D_S^T x - lam s),    z = 0 off S,    G = D^T D,

    so for L = <w, z*>: dL/dx = D_S G_SS^{-1} w_S = eta D_S u_S with eta G_SS u_S = w_S (the
    adjoint system of the map T at its fixed point), and
    dz_S/dlam = -G_SS^{-1} s (support_solve with eta = 1 and rhs -s). z* is piecewise linear in
    (x, lam), so central differences are exact inside one support region: the tolerance only
    covers the forward's accuracy."""
    g = torch.Generator().manual_seed(seed)
    N, M, C, h = 12, 8, 2, 1e-5
    D = torch.randn(N, M, generator=g, dtype=F64)
    x = torch.randn(N, C, generator=g, dtype=F64)
    w = torch.randn(M, C, generator=g, dtype=F64)
    b = D.T @ x
    lam_max = (b.clamp_min(0) if nonneg else b.abs()).max().item()
    assume(lam_max > 1e-3)
    lam = frac * lam_max
    # one batch: x, x +- h e_k for every entry k of x, then lam +- h
    E = torch.eye(N * C, dtype=F64).reshape(N * C, N, C)
    xs = torch.cat([x[None], x + h * E, x - h * E, x[None].expand(2, N, C)])
    lams = torch.full((xs.shape[0], 1, 1), lam, dtype=F64)
    lams[-2], lams[-1] = lam + h, lam - h
    sol = vd.solve(vd.SparseCoding(D, xs, lams, nonneg=nonneg), solver="fista", max_steps=5000, tol=1e-12)
    assert bool(sol.converged.all())
    z = sol.z
    assume(bool((torch.sign(z) == torch.sign(z[:1])).all()))  # every perturbation stays in z's support region

    gram = (D.T @ D)[None]
    eta = 1.0 / torch.linalg.matrix_norm(D, 2).pow(2)
    pre = z[0] - eta * (gram[0] @ z[0] - b)
    mask = active_mask(pre, eta * lam, nonneg)[None]
    assert torch.equal(mask[0], z[0] != 0)

    u, rel = support_solve(gram, mask, w[None], eta)
    assert rel.item() < 1e-10
    grad_x = eta * D @ u[0]
    L = (z * w).sum((-2, -1))
    fd_x = ((L[1:1 + N * C] - L[1 + N * C:1 + 2 * N * C]) / (2 * h)).reshape(N, C)
    torch.testing.assert_close(grad_x, fd_x, rtol=1e-5, atol=1e-5 * max(1.0, fd_x.abs().max().item()))

    dz_dlam, rel = support_solve(gram, mask, -torch.sign(z[:1]), 1.0)
    assert rel.item() < 1e-10
    fd_lam = (z[-2] - z[-1]) / (2 * h)
    torch.testing.assert_close(dz_dlam[0], fd_lam, rtol=1e-5, atol=1e-5 * max(1.0, fd_lam.abs().max().item()))


# -- the cost model -----------------------------------------------------------------------------


def test_flop_counts():
    assert direct_flops(10, {6: 6}) == 6 * (6**3 / 3 + 3 * 36 + 200 + 20)
    assert direct_flops(10, {6: 2, 8: 1}) == 2 * (6**3 / 3 + 3 * 36 + 200 + 20) + (8**3 / 3 + 3 * 64 + 200 + 20)
    assert cg_flops(2, 3, 10, 7) == 2 * 3 * 7 * (2 * 100 + 100)
    assert direct_flops(8, {}) == 0 and cg_flops(4, 5, 8, 0) == 0


@given(P=st.integers(1, 64), C=st.integers(1, 64), M=st.integers(1, 256), data=st.data())
def test_cg_budget_is_the_direct_solve_in_cg_iterations(P, C, M, data):
    sizes = data.draw(st.lists(st.integers(1, M), max_size=4, unique=True), label="group sizes")
    groups = {s: data.draw(st.integers(1, P * C), label=f"columns of size {s}") for s in sizes}
    direct = (data.draw(st.floats(0, 1), label="a_d"), data.draw(st.floats(1e-12, 1e-6), label="b_d"))
    iteration = (data.draw(st.floats(0, 1e-2), label="a_cg"), data.draw(st.floats(1e-13, 1e-8), label="b_cg"))
    if groups:  # a larger support costs more
        s = max(groups)
        assert direct_flops(M, groups) <= direct_flops(M, {**groups, s: groups[s] + 1})
    budget = cg_budget(P, C, M, groups, direct, iteration)
    t_direct = direct[0] * max(1, len(groups)) + direct[1] * direct_flops(M, groups)
    t_iteration = iteration[0] + iteration[1] * cg_flops(P, C, M, 1)
    # the most iterations whose predicted time stays within the direct solve's (at least one)
    assert budget >= 1 and (budget == 1 or budget * t_iteration <= t_direct * (1 + 1e-12))
    assert (budget + 1) * t_iteration > t_direct * (1 - 1e-12)
    assert cg_budget(P, C, M, groups, (2 * direct[0], 2 * direct[1]), iteration) >= budget  # a dearer direct solve


def test_cg_budget_on_vars_shaped_problems():
    """Issue 11's measured shape (24 problems, M=128, C=64, supports up to 107 of 128 atoms): the
    budget is the library's constants applied to the counted flops, one factorization per group."""
    a_d, b_d = DIRECT_COST
    a_cg, b_cg = CG_ITERATION_COST
    groups = {107: 24 * 64}
    expected = math.floor((a_d + b_d * direct_flops(128, groups)) / (a_cg + b_cg * cg_flops(24, 64, 128, 1)))
    assert cg_budget(24, 64, 128, groups) == expected


@given(budget=st.integers(0, 10_000), support=st.integers(0, 2_000), more=st.integers(0, 100))
def test_cg_is_tried_only_where_its_budget_covers_the_iterations_it_needs(budget, support, more):
    """CG is tried where the budget reaches CG_ITERATIONS_PER_ATOM per atom of the largest support
    and not below: more budget or a smaller support never turns it off."""
    tried = cg_worth_trying(budget, support)
    assert tried == (budget >= CG_ITERATIONS_PER_ATOM * support)
    if tried:
        assert cg_worth_trying(budget + more, support) and cg_worth_trying(budget, max(0, support - more))


def test_auto_goes_straight_to_the_direct_solve_where_it_was_measured_faster():
    """On each shape of the committed bench_adjoint_cost.py run (CPU) where the direct solve was the
    faster adjoint, the library's budget and that shape's largest support skip CG."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu" / "adjoint_cost.json"
    rows = json.loads(path.read_text())["results"].values()
    direct_faster = [(r["library_cg_budget"], r["largest_support"]) for r in rows if r["faster"] == "direct"]
    assert direct_faster, "the committed run has no shape where the direct solve was faster"
    assert not any(cg_worth_trying(budget, largest) for budget, largest in direct_faster)


@pytest.mark.parametrize(
    "call",
    [
        lambda: direct_flops(-1, {1: 1}),
        lambda: direct_flops(4, {2: 1.5}),
        lambda: direct_flops(4, {5: 1}),
        lambda: direct_flops(4, [(2, 1)]),
        lambda: cg_flops(1, 1, 4, -1),
        lambda: cg_flops(1, 1, True, 3),
        lambda: cg_budget(1, 1, 4, {2: 1}, direct_cost=(float("inf"), 0.0)),
        lambda: cg_budget(1, 1, 4, {2: 1}, cg_iteration_cost=(0.0, 0.0)),
        lambda: cg_budget(1, 1, 4, {2: 1}, direct_cost=(-1.0, 1.0)),
        lambda: cg_budget(1, 1, 4, {5: 1}),
        lambda: cg_worth_trying(-1, 3),
        lambda: cg_worth_trying(10, 2.5),
    ],
)
def test_cost_model_rejects_bad_counts(call):
    with pytest.raises(ValueError):
        call()

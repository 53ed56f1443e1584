"""A direct adjoint on the active set of the lasso map, and the cost model that picks it or CG.

At a lasso fixed point the implicit backward needs, per problem p and code column c with support
S = {i : mask[p, i, c]} (the rows of the adjoint system on the support; vars_deq.backward),

    A u_S = rhs_S,    A = eta_p G_p[S, S] + ridge I,    u = 0 off S,    G_p = D_p^T D_p.

:func:`support_solve` gathers each column's support Gram and solves it by batched Cholesky
factorizations, columns grouped by support size (:func:`support_groups`), each group padded to its
own largest size: about s^3 / 3 flops per column, against one M x M Gram product per column for
every conjugate-gradient iteration (:func:`cg_flops`). A column with more atoms on its support than
off it is solved on its co-support instead, through the inverse of the whole A (a Schur
complement): (M - s)^3 / 3 flops.
:func:`cg_budget` turns the two counts, weighed by the measured time of a flop of each
(:data:`DIRECT_COST`, :data:`CG_ITERATION_COST`), into the CG iterations "auto" runs before it
solves directly.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "support_solve",
    "support_groups",
    "SUPPORT_BUCKET",
    "direct_flops",
    "cg_flops",
    "cg_budget",
    "GATHER_BUDGET_BYTES",
    "RCOND_FACTOR",
    "DIRECT_COST",
    "CG_ITERATION_COST",
    "CG_ITERATIONS_PER_ATOM",
    "cg_worth_trying",
    "COMPLEMENT_RCOND",
    "COMPLEMENT_RATIO",
    "COMPLEMENT_MIN_FRACTION",
]

SUPPORT_BUCKET = 8
"""Support sizes are padded up to a multiple of this (at most to the batch's largest), and columns
of one padded size are factorized together. A Cholesky costs s^3 / 3: padding every column to the
largest support (VARS-D at DeiT-Tiny shape: mean 66, largest 107 of 128 atoms) spends about four
times the flops of the supports themselves; steps of 8 waste at most 8 rows a column for at most
M / 8 batched calls."""

GATHER_BUDGET_BYTES = 2**23
"""Most bytes of the gathered support systems built at once: each column's s support rows of the
Gram (s x M, gathered first) and its s x s system and factor, in the compute dtype; 8 MiB.
Columns beyond it are solved in further chunks, so the direct adjoint's working memory does not
grow with the batch (the fallback's eigendecomposition of a chunk's failed columns comes on top)."""

RCOND_FACTOR = 10.0
"""A support system counts as numerically singular below the relative level
rcond = RCOND_FACTOR * s * eps(compute dtype), s its padded size: a Cholesky pivot d_k with
d_k <= rcond * max_i A_ii (every pivot is >= lambda_min(A), so cond(A) >= 1 / rcond), and in the
fallback the eigenvalues |w| <= rcond * max |w| that are treated as zero."""

DIRECT_COST = (2.7e-3, 2.0e-10)
"""Seconds of a direct solve: (per batched factorization, one per support group; per counted flop
of :func:`direct_flops`)."""

CG_ITERATION_COST = (2.3e-4, 2.1e-11)
"""Seconds of one CG iteration: (per iteration, per counted flop of :func:`cg_flops`).

CPU, one thread: both pairs are the least-squares fit, in relative error, of
``benchmarks/bench_adjoint_cost.py --device cpu --threads 1`` over its five shapes (digits-like
M=48 to a 324-atom union; the direct solve grouped by support size), rounded; the JSON
(benchmarks/results/cpu/adjoint_cost.json)
records the fit beside the library's values and how far "auto" lands from the faster adjoint.
Small batched Cholesky factorizations and gathers run far below the matrix-product throughput of
CG, and on small problems a call's fixed cost (its kernels and the Python around them) outweighs
its flops."""


COMPLEMENT_RATIO = 0.7
"""A column goes to the co-support path of :func:`support_solve` where M - s < this times s, its
support s: that path runs in float64, about twice a float32 flop's time, plus three M x M
products per column, so it pays where (M - s)^3 is well below s^3."""

COMPLEMENT_MIN_FRACTION = 0.5
"""A problem takes the co-support path only where at least this fraction of its columns are dense
(:data:`COMPLEMENT_RATIO`): its float64 inverse and M x M products are paid per problem.
Measured (VARS-D, DeiT-Tiny shape, CPU): with 95% of the columns dense (30 FISTA steps) the
path halves the solve; with 8% (at convergence) it made it 30% slower."""

COMPLEMENT_RCOND = 1e-8
"""The co-support path of :func:`support_solve` is used in a problem only where the float64
Cholesky of its whole A = eta G + ridge I has every pivot above this times max_i A_ii (or above
the input dtype's singularity level, RCOND_FACTOR * M * eps, where that is larger): A is then far
from singular, and B = A^{-1} is formed to about cond(A) * 1e-16."""


CG_ITERATIONS_PER_ATOM = 2.0
""""auto" tries CG only where its budget (:func:`cg_budget`) is at least this many iterations per
atom of the largest support system, the iterations CG can be expected to need: in exact arithmetic
CG solves an s x s system in at most s iterations, and in float32 to the adjoint tolerance (1e-6)
it took 0.55 to 1.56 times the largest support where measured (bench_adjoint_cost.py: 63
iterations for a largest support of 51, 59 for 107, 124 for 166; the four digits VARS-SD training
layers at batch 32, shipped and DEQ-trained weights, forwards to 1e-3 and 1e-2: 21-30 iterations
for 16-45). Where the budget is shorter, CG mostly spends the time of a direct solve before the
direct solve that follows it: on every one of those shapes and layers the budget was shorter (9
to 47 iterations) and the direct solve alone the faster adjoint, by 1.2-144x on the benchmark's
shapes and 1.56x on the digits training step at 1e-2, where the former rule (CG from a budget of
24 iterations) took CG first on some layers."""


def cg_worth_trying(budget: int, largest_support: int) -> bool:
    """Whether "auto" runs CG (then the direct solve for what CG leaves) rather than the direct
    solve alone: ``budget >= CG_ITERATIONS_PER_ATOM * largest_support``, the budget from
    :func:`cg_budget` and the support size from the mask (:data:`CG_ITERATIONS_PER_ATOM`)."""
    _check_counts(budget=budget, largest_support=largest_support)
    return budget >= CG_ITERATIONS_PER_ATOM * largest_support


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def support_solve(
    gram: torch.Tensor,
    mask: torch.Tensor,
    rhs: torch.Tensor,
    eta: torch.Tensor | float,
    ridge: float = 0.0,
    complement: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (eta_p G_p[S, S] + ridge I) u_S = rhs_S for every (problem p, column c), u = 0 off S.

    Columns are grouped by their support size padded up to a multiple of :data:`SUPPORT_BUCKET`
    (:func:`support_groups`); within a group each column's support indices are gathered, padded to
    the group's size, and the padded systems are factorized by one ``torch.linalg.cholesky_ex``
    and solved by ``torch.linalg.cholesky_solve``. Pad rows and columns hold d I with
    d = max_i A_ii of the column (1 where that is 0), so the padded matrix stays SPD, at the
    system's scale, and the pad entries solve to exactly 0. Empty supports are not solved
    (u = 0, residual 0).

    Fallback: a column whose system is not numerically positive definite (Cholesky fails, or a
    pivot is at most rcond * max_i A_ii, see :data:`RCOND_FACTOR`; e.g. a support larger than
    the token count makes G_SS singular) is solved instead by the symmetric eigendecomposition
    A = V diag(w) V^T as u_S = V diag(1 / w, 0 where |w| <= rcond max|w|) V^T rhs_S: the
    minimum-norm least-squares solution, which is the exact solution wherever A is nonsingular
    (to its rounding) and solves A u_S = rhs_S exactly when rhs_S lies in A's range. Otherwise no
    exact solution exists and the returned residual says how far off u is.

    Complement (``complement=True``): a dense column (M - |S| < :data:`COMPLEMENT_RATIO` |S|) of a
    mostly dense problem (:data:`COMPLEMENT_MIN_FRACTION`) whose whole A = eta_p G_p + ridge I is positive definite (a
    float64 Cholesky with every pivot above :data:`COMPLEMENT_RCOND` max_i A_ii; it needs
    N >= M tokens or a ridge), is solved through B = A^{-1} on its co-support F instead: the
    system B_FF lam = -(B g~)_F of |F| = M - |S| unknowns, then u = B (g~ + E_F lam) (the Schur
    complement; g~ is rhs on S, 0 off it). Same solution; s^3 / 3 becomes (M - s)^3 / 3 per
    column, plus one float64 factorization and inverse of A per problem and three M x M products
    per column. After a short forward most atoms are on (VARS-D at DeiT-Tiny shape after 30 FISTA
    steps: 86 of 128 on average), and there the solve took 0.5-0.6x the time. This path runs in
    float64; it adds one or two host syncs (which problems take it, and whether their A is definite).

    Compute runs in float32 or wider whatever the input dtype (bf16/fp16 in: float32); u comes
    back in ``rhs``'s dtype. A group's columns are solved in chunks whose gathered Gram fits
    :data:`GATHER_BUDGET_BYTES`. Host syncs: one for the groups (they set the shapes), one per
    chunk to learn whether any column needs the fallback, and one more in a chunk where some do.
    Nothing is differentiated through (it runs under no_grad). Inputs must be finite.

    Args:
        gram: G_p = D_p^T D_p, (P, M, M), or (1, M, M) for one Gram shared by all problems (it
            is indexed, never expanded).
        mask: (P, M, C) support, bool or 0/1.
        rhs: (P, M, C); entries off the support are ignored.
        eta: step, broadcastable to (P, 1, 1): a number or a tensor.
        ridge: >= 0, added to the support system's diagonal.
        complement: allow the co-support solve above (False: every column by its own support
            Gram, the plain path the tests compare it with).

    Returns:
        u (P, M, C) in ``rhs``'s dtype, and the relative residual ||A u_S - rhs_S|| / ||rhs_S||
        per problem, max over its columns (0 where rhs_S = 0), shape (P,), in the compute dtype.
    """
    if rhs.dim() != 3:
        raise ValueError(f"rhs must be (P, M, C), got shape {tuple(rhs.shape)}")
    P, M, C = rhs.shape
    if mask.shape != rhs.shape:
        raise ValueError(f"mask must have rhs's shape {tuple(rhs.shape)}, got {tuple(mask.shape)}")
    if gram.dim() != 3 or gram.shape[0] not in (1, P) or gram.shape[1:] != (M, M):
        raise ValueError(f"gram must be (P, M, M) or (1, M, M) with P={P}, M={M}, got {tuple(gram.shape)}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (0 <= ridge < math.inf):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    wide = _wide(gram.dtype, rhs.dtype)
    device = rhs.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        eta_t = torch.as_tensor(eta, dtype=wide, device=device)
        try:
            eta_p = eta_t.broadcast_to((P, 1, 1)).reshape(P)
        except RuntimeError:
            raise ValueError(f"eta must broadcast to (P, 1, 1) = ({P}, 1, 1), got shape {tuple(eta_t.shape)}") from None
        # one row per (problem, column) system, problem-major
        keep = (mask != 0).transpose(1, 2).reshape(P * C, M)
        rhs_rows = rhs.transpose(1, 2).reshape(P * C, M)
        u_rows = torch.zeros(P * C, M, dtype=wide, device=device)
        rel_rows = torch.zeros(P * C, dtype=wide, device=device)
        problem_of_row = torch.arange(P, device=device).repeat_interleave(C)
        sizes = keep.sum(-1)
        co = torch.zeros(P * C, dtype=torch.bool, device=device)
        if complement and C > 0:
            dense = _complement_columns(sizes.reshape(P, C), M).flatten()
            probs = dense.reshape(P, C).any(-1).nonzero()[:, 0]
            if probs.numel():
                inverse, ok = _full_inverse(gram if gram.shape[0] == 1 else gram[probs], eta_p[probs], float(ridge),
                                            wide)
                probs, inverse = probs[ok], inverse[ok]
            if probs.numel():
                rows = (probs[:, None] * C + torch.arange(C, device=device)).flatten()
                co[rows] = dense[rows]
                sub_gram = gram if gram.shape[0] == 1 else gram[probs]
                picked = rows[dense[rows]]
                u_rows[picked], rel_rows[picked] = _solve_complement(
                    inverse, sub_gram, keep[rows], rhs_rows[rows], eta_p[probs], float(ridge), dense[rows], wide)
        _solve_groups(gram, keep, rhs_rows, eta_p, problem_of_row, float(ridge), wide, (~co).nonzero()[:, 0], u_rows)
        u_wide = u_rows.reshape(P, C, M).transpose(1, 2)
        # residuals of the support systems, ||A u_S - rhs_S|| / ||rhs_S||: one product with the
        # whole Gram (per group, batched matrix-vector products cost more)
        m = keep.reshape(P, C, M).transpose(1, 2).to(wide)
        b = rhs.to(wide) * m
        r = (eta_p[:, None, None] * (gram.to(wide) @ u_wide) + ridge * u_wide) * m - b
        r_norm, b_norm = r.norm(dim=1).reshape(P * C), b.norm(dim=1).reshape(P * C)
        plain_rel = torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, 1.0), r_norm)
        rel_rows = torch.where(co, rel_rows, plain_rel)
        u = u_wide.contiguous().to(rhs.dtype)
        rel = rel_rows.reshape(P, C).amax(-1) if C > 0 else torch.zeros(P, dtype=wide, device=device)
    return u, rel


def _solve_groups(gram, keep, rhs_rows, eta_p, problem_of_row, ridge, wide, rows, u_rows) -> None:
    """The systems of ``rows`` on the support ``keep``, grouped by padded size and solved by
    :func:`_solve_rows`, chunked to :data:`GATHER_BUDGET_BYTES`; written into u_rows."""
    if rows.numel() == 0:
        return
    padded = _padded_sizes(keep[rows].sum(-1))
    order = torch.argsort(padded, stable=True)
    sizes, counts = torch.unique_consecutive(padded[order], return_counts=True)
    start = 0
    M = keep.shape[-1]
    for s, n in torch.stack([sizes, counts], 1).tolist():
        group, start = rows[order[start:start + n]], start + n
        if s == 0:  # empty supports: u = 0
            continue
        chunk = max(1, GATHER_BUDGET_BYTES // ((s * M + 2 * s * s) * torch.finfo(wide).bits // 8))
        for lo in range(0, n, chunk):
            part = group[lo:lo + chunk]
            u_rows[part] = _solve_rows(
                gram, keep[part], rhs_rows[part], eta_p[problem_of_row[part]], problem_of_row[part], ridge, s, wide,
            )


def _complement_columns(sizes: torch.Tensor, M: int) -> torch.Tensor:
    """(P, C) support sizes -> the columns the co-support path takes (where A is positive definite):
    dense ones, fewer atoms off than COMPLEMENT_RATIO times those on, in problems where at least
    COMPLEMENT_MIN_FRACTION of the columns are dense (the float64 inverse and the M x M products
    are paid per problem, so the path pays only there)."""
    dense = (M - sizes) < COMPLEMENT_RATIO * sizes
    return dense & (dense.float().mean(-1, keepdim=True) >= COMPLEMENT_MIN_FRACTION)


def _full_inverse(gram, eta_p, ridge, wide):
    """B_q = (eta_q G_q + ridge I)^{-1} in float64 (Q, M, M) for Q = len(eta_p) problems (gram
    (Q or 1, M, M)), and whether it is usable per problem: the Cholesky factorization succeeded with
    every pivot above rcond * max_i A_ii, rcond the larger of COMPLEMENT_RCOND and the singularity
    level of the input's own precision (a float32 Gram of rank r < M has float32-rounding
    eigenvalues, not zeros, which float64 would invert)."""
    M = gram.shape[-1]
    rcond = max(COMPLEMENT_RCOND, RCOND_FACTOR * M * torch.finfo(wide).eps)
    A = eta_p.to(torch.float64)[:, None, None] * gram.to(torch.float64)  # (Q, M, M), a shared Gram expanded
    A.diagonal(dim1=-2, dim2=-1).add_(ridge)
    L, info = torch.linalg.cholesky_ex(A)
    pivots = L.diagonal(dim1=-2, dim2=-1).pow(2).amin(-1)
    scale = A.diagonal(dim1=-2, dim2=-1).amax(-1)
    ok = (info == 0) & (pivots > rcond * scale)
    eye = torch.eye(M, dtype=L.dtype, device=L.device)
    # contiguous: the co-support solves gather its rows (a strided LAPACK result would be copied per chunk)
    return torch.cholesky_inverse(torch.where(ok[:, None, None], L, eye)).contiguous(), ok


def _solve_complement(inverse, gram, keep, rhs_rows, eta_p, ridge, co, wide):
    """The rows ``co`` of Q problems (keep, rhs_rows: their Q C rows, problem-major; inverse
    (Q, M, M); gram (Q or 1, M, M); eta_p (Q,)) through B = A^{-1}, S the support and F the rest:

        A u = g~ + E_F lam,  u_F = 0   =>   B_FF lam = -(B g~)_F,   u = B (g~ + E_F lam),

    g~ = rhs on S, 0 on F; a system of |F| < |S| unknowns per column (:func:`_solve_rows` on
    the co-support with B in place of the Gram), in float64. Returns u and the residual of the
    support system itself, ||A_SS u_S - rhs_S|| / ||rhs_S||, for the rows co, in ``wide``."""
    Q, M = inverse.shape[0], keep.shape[-1]
    C = keep.shape[0] // Q
    f64 = torch.float64
    g = (rhs_rows.to(f64) * keep).reshape(Q, C, M).transpose(1, 2)  # (Q, M, C)
    y = (inverse @ g).transpose(1, 2).reshape(Q * C, M)
    lam = torch.zeros(Q * C, M, dtype=f64, device=g.device)
    problem_of_row = torch.arange(Q, device=g.device).repeat_interleave(C)
    rows = co.nonzero()[:, 0]
    _solve_groups(inverse, ~keep, -y, torch.ones(Q, dtype=f64, device=g.device), problem_of_row, 0.0, f64, rows, lam)
    lam = lam.reshape(Q, C, M).transpose(1, 2)
    m = keep.to(f64).reshape(Q, C, M).transpose(1, 2)
    u = (inverse @ (g + lam)) * m
    A_u = eta_p.to(f64)[:, None, None] * (gram.to(f64) @ u) + ridge * u
    r = ((A_u - g) * m).norm(dim=1).reshape(Q * C)[rows]
    b = g.norm(dim=1).reshape(Q * C)[rows]
    rel = torch.where(b > 0, r / torch.where(b > 0, b, 1.0), r)
    return u.transpose(1, 2).reshape(Q * C, M)[rows].to(wide), rel.to(wide)


def _padded_sizes(sizes: torch.Tensor) -> torch.Tensor:
    """Support sizes rounded up to a multiple of SUPPORT_BUCKET, at most the largest of them."""
    if sizes.numel() == 0:
        return sizes
    up = (sizes + SUPPORT_BUCKET - 1) // SUPPORT_BUCKET * SUPPORT_BUCKET
    return torch.minimum(up, sizes.amax())


def support_groups(mask: torch.Tensor, complement: bool = False) -> dict[int, int]:
    """{padded system size: number of columns} of a (P, M, C) support mask, as :func:`support_solve`
    groups its columns (empty systems, which cost nothing, left out). ``complement``: count the
    dense columns (:data:`COMPLEMENT_RATIO`) of problems that are mostly dense
    (:data:`COMPLEMENT_MIN_FRACTION`) at their co-support size M - |S|, as support_solve solves
    them where the whole A is positive definite (the caller says whether it can be: N >= M or a
    ridge). One host sync."""
    P, M, C = mask.shape
    sizes = (mask != 0).sum(-2)  # (P, C)
    if complement and C > 0:
        co = _complement_columns(sizes, M).flatten()
        sizes = sizes.flatten()
        padded = torch.cat([_padded_sizes(sizes[~co]), _padded_sizes(M - sizes[co])])
    else:
        padded = _padded_sizes(sizes.flatten())
    sizes, counts = torch.unique(padded, return_counts=True)
    return {s: n for s, n in torch.stack([sizes, counts], 1).tolist() if s > 0} if padded.numel() else {}


def _solve_rows(gram, keep, rhs_rows, eta_rows, problem_of_row, ridge, s, wide):
    """support_solve on k flat (problem, column) rows: keep (k, M) bool, rhs_rows (k, M);
    returns the rows of u (k, M)."""
    k, M = keep.shape
    # each row's support atoms in index order, compacted by their rank on the support (a scatter,
    # where a sort would cost k M log M); slots past the support keep atom 0 and are masked below
    rank = keep.cumsum(-1) - 1
    idx = torch.zeros(k, s + 1, dtype=torch.long, device=keep.device)
    atoms = torch.arange(M, device=keep.device).expand(k, M)
    idx.scatter_(1, torch.where(keep, rank, s), atoms)  # off-support atoms all land in slot s
    idx = idx[:, :s]
    valid = torch.arange(s, device=keep.device) < keep.sum(-1, keepdim=True)
    vf = valid.to(wide)
    # the support rows of each Gram (whole rows, contiguous), then their support columns: several
    # times faster than one three-index gather
    rows = idx if gram.shape[0] == 1 else idx + (problem_of_row * M)[:, None]
    A = gram.reshape(-1, M).index_select(0, rows.flatten()).view(k, s, M).gather(2, idx[:, None, :].expand(k, s, s))
    A = A.to(wide).mul_((eta_rows[:, None] * vf)[:, :, None]).mul_(vf[:, None, :])
    diag = A.diagonal(dim1=-2, dim2=-1)
    d_max = torch.where(valid, diag + ridge, -math.inf).amax(-1, keepdim=True)
    pad = torch.where(d_max > 0, d_max, 1.0)
    diag.add_(torch.where(valid, ridge, pad))
    b = rhs_rows.gather(1, idx).to(wide) * vf

    rcond = RCOND_FACTOR * s * torch.finfo(wide).eps
    L, info = torch.linalg.cholesky_ex(A)
    u = torch.cholesky_solve(b[:, :, None], L)[..., 0]
    pivots = L.diagonal(dim1=-2, dim2=-1).pow(2).amin(-1)
    scale = A.diagonal(dim1=-2, dim2=-1).amax(-1)
    # the negated comparison also sends NaN pivots (a failed factorization's garbage) to the fallback
    bad = (info != 0) | ~(pivots > rcond * scale)
    if bool(bad.any()):
        which = bad.nonzero()[:, 0]
        w, V = torch.linalg.eigh(A[which])
        cut = rcond * w.abs().amax(-1, keepdim=True)
        inv = torch.where(w.abs() > cut, 1.0 / torch.where(w.abs() > cut, w, 1.0), 0.0)
        u[which] = (V @ (inv * (V.transpose(-1, -2) @ b[which, :, None])[..., 0])[..., None])[..., 0]
    u = u * vf
    out = torch.zeros(k, M, dtype=wide, device=keep.device)
    out.scatter_add_(1, idx, u)  # pad slots add their zeros to atom 0
    return out


# -- cost model --------------------------------------------------------------------------------


def _check_counts(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def direct_flops(M: int, groups: dict[int, int]) -> float:
    """Flops of :func:`support_solve` on columns of M atoms grouped as ``groups`` ({padded support
    size s: columns}, :func:`support_groups`).

    Per column (flops count a multiply and an add separately): gathering the support Gram s^2,
    its Cholesky factorization s^3 / 3, the two triangular solves s^2 each (2 s^2), the residual
    check, one product with the whole Gram (2 M^2), and 2 M for the support indices and the scatter
    back:

        sum over groups of columns(s) (s^3 / 3 + 3 s^2 + 2 M^2 + 2 M).

    The Gram G = D^T D is taken as formed (its cost, the same for CG, is left out). The fallback
    of numerically singular columns (an eigendecomposition, about 9 s^3) is not counted.
    """
    _check_groups(M, groups)
    return sum(n * (float(s) ** 3 / 3 + 3.0 * s * s + 2.0 * M * M + 2 * M) for s, n in groups.items())


def cg_flops(P: int, C: int, M: int, iterations: float) -> float:
    """Flops of conjugate gradient on the masked system, P problems of C columns, M atoms.

    Per column and iteration: one Gram product G v, M^2 multiply-adds (2 M^2 flops), and the
    vector work of two dot products and three updates (x, r, p) over M entries, 10 M flops:

        P C iterations (2 M^2 + 10 M).
    """
    _check_counts(P=P, C=C, M=M)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, float)) or not (0 <= iterations < math.inf):
        raise ValueError(f"iterations must be a finite number >= 0, got {iterations!r}")
    return P * C * iterations * (2.0 * M * M + 10.0 * M)


def _check_groups(M: int, groups: dict[int, int]) -> None:
    _check_counts(M=M)
    if not isinstance(groups, dict):
        raise ValueError(f"groups must be a dict {{padded support size: columns}}, got {type(groups).__name__}")
    for s, n in groups.items():
        _check_counts(support_size=s, columns=n)
        if s > M:
            raise ValueError(f"support sizes must be <= M={M}, got {s}")


def _check_cost(name: str, cost: tuple[float, float]) -> None:
    if not (isinstance(cost, tuple) and len(cost) == 2 and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c < math.inf for c in cost)
            and sum(cost) > 0):
        raise ValueError(f"{name} must be (seconds per call, seconds per flop), finite, >= 0, not both 0; "
                         f"got {cost!r}")


def cg_budget(
    P: int, C: int, M: int, groups: dict[int, int],
    direct_cost: tuple[float, float] = DIRECT_COST,
    cg_iteration_cost: tuple[float, float] = CG_ITERATION_COST,
) -> int:
    """CG iterations that take as long as the direct solve of the same systems (at least 1):

        floor((a_d max(1, len(groups)) + b_d direct_flops(M, groups)) / (a_cg + b_cg cg_flops(P, C, M, 1)))

    with (a, b) the measured seconds per call (one batched factorization per group) and per flop
    (:data:`DIRECT_COST`, :data:`CG_ITERATION_COST`) and ``groups`` the support sizes of the
    systems (:func:`support_groups`). "auto" runs CG for this many iterations and then solves
    directly what CG left, so it costs at most about twice the direct solve, and as little as CG
    where CG converges fast.
    """
    _check_counts(P=P, C=C, M=M)
    _check_groups(M, groups)
    _check_cost("direct_cost", direct_cost)
    _check_cost("cg_iteration_cost", cg_iteration_cost)
    direct = direct_cost[0] * max(1, len(groups)) + direct_cost[1] * direct_flops(M, groups)
    iteration = cg_iteration_cost[0] + cg_iteration_cost[1] * cg_flops(P, C, M, 1)
    return max(1, math.floor(direct / iteration))

"""K unrolled ISTA steps on an explicit Gram as one autograd node (the original VARS forward, fast).

Per problem, with the Gram G = D^T D (P or 1, M, M), b = D^T x (P, M, C), the step eta (P or 1, 1, 1,
detached) and the threshold t = eta lam,

    u_k = z_k - eta (G z_k - b),    z_{k+1} = S_t(u_k),    k = 0, ..., K - 1.

S_t has slope 1 exactly where it leaves a nonzero (|u| > t gives |u| - t > 0 in floating point),
so the support of step k is m_k = 1[z_{k+1} != 0] and dS_t/dt = -sign(z_{k+1}). From g_K = dL/dz_K,
the transposed steps are, for k = K - 1, ..., 0,

    w_k = eta m_k g_{k+1},    g_k = m_k g_{k+1} - G^T w_k,

and dL/dz_0 = g_0, dL/db = sum_k w_k, dL/dG = -sum_k w_k z_k^T, dL/dlam = eta sum_k (-sign(z_{k+1}) g_{k+1})
(summed to lam's shape). The node keeps the K + 1 iterates (two without a gradient to take),
which hold the supports and signs; autograd through the plain loop keeps about four tensors of
the codes' size per step (the product's input, the pre-threshold value, its sign and the
thresholded magnitude).

:func:`unrolled_sparse_code` is the layer's entry: it runs this node where it gives the same
result as :func:`vars_deq.sparse_code` (ISTA, fixed steps, unrolled backward, an operator with a
Gram, no autocast) and returns None elsewhere. ``ENABLED = False`` turns it off (tests compare
the two paths).
"""

from __future__ import annotations

import torch

from .backward import Backward, Unroll, make_backward
from .equilibrium import Solution, initial_codes, package
from .problems import SparseCoding, relative_residual
from .prox import threshold
from .solvers import ISTA, Solver, make_solver

__all__ = ["ENABLED", "unrolled_ista", "unrolled_sparse_code"]

#: module-level switch of the layer's fast path (tests set it False to run the plain loop)
ENABLED = True


class _UnrolledISTA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z0, gram, b, lam, eta, steps, nonneg):
        t = eta * lam
        keep = any(ctx.needs_input_grad[:4])  # without a backward only the last two iterates are needed
        zs = [z0]
        for _ in range(steps):
            # the plain step's arithmetic, in its order (LassoBatch.T_from): both paths agree bitwise
            zs.append(threshold(zs[-1] - eta * (gram @ zs[-1] - b), t, nonneg))
            if not keep:
                del zs[:-2]
        z = zs[-1]
        residual = relative_residual(zs[-2], z)
        ctx.mark_non_differentiable(residual)
        ctx.save_for_backward(gram, lam, eta, *zs)
        ctx.steps = steps
        return z, residual

    @staticmethod
    def backward(ctx, g, _residual_grad):
        gram, lam, eta, *zs = ctx.saved_tensors
        need_z0, need_gram, need_b, need_lam = ctx.needs_input_grad[:4]
        gram_t = gram.transpose(-1, -2)
        per_problem = gram.shape[0] == g.shape[0]
        g_gram = None
        g_b = torch.zeros_like(g) if need_b else None
        g_t = torch.zeros_like(g) if need_lam else None
        for k in reversed(range(ctx.steps)):
            z_next = zs[k + 1]
            # after the first step g is this backward's own tensor: mask it in place
            gu = g.masked_fill(z_next == 0, 0) if k == ctx.steps - 1 else g.masked_fill_(z_next == 0, 0)
            if need_lam:
                g_t.addcmul_(torch.sign(z_next), gu, value=-1)
            w = eta * gu
            if need_b:
                g_b += w
            if need_gram:
                if not per_problem:  # one Gram for every problem: its gradient sums theirs
                    step = -torch.einsum("pic,pjc->ij", w, zs[k])[None]
                    g_gram = step if g_gram is None else g_gram + step
                elif g_gram is None:
                    g_gram = torch.bmm(w.neg(), zs[k].transpose(-1, -2))
                else:  # in place through out=, which FlopCounterMode counts (it does not count baddbmm_)
                    torch.baddbmm(g_gram, w, zs[k].transpose(-1, -2), alpha=-1, out=g_gram)
            g = torch.baddbmm(gu, gram_t, w, alpha=-1) if per_problem else gu - gram_t @ w
        g_lam = (eta * g_t).sum_to_size(lam.shape) if need_lam else None
        return (g if need_z0 else None), g_gram, g_b, g_lam, None, None, None


def unrolled_ista(z0: torch.Tensor, gram: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, eta: torch.Tensor,
                  steps: int, nonneg: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """z_K after ``steps`` >= 1 ISTA steps from z0 (P, M, C) on the Gram (P or 1, M, M), and the
    last step's relative residual ||z_K - z_{K-1}|| / ||z_{K-1}|| (P,), without gradient.

    Differentiable in z0, gram, b and lam (``eta`` is the detached step, as in the layer)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return _UnrolledISTA.apply(z0, gram, b, lam, eta.detach(), steps, bool(nonneg))


def unrolled_sparse_code(problem: SparseCoding, solver: str | Solver, backward: str | Backward, max_steps: int,
                         tol: float | None, z0: torch.Tensor | str | None) -> tuple[torch.Tensor, Solution] | None:
    """``sparse_code(problem, solver, backward, max_steps, tol, z0, return_solution=True)`` through
    :func:`unrolled_ista` where that is the same computation (ISTA, tol=None, max_steps >= 1, an
    unrolled backward, an operator that keeps a Gram, no autocast); None where it is not, or when
    ``ENABLED`` is False."""
    if not ENABLED or tol is not None or isinstance(max_steps, bool) or not isinstance(max_steps, int) \
            or max_steps < 1:
        return None
    solver = make_solver(solver)
    if type(solver) is not ISTA or not isinstance(make_backward(backward), Unroll):
        return None
    if problem.x.is_meta or torch.is_autocast_enabled(problem.x.device.type):  # meta: no autocast to ask
        return None
    flat = problem.flat()
    gram = getattr(flat.op, "gram", None)
    if gram is None:
        return None
    z, residual = unrolled_ista(initial_codes(problem, z0), gram, flat.b, flat.lam, flat.eta, max_steps, flat.nonneg)
    steps = torch.full((z.shape[0],), max_steps, dtype=torch.long, device=z.device)
    sol = package(problem.batch_shape, problem.code_shape, z, steps, residual, None, None, solver, max_steps, tol,
                  energy_fn=lambda: problem.energy(z.detach().reshape(problem.code_shape)))
    return sol.z, sol

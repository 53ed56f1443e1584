"""FISTA in a rank-one-plus-identity metric: the proximal quasi-Newton step of Becker & Fadili ("A
quasi-Newton proximal splitting method", NeurIPS 2012; Becker, Fadili & Ochs, SIAM J. Optim. 2019)
with a fixed metric taken from the Gram's top two eigenpairs.

Plain FISTA steps by 1/L = 1/lambda_1 in every direction. Where the Gram G = D^T D has one dominant
eigenvalue (atoms that share a mean direction: the all-positive Performer features, VARS-SD's
learned atoms), that step is needlessly short in all the others. The metric

    W = a I + c v v^T,      a = lambda_2 + delta,  c = lambda_1 - lambda_2,  delta = 1e-4 lambda_1

(v the top eigenvector) majorizes G (W >= G + delta I), so the step

    u = prox^W(y - W^{-1} (G y - b)),   prox^W(x0) = argmin_z 1/2 ||z - x0||_W^2 + lam ||z||_1

has the lasso solutions as its only fixed points, and FISTA's momentum in this metric keeps its
bound, E(x_k) - E* <= 2 ||x_0 - x*||_W^2 / (k + 1)^2 <= 2 L ||x_0 - x*||^2 / (k + 1)^2 (the W norm is
at most L times the Euclidean one). The prox is separable once the scalar alpha = v^T (z - x0) of
each code column is known:

    z = S_{lam / a}(x0 - (c / a) alpha v),   phi(alpha) = v^T (z(alpha) - x0) - alpha = 0,

and phi is piecewise linear and decreasing (slope -1 - (c / a) sum over the support of v_i^2), so a
few Newton steps from the previous step's alpha solve it (to float32 rounding after about 10 outer
steps with 2 Newton steps on the captured digits, synthetic and DeiT-shaped problems). Each step
costs FISTA's product plus about 20 small elementwise ops and reductions over the codes, and the
Gram's eigendecomposition once: on CPU it pays in time only where the steps it saves are dearer
than that (README, measured results).

The loop's residual and output are those of the library's map T (step 1/L): each step returns
(y, T(y)), computed from the same product, so a stopping test means what it means for FISTA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..prox import threshold
from .base import StepSolver
from .fista import nesterov_point

#: W's margin over G, relative to lambda_1: covers float32 eigenvectors
METRIC_MARGIN = 1e-4
#: Newton steps of the first prox, whose multipliers start at 0 rather than near the solution: on the
#: DeiT VARS-D suite an exact first prox takes FISTA in this metric to a residual of 1e-2 in 2 steps
#: instead of 8
FIRST_NEWTON_STEPS = 20


class RankOneFISTAState(NamedTuple):
    """x: the iterate, xp: the previous one (P, M, C); alpha: each code column's prox multiplier
    v^T (z - x0), the next Newton start (P, 1, C); the metric W = a I + c v v^T, as the step uses it:
    v (P, M, 1), a and c / a (P, 1, 1), and, fixed for the solve, inv_a_eta = 1 / (a eta) (P, 1, 1),
    rank_one = c / (a + c) / (a eta) v and shift = (c / a) v (P, M, 1); t: the momentum, the same for
    every problem."""

    x: torch.Tensor
    xp: torch.Tensor
    alpha: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor
    c_over_a: torch.Tensor
    inv_a_eta: torch.Tensor
    rank_one: torch.Tensor
    shift: torch.Tensor
    t: float


def rank_one_metric(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v (P, M, 1), a (P, 1, 1), c (P, 1, 1)) with W = a I + c v v^T >= G + delta I, from the
    Gram's top two eigenpairs (float32 or wider)."""
    with torch.no_grad():
        g = gram if gram.dtype in (torch.float32, torch.float64) else gram.float()
        evals, evecs = torch.linalg.eigh(g)
        top = evals[..., -1].clamp_min(0)
        second = evals[..., -2].clamp_min(0) if g.shape[-1] > 1 else torch.zeros_like(top)
        delta = (METRIC_MARGIN * top).clamp_min(torch.finfo(g.dtype).tiny)
        a, c = second + delta, top - second
        return (evecs[..., -1:].to(gram.dtype), a.reshape(-1, 1, 1).to(gram.dtype),
                c.reshape(-1, 1, 1).to(gram.dtype))


def metric_prox(x0: torch.Tensor, lam, v: torch.Tensor, a: torch.Tensor, c_over_a: torch.Tensor,
                shift: torch.Tensor, nonneg: bool, alpha: torch.Tensor,
                newton_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prox^W(x0) for W = a I + c v v^T (``c_over_a`` = c / a, ``shift`` = (c / a) v) by
    ``newton_steps`` Newton steps on each column's alpha, started at ``alpha`` (P, 1, C).
    Returns (z, alpha)."""
    tau = lam / a
    v_t = v.transpose(-1, -2)
    v2_t = v_t * v_t
    v_x0 = v_t @ x0
    for _ in range(newton_steps):
        z = threshold(torch.addcmul(x0, shift, alpha, value=-1), tau, nonneg)
        phi = v_t @ z - v_x0 - alpha
        # the support's indicator as |sign z|: a comparison and a cast cost 7x as much on CPU
        support = torch.sign(z) if nonneg else torch.sign(z).abs_()
        slope = torch.addcmul(torch.ones_like(phi), c_over_a, v2_t @ support)
        alpha = alpha + phi / slope
    return threshold(torch.addcmul(x0, shift, alpha, value=-1), tau, nonneg), alpha


class RankOneFISTA(StepSolver):
    """FISTA in the metric a I + c v v^T built from the Gram's top eigenpairs (module docstring).

    Args:
        newton_steps: Newton steps on each column's prox multiplier per FISTA step (>= 1), started
            at the previous step's value (the first step takes at least FIRST_NEWTON_STEPS). With 2,
            the captured digits, synthetic and DeiT suites take the steps they take with 30.
    """

    name = "fista_rank1"
    needs_lasso = True

    def __init__(self, newton_steps: int = 2):
        if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 1:
            raise ValueError(f"newton_steps must be an int >= 1, got {newton_steps!r}")
        self.newton_steps = newton_steps

    def __repr__(self) -> str:
        return f"RankOneFISTA(newton_steps={self.newton_steps})"

    def init(self, problem, z0):
        P, M, C = z0.shape
        with torch.no_grad():
            gram = getattr(problem.op, "gram", None)
            if gram is None:
                eye = torch.eye(M, dtype=z0.dtype, device=z0.device).expand(P, M, M)
                gram = problem.normal(eye)
            # a Gram shared by every problem is decomposed once
            v, a, c = rank_one_metric(gram.detach().reshape(-1, M, M))
            v, a, c = v.expand(P, M, 1), a.expand(P, 1, 1), c.expand(P, 1, 1)
        alpha = torch.zeros(P, 1, C, dtype=z0.dtype, device=z0.device)
        inv_a_eta = 1.0 / (a * problem.eta)
        # t = 0 makes the first step plain (y_1 = x_0), as in FISTA
        return RankOneFISTAState(z0, z0, alpha, v, a, c / a, inv_a_eta, (c / (a + c)) * inv_a_eta * v,
                                 (c / a) * v, 0.0)

    def step(self, problem, state, may_sync=False):
        x, xp, v, t = state.x, state.xp, state.v, state.t
        y, t_new = nesterov_point(x, xp, t)
        q, thr = problem.pre_step(y)
        u = threshold(q, thr, problem.nonneg)
        # eta (G y - b) = y - q, and W^{-1} = (I - c / (a + c) v v^T) / a (Sherman-Morrison)
        d = y - q
        x0 = torch.addcmul(y, d, state.inv_a_eta, value=-1)
        x0 = torch.addcmul(x0, state.rank_one, v.transpose(-1, -2) @ d)
        newton_steps = self.newton_steps if t > 0 else max(self.newton_steps, FIRST_NEWTON_STEPS)
        z, alpha = metric_prox(x0, problem.lam, v, state.a, state.c_over_a, state.shift, problem.nonneg, state.alpha,
                               newton_steps)
        return state._replace(x=z, xp=x, alpha=alpha, t=t_new), y, u

    def iterate(self, state):
        return state.x

"""Differentiable equilibria: the backward choice, separate from the forward solver.

For z* = T(z*, theta) the implicit function theorem gives

    dL/dtheta = (dT/dtheta)^T u,    u = (I - J^T)^{-1} g,    J = dT/dz at z*,  g = dL/dz*.

Every mode outputs one differentiable application of T at the detached equilibrium (so the
output is exactly a value of T, sparse for lasso) and differs only in what flows back:

- ``implicit``: u from an adjoint solve. For the lasso map J = M (I - eta G) with M the active
  mask, so on the support eta G_SS u_S = g_S (symmetric positive definite: conjugate gradient,
  batched over problems and code columns; DESIGN.md section 6). Generic maps use a fixed-point
  or Anderson adjoint solve with J^T v from ``torch.func.vjp``.
- ``unroll``: backprop through every forward step (what the original VARS code does).
- ``phantom``: k - 1 damped steps z <- (1 - tau) z + tau T(z) from the detached equilibrium and
  one final T (Geng et al., "On Training Implicit Models", NeurIPS 2021); k = 1 is Jacobian-free
  backprop (Fung et al., AAAI 2022).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .equilibrium import (
    REPORT_TOL,
    AdjointStats,
    ConvergenceWarning,
    MapBatch,
    Solution,
    check_loop_args,
    package,
    run,
    solve_quietly,
)
from .problems import LassoBatch, SparseCoding
from .prox import active_mask
from .solvers import Anderson, ISTA, Solver, make_solver

__all__ = ["sparse_code", "fixed_point", "BACKWARDS", "ADJOINTS", "ConvergenceError", "check_backward_options"]

BACKWARDS = ("implicit", "unroll", "phantom")
ADJOINTS = ("cg", "fixed_point", "anderson")
UNCONVERGED = ("warn", "error", "ignore")


class ConvergenceError(RuntimeError):
    """An implicit backward was asked for after a forward that did not converge (on_unconverged="error")."""


def check_backward_options(backward, adjoint, adjoint_tol, adjoint_max_steps, phantom_steps, tau, on_unconverged):
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if adjoint is not None and adjoint not in ADJOINTS:
        raise ValueError(f"adjoint must be one of {ADJOINTS}, got {adjoint!r}")
    if not (isinstance(adjoint_tol, (int, float)) and adjoint_tol > 0):
        raise ValueError(f"adjoint_tol must be a number > 0, got {adjoint_tol!r}")
    if isinstance(adjoint_max_steps, bool) or not isinstance(adjoint_max_steps, int) or adjoint_max_steps < 1:
        raise ValueError(f"adjoint_max_steps must be an int >= 1, got {adjoint_max_steps!r}")
    if isinstance(phantom_steps, bool) or not isinstance(phantom_steps, int) or phantom_steps < 1:
        raise ValueError(f"phantom_steps must be an int >= 1, got {phantom_steps!r}")
    if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if on_unconverged not in UNCONVERGED:
        raise ValueError(f"on_unconverged must be one of {UNCONVERGED}, got {on_unconverged!r}")


def _check_unrollable(solver, backward: str) -> None:
    if backward == "unroll" and hasattr(solver, "solve_all"):
        raise ValueError(
            f"backward='unroll' needs a solver whose steps autograd can record; {solver!r} runs TorchDEQ's loop "
            "without gradient: use backward='implicit' or 'phantom'"
        )


def _check_forward(sol: Solution, on_unconverged: str) -> None:
    """The implicit gradient is exact only at a fixed point: say so when the forward is not one."""
    if on_unconverged == "ignore":
        return
    bad = ~sol.converged
    if not bool(bad.any()):
        return
    worst = sol.stats.residual.max().item()
    tol = REPORT_TOL if sol.stats.tol is None else sol.stats.tol
    msg = (
        f"implicit backward after a forward that did not converge: {int(bad.sum())} of {bad.numel()} problems "
        f"have relative residual above {tol:g} (largest {worst:.3g}) after {sol.stats.max_steps} steps of "
        f"{sol.stats.solver}; raise max_steps or use backward='unroll'"
    )
    if on_unconverged == "error":
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


# -- adjoint solves ---------------------------------------------------------------------------


def conjugate_gradient(apply_A, rhs, tol, max_steps):
    """Batched CG for SPD systems, one system per (problem, column): rhs (P, M, C), dots over M.

    Returns x, steps (P,) and the relative residual ||r|| / ||rhs|| per problem (max over columns).
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum(-2, keepdim=True)
    rhs_norm = rr.sqrt().clamp_min(torch.finfo(rhs.dtype).tiny)
    steps = torch.zeros(rhs.shape[0], dtype=torch.long, device=rhs.device)
    rel = (rr.sqrt() / rhs_norm).flatten(1).amax(-1)
    for _ in range(max_steps):
        live = rel >= tol
        if not bool(live.any()):
            break
        ap = apply_A(p)
        pap = (p * ap).sum(-2, keepdim=True)
        # problems already below tol stop moving (alpha = 0, direction kept), so their steps count is exact
        on = live.reshape(-1, *([1] * (rhs.dim() - 1)))
        alpha = torch.where(on & (pap > 0), rr / pap.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(-2, keepdim=True)
        beta = rr_new / rr.clamp_min(torch.finfo(rhs.dtype).tiny)
        p = torch.where(on, r + beta * p, p)
        rr = rr_new
        steps = steps + live.long()
        rel = (rr.sqrt() / rhs_norm).flatten(1).amax(-1)
    return x, steps, rel


def _lasso_adjoint(flat: LassoBatch, zs, g, method, tol, max_steps, ridge=0.0):
    """u with (I - J^T) u = g for the lasso map at zs; returns u restricted to the support.

    Runs in float32 or wider whatever the autocast dtype (the operator is converted when the
    forward ran in half precision). With ``ridge`` > 0 the support system becomes
    (eta G_SS + ridge I) u_S = g_S: after a short, unconverged forward the support can hold more
    atoms than tokens, G_SS is then singular and CG would diverge.
    """
    out_dtype = g.dtype
    wide = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) or flat.b.dtype in (
        torch.float16, torch.bfloat16) else g.dtype
    with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
        op = flat.op if flat.b.dtype == wide else flat.op.to(wide)
        b, eta, lam = flat.b.to(wide), flat.eta.to(wide), flat.lam.to(wide)
        zs, g = zs.to(wide), g.to(wide)
        gz = op.normal(zs)
        pre = zs - eta * (gz - b)
        mask = active_mask(pre, eta * lam, flat.nonneg).to(wide)
        if method == "cg":
            rhs = mask * g / eta

            def apply_A(v):
                return mask * (op.normal(mask * v) + (ridge / eta) * v) + (1 - mask) * v

            u, steps, rel = conjugate_gradient(apply_A, rhs, tol, max_steps)
            return u.to(out_dtype), steps, rel

        def adjoint_map(u):  # u = g + J^T u, J^T v = (I - eta G)(M v)
            mv = mask * u
            return g + mv - eta * op.normal(mv) - ridge * mv

        u, steps, rel = _iterate_adjoint(adjoint_map, g, method, tol, max_steps, mask)
        return u.to(out_dtype), steps, rel


def _iterate_adjoint(adjoint_map, g, method, tol, max_steps, mask=None):
    """Fixed-point or Anderson iteration on u = g + J^T u; the residual ||u_next - u|| is measured
    relative to ||g|| (the right-hand side), the same criterion as the CG adjoint's."""
    solver = ISTA() if method == "fixed_point" else Anderson(safeguard="residual")
    flat = MapBatch(adjoint_map, g.shape)
    scale = g.flatten(1).norm(dim=-1).clamp_min(torch.finfo(g.dtype).tiny)
    u, steps, res, _, _ = run(flat, solver, g, max_steps, tol, False, residual_scale=scale)
    if mask is not None:
        u = mask * u  # off the support dT/dtheta is zero, so only u_S matters
    return u, steps, res


class _Implicit(torch.autograd.Function):
    """Identity forward on T(z*); backward replaces the incoming g by u = (I - J^T)^{-1} g, which
    then flows through T's dependence on the parameters. ``adjoint(zs, g) -> (u, steps, residual)``
    is the adjoint solve (lasso active set, or a generic map's VJP)."""

    @staticmethod
    def forward(out, zs, adjoint, method, tol, stats):
        return out.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, zs, adjoint, method, tol, stats = inputs
        ctx.save_for_backward(zs)
        ctx.adjoint, ctx.method, ctx.tol, ctx.stats = adjoint, method, tol, stats

    @staticmethod
    def backward(ctx, g):
        (zs,) = ctx.saved_tensors
        u, steps, rel = ctx.adjoint(zs, g)
        _record_adjoint(ctx.stats, ctx.method, steps, rel, ctx.tol)
        return u, None, None, None, None, None


def _map_adjoint(f, method, tol, max_steps):
    """The adjoint solve of a generic map: u = g + J^T u with J^T v from torch.func.vjp."""

    def adjoint(zs, g):
        with torch.enable_grad():
            _, vjp_fn = torch.func.vjp(f, zs)
        shape = zs.shape

        def adjoint_map(u):
            return g.reshape(u.shape) + vjp_fn(u.reshape(shape))[0].reshape(u.shape)

        with torch.no_grad():
            u, steps, rel = _iterate_adjoint(adjoint_map, g.reshape(g.shape[0], -1), method, tol, max_steps)
        return u.reshape(shape), steps, rel

    return adjoint


def _record_adjoint(stats: AdjointStats | None, method, steps, rel, tol) -> None:
    converged = rel < tol
    if stats is not None:
        stats.method, stats.steps, stats.residual, stats.converged = method, steps, rel, converged
        stats.calls += 1
    if not bool(converged.all()):
        warnings.warn(
            f"adjoint solve ({method}) did not reach adjoint_tol={tol:g} on {int((~converged).sum())} of "
            f"{converged.numel()} problems (largest residual {rel.max().item():.3g}); raise adjoint_max_steps",
            ConvergenceWarning,
            stacklevel=2,
        )


# -- public entry points -----------------------------------------------------------------------


def sparse_code(
    problem: SparseCoding,
    solver: str | Solver = "anderson",
    backward: str = "implicit",
    max_steps: int = 100,
    tol: float | None = 1e-4,
    z0: torch.Tensor | str | None = None,
    adjoint: str = "cg",
    adjoint_tol: float = 1e-6,
    adjoint_max_steps: int = 200,
    adjoint_ridge: float = 0.0,
    phantom_steps: int = 1,
    tau: float = 1.0,
    on_unconverged: str = "warn",
    return_solution: bool = False,
):
    """The lasso equilibrium z* (..., M, C), differentiable w.r.t. x, lam and the dictionary.

    Args:
        problem: a :class:`SparseCoding`.
        solver, max_steps, tol, z0: the forward solve (see :func:`vars_deq.solve`).
        backward: "implicit", "unroll" or "phantom" (any of them with any solver).
        adjoint: the implicit adjoint solve: "cg" on the active set (default), "fixed_point" or
            "anderson"; ``adjoint_tol`` (residual relative to the right-hand side) and
            ``adjoint_max_steps`` bound it. ``adjoint_ridge`` > 0 solves the damped support system
            (eta G_SS + ridge I) u_S = g_S: exact at 0, and well posed when a short unconverged
            forward leaves a support larger than the token count (G_SS singular).
        phantom_steps, tau: k and the damping of the phantom gradient.
        on_unconverged: what an implicit backward does after an unconverged forward:
            "warn" (default), "error" (raise :class:`ConvergenceError`) or "ignore".
        return_solution: also return the forward :class:`Solution`; after ``backward()`` its
            ``stats.adjoint`` holds the adjoint solve's steps and residual.
    """
    check_backward_options(backward, adjoint, adjoint_tol, adjoint_max_steps, phantom_steps, tau, on_unconverged)
    if not (isinstance(adjoint_ridge, (int, float)) and adjoint_ridge >= 0):
        raise ValueError(f"adjoint_ridge must be a number >= 0, got {adjoint_ridge!r}")
    solver = make_solver(solver)
    _check_unrollable(solver, backward)
    if backward == "unroll":
        sol = solve_quietly(problem, solver, max_steps, tol, z0)
        z = sol.z
    else:
        with torch.no_grad():
            sol = solve_quietly(problem, solver, max_steps, tol, z0)
        flat = problem.flat()
        zs = sol.z.detach().reshape(flat.b.shape)
        if backward == "implicit":
            _check_forward(sol, on_unconverged)
            sol.stats.adjoint = AdjointStats(method=adjoint)
            out = flat.T(zs)
            solve_adjoint = lambda zs_, g: _lasso_adjoint(  # noqa: E731
                flat, zs_, g, adjoint, adjoint_tol, adjoint_max_steps, adjoint_ridge)
            z = _Implicit.apply(out, zs, solve_adjoint, adjoint, adjoint_tol, sol.stats.adjoint)
        else:
            z = _phantom(flat.T, zs, phantom_steps, tau)
        z = z.reshape(problem.code_shape)
        sol.z = z
    return (z, sol) if return_solution else z


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    solver: str | Solver = "anderson",
    backward: str = "implicit",
    max_steps: int = 50,
    tol: float | None = 1e-4,
    adjoint: str = "anderson",
    adjoint_tol: float = 1e-6,
    adjoint_max_steps: int = 200,
    phantom_steps: int = 1,
    tau: float = 1.0,
    on_unconverged: str = "warn",
    return_solution: bool = False,
):
    """The fixed point z* = f(z*) of any DEQ map, differentiable w.r.t. what f closes over.

    ``z0`` (B, ...): its first dim indexes independent problems (each stops on its own; f is
    applied to the whole batch). Solvers: "ista" (plain iteration), "anderson" (residual
    safeguard), a torchdeq backend, or a solver object that works on generic maps.
    """
    check_backward_options(backward, adjoint, adjoint_tol, adjoint_max_steps, phantom_steps, tau, on_unconverged)
    if not isinstance(z0, torch.Tensor) or z0.dim() < 1:
        raise ValueError("z0 must be a tensor whose first dim indexes the problems")
    if adjoint == "cg":
        raise ValueError("adjoint='cg' needs a symmetric system (sparse coding); use 'fixed_point' or 'anderson'")
    solver = make_solver(solver, generic=True)
    _check_unrollable(solver, backward)
    check_loop_args(max_steps, tol)
    flat = MapBatch(f, z0.shape)
    solver.check(flat)
    P = z0.shape[0]
    z0f = z0.reshape(P, -1)

    def solve_flat():
        z, steps, residual, rt, _ = run(flat, solver, z0f, max_steps, tol, False)
        return package(z0.shape[:1], z0.shape, z, steps, residual, rt, None, solver, max_steps, tol)

    if backward == "unroll":
        sol = solve_flat()
        z = sol.z
    else:
        with torch.no_grad():
            sol = solve_flat()
        zs = sol.z.detach()
        if backward == "implicit":
            _check_forward(sol, on_unconverged)
            sol.stats.adjoint = AdjointStats(method=adjoint)
            z = _Implicit.apply(f(zs), zs, _map_adjoint(f, adjoint, adjoint_tol, adjoint_max_steps), adjoint,
                                adjoint_tol, sol.stats.adjoint)
        else:
            z = _phantom(f, zs, phantom_steps, tau)
        sol.z = z
    return (z, sol) if return_solution else z


def _phantom(T, zs, k, tau):
    z = zs
    for _ in range(k - 1):
        z = (1 - tau) * z + tau * T(z)
    return T(z)

"""Differentiable equilibria: the backward choice, separate from the forward solver.

For z* = T(z*, theta) the implicit function theorem gives

    dL/dtheta = (dT/dtheta)^T u,    u = (I - J^T)^{-1} g,    J = dT/dz at z*,  g = dL/dz*.

Every mode outputs one differentiable application of T at the detached equilibrium (so the
output is exactly a value of T, sparse for lasso) and differs only in what flows back:

Each mode is an object (:class:`Implicit`, :class:`Unroll`, :class:`Phantom`) that validates its
fields at construction and has one method, ``attach``, which both :func:`sparse_code` and
:func:`fixed_point` call; so any solver works with any backward. Strings are sugar for the
defaults: ``backward="implicit"`` is ``Implicit()``.

- ``implicit``: u from an adjoint solve. For the lasso map J = M (I - eta G) with M the active
  mask, so on the support eta G_SS u_S = g_S (symmetric positive definite: a batched Cholesky of
  each code column's support Gram, or conjugate gradient, batched over problems and code
  columns). Generic maps use a fixed-point or Anderson adjoint solve with J^T v from
  ``torch.func.vjp``.
- ``unroll``: backprop through every forward step (what the original VARS code does).
- ``phantom``: k - 1 damped steps z <- (1 - tau) z + tau T(z) from the detached equilibrium and
  one final T (Geng et al., "On Training Implicit Models", NeurIPS 2021); k = 1 is Jacobian-free
  backprop (Fung et al., AAAI 2022).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

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
from .direct_adjoint import cg_budget, cg_worth_trying, support_groups, support_solve
from .prox import active_mask
from .solvers import ISTA, Anderson, LoopSolver, Solver, make_solver

__all__ = ["Backward", "Implicit", "Unroll", "Phantom", "make_backward", "sparse_code", "fixed_point", "BACKWARDS",
           "ADJOINTS", "ConvergenceError", "FLAT_BACKWARD_KEYS"]

ADJOINTS = ("auto", "direct", "cg", "fixed_point", "anderson")
#: adjoint solves that need the lasso's symmetric support system
LASSO_ONLY_ADJOINTS = ("direct", "cg")
UNCONVERGED = ("warn", "error", "ignore")


class ConvergenceError(RuntimeError):
    """An implicit backward was asked for after a forward that did not converge (on_unconverged="error")."""


def _flat(name: str, default: Any) -> Any:
    """A backward field that flat keyword sugar (``adjoint_tol=...``, the CLI's ``--adjoint-tol``) also sets."""
    return field(default=default, metadata={"flat": name})


class Backward:
    """How gradients flow through an equilibrium z* = T(z*). One method, :meth:`attach`, serves
    lasso problems and generic maps alike."""

    name: ClassVar[str]

    def attach(self, eq: "_Equilibrium") -> tuple[torch.Tensor, Solution]:
        """Run the forward of ``eq`` and return (z flat, its Solution) with this mode's gradient."""
        raise TypeError(f"{type(self).__name__} does not define attach")

    def check(self, solver: Solver, lasso: bool) -> None:
        """Refuse a solver or problem kind this mode cannot differentiate (at call time, before solving)."""

    @classmethod
    def flat_keys(cls) -> dict[str, str]:
        """Flat keyword -> field name of this mode's options."""
        return {f.metadata["flat"]: f.name for f in dataclasses.fields(cls) if "flat" in f.metadata}


@dataclass(frozen=True)
class Implicit(Backward):
    """Implicit differentiation: u = (I - J^T)^{-1} g by an adjoint solve at the detached equilibrium.

    Args:
        adjoint: "auto" (default: for lasso problems CG for as many iterations as the direct solve
            would take in time, :func:`~vars_deq.direct_adjoint.cg_budget`, then the direct solve
            for the problems CG left, or the direct solve alone where that budget is shorter than
            the iterations CG can be expected to need,
            :func:`~vars_deq.direct_adjoint.cg_worth_trying`; "anderson" for generic maps),
            "direct" (batched Cholesky of each code column's support Gram, exact to rounding),
            "cg" on the lasso's active set (the same support system), "fixed_point" or "anderson" on
            u = g + J^T u.
        tol: the adjoint's residual, relative to the right-hand side g.
        max_steps: most adjoint iterations.
        ridge: >= 0; solves the damped support system (eta G_SS + ridge I) u_S = g_S: exact at 0,
            and well posed when a short unconverged forward leaves a support larger than the
            token count (G_SS singular).
        on_unconverged: after a forward that did not converge, "warn", "error" (raise
            :class:`ConvergenceError`) or "ignore".
    """

    name: ClassVar[str] = "implicit"
    adjoint: str = _flat("adjoint", "auto")
    tol: float = _flat("adjoint_tol", 1e-6)
    max_steps: int = _flat("adjoint_max_steps", 200)
    ridge: float = _flat("adjoint_ridge", 0.0)
    on_unconverged: str = _flat("on_unconverged", "warn")

    def __post_init__(self):
        if self.adjoint not in ADJOINTS:
            raise ValueError(f"adjoint must be one of {ADJOINTS}, got {self.adjoint!r}")
        if not _positive(self.tol):
            raise ValueError(f"adjoint_tol (Implicit.tol) must be a number > 0, got {self.tol!r}")
        if not _count(self.max_steps, 1):
            raise ValueError(f"adjoint_max_steps (Implicit.max_steps) must be an int >= 1, got {self.max_steps!r}")
        if not (_number(self.ridge) and self.ridge >= 0):
            raise ValueError(f"adjoint_ridge (Implicit.ridge) must be a number >= 0, got {self.ridge!r}")
        if self.on_unconverged not in UNCONVERGED:
            raise ValueError(f"on_unconverged must be one of {UNCONVERGED}, got {self.on_unconverged!r}")

    def check(self, solver, lasso):
        if not lasso and self.adjoint in LASSO_ONLY_ADJOINTS:
            raise ValueError(f"adjoint={self.adjoint!r} needs a symmetric system (sparse coding); use 'fixed_point', "
                             "'anderson' or 'auto'")

    def method(self, lasso: bool) -> str:
        """The adjoint solve asked for: "auto" stays for lasso problems (resolved in the backward,
        from the support sizes) and is "anderson" for generic maps."""
        if self.adjoint != "auto" or lasso:
            return self.adjoint
        return "anderson"

    def attach(self, eq):
        with torch.no_grad():
            sol = eq.solve()
        zs = sol.z.detach()
        grad = torch.is_grad_enabled()
        report = _unconverged_report(sol, self.on_unconverged) if grad else None
        site = (report.filename, report.lineno, report.module) if report is not None else (_caller() if grad else None)
        method = self.method(eq.lasso)
        sol.stats.adjoint = AdjointStats(method=method)
        solve_adjoint = eq.adjoint(method, self.tol, self.max_steps, self.ridge)
        z = _ImplicitFn.apply(eq.T(zs), zs, solve_adjoint, (self.tol, report, site), sol.stats.adjoint)
        return z, sol


@dataclass(frozen=True)
class Unroll(Backward):
    """Backpropagation through every forward step (what the original VARS code does)."""

    name: ClassVar[str] = "unroll"

    def check(self, solver, lasso):
        if isinstance(solver, LoopSolver):
            raise ValueError(
                f"backward='unroll' needs a solver whose steps autograd can record; {solver!r} runs its own loop "
                "without gradient: use backward='implicit' or 'phantom'"
            )

    def attach(self, eq):
        sol = eq.solve()
        return sol.z, sol


@dataclass(frozen=True)
class Phantom(Backward):
    """Phantom gradient (Geng et al., "On Training Implicit Models", NeurIPS 2021): from the
    detached equilibrium, ``steps - 1`` damped steps z <- (1 - tau) z + tau T(z) and one final T;
    ``steps=1`` is Jacobian-free backprop (Fung et al., AAAI 2022)."""

    name: ClassVar[str] = "phantom"
    steps: int = _flat("phantom_steps", 1)
    tau: float = _flat("tau", 1.0)

    def __post_init__(self):
        if not _count(self.steps, 1):
            raise ValueError(f"phantom_steps (Phantom.steps) must be an int >= 1, got {self.steps!r}")
        if not (_number(self.tau) and 0 < self.tau <= 1):
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")

    def attach(self, eq):
        with torch.no_grad():
            sol = eq.solve()
        z = sol.z.detach()
        for _ in range(self.steps - 1):
            z = (1 - self.tau) * z + self.tau * eq.T(z)
        return eq.T(z), sol


BACKWARD_TYPES: dict[str, type[Backward]] = {cls.name: cls for cls in (Implicit, Unroll, Phantom)}
BACKWARDS = tuple(BACKWARD_TYPES)
#: flat keyword sugar for backward fields -> the mode it configures (declared once, on the fields)
FLAT_BACKWARD_KEYS: dict[str, str] = {k: cls.name for cls in BACKWARD_TYPES.values() for k in cls.flat_keys()}


def make_backward(spec: "str | Backward" = "implicit", **flat: Any) -> Backward:
    """A backward object from a name in BACKWARDS or an object, refined by flat keywords.

    ``make_backward("implicit", adjoint_tol=1e-8)`` is ``Implicit(tol=1e-8)``; a flat keyword of
    another mode (``phantom_steps`` with "implicit") is an error, never silently ignored.
    """
    if isinstance(spec, Backward):
        backward = spec
    elif isinstance(spec, str) and spec in BACKWARD_TYPES:
        backward = BACKWARD_TYPES[spec]()
    else:
        raise ValueError(f"backward must be one of {BACKWARDS} or a Backward object (vd.Implicit(...)), got {spec!r}")
    unknown = sorted(set(flat) - set(FLAT_BACKWARD_KEYS))
    if unknown:
        raise ValueError(f"unknown backward option(s) {unknown}; valid: {sorted(FLAT_BACKWARD_KEYS)}")
    if not flat:
        return backward
    keys = type(backward).flat_keys()
    foreign = sorted(set(flat) - set(keys))
    if foreign:
        modes = sorted({FLAT_BACKWARD_KEYS[k] for k in foreign})
        raise ValueError(f"{foreign} configure backward {' / '.join(repr(m) for m in modes)}, but backward is "
                         f"{backward.name!r}")
    return dataclasses.replace(backward, **{keys[k]: v for k, v in flat.items()})


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _count(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


class _UnconvergedReport:
    """What the implicit backward says when it runs at a forward that did not converge: the
    message, what to do (warn or raise), and the user's line that asked for the forward."""

    def __init__(self, message: str, on_unconverged: str):
        self.message, self.on_unconverged = message, on_unconverged
        self.filename, self.lineno, self.module = _caller()

    def emit(self) -> None:
        if self.on_unconverged == "error":
            raise ConvergenceError(self.message)
        site = (self.filename, self.lineno)
        UNCONVERGED_BACKWARDS[site] = UNCONVERGED_BACKWARDS.get(site, 0) + 1
        if UNCONVERGED_BACKWARDS[site] == 1:  # once per call site and run; later ones are counted
            warnings.warn_explicit(
                self.message + " (later ones from this line are counted in vars_deq.backward.UNCONVERGED_BACKWARDS, "
                "not repeated)", ConvergenceWarning, self.filename, self.lineno, self.module)


#: (file, line) of the call that built an equilibrium -> how many implicit backwards ran at one
#: that had not converged (the warning is given once per line; the CLI reports these counts)
UNCONVERGED_BACKWARDS: dict[tuple[str, int], int] = {}


def _caller() -> tuple[str, int, str]:
    """The innermost frame outside vars_deq and torch: the user's line."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "vars_deq" or name.startswith(("vars_deq.", "torch.", "timm."))
                or name in ("torch", "timm")):
            return frame.f_code.co_filename, frame.f_lineno, name
        frame = frame.f_back
    return "<unknown>", 0, "<unknown>"


def _unconverged_report(sol: Solution, on_unconverged: str) -> "_UnconvergedReport | None":
    """The implicit gradient is exact only at a fixed point: a report for a forward that is not one.

    Built at the forward (one host sync) and given only when a backward uses the equilibrium, so a
    forward under no_grad, in evaluation or in drawing maps says nothing."""
    if on_unconverged == "ignore":
        return None
    bad = ~sol.converged
    if not bool(bad.any()):
        return None
    worst = sol.stats.residual.max().item()
    tol = REPORT_TOL if sol.stats.tol is None else sol.stats.tol
    msg = (
        f"implicit backward after a forward that did not converge: {int(bad.sum())} of {bad.numel()} problems "
        f"have relative residual above {tol:g} (largest {worst:.3g}) after {sol.stats.max_steps} steps of "
        f"{sol.stats.solver}; raise max_steps or use backward='unroll'"
    )
    return _UnconvergedReport(msg, on_unconverged)


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
    """u with (I - J^T) u = g for the lasso map at zs; returns (u, steps, residual, method run).

    Runs in float32 or wider whatever the autocast dtype (the operator is converted when the
    forward ran in half precision). With ``ridge`` > 0 the support system becomes
    (eta G_SS + ridge I) u_S = g_S: after a short, unconverged forward the support can hold more
    atoms than tokens, G_SS is then singular and CG would diverge. "direct" solves the support
    systems by batched Cholesky (:func:`vars_deq.direct_adjoint.support_solve`). "auto" runs CG
    for as many iterations as the direct solve would take in time
    (:func:`vars_deq.direct_adjoint.cg_budget`), then solves directly the problems CG left
    unconverged ("cg+direct"; "cg" when none): at most about twice the faster of the two. Where
    that budget is shorter than CG can be expected to need (twice the largest support,
    :func:`vars_deq.direct_adjoint.cg_worth_trying`) it solves directly at once ("direct").
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
        budget = max_steps
        if method == "auto":
            P, M, C = mask.shape
            # the direct solve takes dense columns on their co-support where A can be positive definite
            complement = ridge > 0 or op.num_tokens >= M
            budget = min(max_steps, cg_budget(P, C, M, support_groups(mask, complement)))  # the backward may sync
            if not cg_worth_trying(budget, int(mask.sum(-2).amax()) if mask.numel() else 0):
                method = "direct"
        if method == "direct":
            u, rel = support_solve(_gram(op), mask, g, eta, ridge)
            return u.to(out_dtype), torch.ones(u.shape[0], dtype=torch.long, device=u.device), rel, method
        if method in ("cg", "auto"):
            rhs = mask * g / eta

            def apply_A(v):
                return mask * (op.normal(mask * v) + (ridge / eta) * v) + (1 - mask) * v

            u, steps, rel = conjugate_gradient(apply_A, rhs, tol, budget)
            if method == "cg":
                return u.to(out_dtype), steps, rel, method
            left = ~(rel <= tol)
            if not bool(left.any()):
                return u.to(out_dtype), steps, rel, "cg"
            # the problems CG left within the direct solve's time: solved directly
            which = left.nonzero()[:, 0]
            gram = _gram(op)
            eta_p = torch.as_tensor(eta).broadcast_to((u.shape[0], 1, 1))
            u[which], rel[which] = support_solve(gram if gram.shape[0] == 1 else gram[which], mask[which], g[which],
                                                 eta_p[which], ridge)
            return u.to(out_dtype), steps, rel, "cg+direct"

        def adjoint_map(u):  # u = g + J^T u, J^T v = (I - eta G)(M v)
            mv = mask * u
            return g + mv - eta * op.normal(mv) - ridge * mv

        u, steps, rel = _iterate_adjoint(adjoint_map, g, method, tol, max_steps, mask)
        return u.to(out_dtype), steps, rel, method


def _gram(op) -> torch.Tensor:
    """G = D^T D (P or 1, M, M): the operator's own Gram where it keeps one, else from its atoms."""
    gram = getattr(op, "gram", None)
    if gram is not None:
        return gram.reshape(-1, *gram.shape[-2:])
    d = op.materialize()
    return d.transpose(-1, -2) @ d


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


class _ImplicitFn(torch.autograd.Function):
    """Identity forward on T(z*); backward replaces the incoming g by u = (I - J^T)^{-1} g, which
    then flows through T's dependence on the parameters. ``adjoint(zs, g) -> (u, steps, residual)``
    is the adjoint solve (lasso active set, or a generic map's VJP)."""

    @staticmethod
    def forward(out, zs, adjoint, checks, stats):
        return out.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, zs, adjoint, (tol, report, site), stats = inputs
        ctx.save_for_backward(zs)
        ctx.adjoint, ctx.tol, ctx.report, ctx.site, ctx.stats = adjoint, tol, report, site, stats

    @staticmethod
    def backward(ctx, g):
        if ctx.report is not None:
            ctx.report.emit()
        (zs,) = ctx.saved_tensors
        u, steps, rel, method = ctx.adjoint(zs, g)
        _record_adjoint(ctx.stats, method, steps, rel, ctx.tol, ctx.site)
        return u, None, None, None, None


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
        return u.reshape(shape), steps, rel, method

    return adjoint


def _record_adjoint(stats: AdjointStats | None, method, steps, rel, tol, site=None) -> None:
    # a direct solve is exact to rounding: its residual measures the support Gram's conditioning in
    # the compute dtype, so it counts as converged below sqrt(eps) as well as below tol ("cg+direct":
    # the problems CG left were solved directly, the others are below tol)
    limit = max(tol, math.sqrt(torch.finfo(rel.dtype).eps)) if method in ("direct", "cg+direct") else tol
    converged = rel < limit
    if stats is not None:
        stats.method, stats.steps, stats.residual, stats.converged = method, steps, rel, converged
        stats.calls += 1
    if bool(converged.all()):
        return
    filename, lineno, module = site or ("<unknown>", 0, "<unknown>")
    key = (filename, lineno)
    UNCONVERGED_ADJOINTS[key] = UNCONVERGED_ADJOINTS.get(key, 0) + 1
    if UNCONVERGED_ADJOINTS[key] == 1:  # once per call site and run; later ones are counted
        warnings.warn_explicit(
            f"adjoint solve ({method}) did not reach adjoint_tol={tol:g} on {int((~converged).sum())} of "
            f"{converged.numel()} problems (largest residual {rel.max().item():.3g}); "
            + ("the support Gram is near singular: set adjoint_ridge > 0" if method == "direct"
               else "raise adjoint_max_steps")
            + " (later ones from this line are counted in vars_deq.backward.UNCONVERGED_ADJOINTS, not repeated)",
            ConvergenceWarning, filename, lineno, module)


#: like UNCONVERGED_BACKWARDS, for adjoint solves that stopped above their tolerance
UNCONVERGED_ADJOINTS: dict[tuple[str, int], int] = {}


# -- the equilibria a backward attaches to -----------------------------------------------------


class _Equilibrium:
    """What a backward needs of a problem: the forward solve, the map T on flat codes, and the
    adjoint solve. ``lasso`` says which adjoint solves apply."""

    lasso: bool
    solver: Solver

    def solve(self) -> Solution:
        raise TypeError

    def T(self, z: torch.Tensor) -> torch.Tensor:
        raise TypeError

    def adjoint(self, method: str, tol: float, max_steps: int, ridge: float) -> Callable:
        raise TypeError


class _LassoEquilibrium(_Equilibrium):
    lasso = True

    def __init__(self, problem: SparseCoding, solver, max_steps, tol, z0):
        self.problem, self.solver, self.max_steps, self.tol, self.z0 = problem, solver, max_steps, tol, z0
        self.flat = problem.flat()

    def solve(self):
        sol = solve_quietly(self.problem, self.solver, self.max_steps, self.tol, self.z0)
        sol.z = sol.z.reshape(self.flat.b.shape)
        return sol

    def T(self, z):
        return self.flat.T(z)

    def adjoint(self, method, tol, max_steps, ridge):
        return lambda zs, g: _lasso_adjoint(self.flat, zs, g, method, tol, max_steps, ridge)


class _MapEquilibrium(_Equilibrium):
    lasso = False

    def __init__(self, f, z0, solver, max_steps, tol):
        self.f, self.z0, self.solver, self.max_steps, self.tol = f, z0, solver, max_steps, tol
        self.batch = MapBatch(f, z0.shape)
        solver.check(self.batch)

    def solve(self):
        P = self.z0.shape[0]
        z, steps, residual, rt, _ = run(self.batch, self.solver, self.z0.reshape(P, -1), self.max_steps, self.tol,
                                        False)
        sol = package(self.z0.shape[:1], self.z0.shape, z, steps, residual, rt, None, self.solver, self.max_steps,
                      self.tol)
        return sol

    def T(self, z):
        return self.f(z)

    def adjoint(self, method, tol, max_steps, ridge):
        if ridge:
            raise ValueError("adjoint_ridge (Implicit.ridge) damps the lasso's support system; a generic map has none")
        return _map_adjoint(self.f, method, tol, max_steps)


# -- public entry points -----------------------------------------------------------------------


def sparse_code(
    problem: SparseCoding,
    solver: str | Solver = "anderson",
    backward: str | Backward = "implicit",
    max_steps: int = 100,
    tol: float | None = 1e-4,
    z0: torch.Tensor | str | None = None,
    return_solution: bool = False,
    **backward_options: Any,
):
    """The lasso equilibrium z* (..., M, C), differentiable w.r.t. x, lam and the dictionary.

    Args:
        problem: a :class:`SparseCoding`.
        solver, max_steps, tol, z0: the forward solve (see :func:`vars_deq.solve`).
        backward: ``Implicit(...)``, ``Unroll()`` or ``Phantom(...)`` (any of them with any step
            solver), or a name in BACKWARDS for the defaults.
        backward_options: flat sugar for the backward's fields (``adjoint``, ``adjoint_tol``,
            ``adjoint_max_steps``, ``adjoint_ridge``, ``on_unconverged`` of Implicit;
            ``phantom_steps``, ``tau`` of Phantom).
        return_solution: also return the forward :class:`Solution`; after ``backward()`` its
            ``stats.adjoint`` holds the adjoint solve's method, steps and residual.
    """
    backward = make_backward(backward, **backward_options)
    if not isinstance(problem, SparseCoding):
        raise ValueError(f"problem must be a SparseCoding, got {type(problem).__name__}")
    solver = make_solver(solver)
    backward.check(solver, lasso=True)
    check_loop_args(max_steps, tol)
    z, sol = backward.attach(_LassoEquilibrium(problem, solver, max_steps, tol, z0))
    sol.z = z.reshape(problem.code_shape)
    return (sol.z, sol) if return_solution else sol.z


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    solver: str | Solver = "anderson",
    backward: str | Backward = "implicit",
    max_steps: int = 50,
    tol: float | None = 1e-4,
    return_solution: bool = False,
    **backward_options: Any,
):
    """The fixed point z* = f(z*) of any DEQ map, differentiable w.r.t. what f closes over.

    ``z0`` (B, ...): its first dim indexes independent problems (each stops on its own; f is
    applied to the whole batch). Solvers: "ista" (plain iteration), "anderson" (residual
    safeguard), a torchdeq backend, or a solver object that works on generic maps. ``backward``
    and ``backward_options`` as in :func:`sparse_code` (the implicit adjoint "auto" is Anderson).
    """
    backward = make_backward(backward, **backward_options)
    if not isinstance(z0, torch.Tensor) or z0.dim() < 1:
        raise ValueError("z0 must be a tensor whose first dim indexes the problems")
    solver = make_solver(solver, generic=True)
    backward.check(solver, lasso=False)
    check_loop_args(max_steps, tol)
    z, sol = backward.attach(_MapEquilibrium(f, z0, solver, max_steps, tol))
    sol.z = z
    return (z, sol) if return_solution else z

"""The one loop: runs any solver on a batch of problems with per-problem convergence.

Each problem stops on its own when its relative residual ||T(z) - z|| / max(||z||, eps) falls
below ``tol``. Sparse-coding problems are separable, so a stopped problem's output is kept at
its stopping step and it leaves the batch with the next group of stopped ones (stopped rows
iterate unread until they are a quarter of the batch, :data:`COMPACT_FRACTION`, and dropping them
pays back, :data:`COMPACT_PAYBACK`); a generic map is applied to the whole batch, and stopped
problems only keep their output. With ``tol=None`` the loop runs exactly
``max_steps`` steps with no host synchronisation (no ``.item()``, no data-dependent shapes), so
torch.compile and CUDA graphs can take it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .problems import LassoBatch, SparseCoding, relative_residual
from .prox import threshold
from .solvers import LoopSolver, Solver, make_solver
from .solvers.base import take_state

__all__ = ["solve", "Solution", "SolveStats", "ConvergenceWarning"]

#: fixed-step runs (tol=None) report a problem as converged when its residual is below this
REPORT_TOL = 1e-4
#: per-problem stopping drops stopped problems from the batch once they are this fraction of it: each
#: drop re-indexes the solver state and the problems (a dozen small copies). On the captured digits
#: layers (128 problems stopping at 23-24 distinct steps, FISTA to 1e-3) dropping them in groups
#: took 0.64-0.84x the time of dropping at every stop, for 2% more rows iterated (unread until dropped)
COMPACT_FRACTION = 0.25
#: ... and once the drop pays back: it copies about as much as COMPACT_PAYBACK whole-batch steps, and
#: saves the stopped rows' remaining steps, estimated by how long the batch has been stopping (steps
#: since its first stop), so it waits until stopped rows x steps since the first stop >=
#: COMPACT_PAYBACK x batch rows. Where a batch stops within a few steps (the DEQ preset, FISTA to 1e-2
#: on the digits training layers: 128 problems stopping at steps 18-25) at most one drop pays, with
#: one row left: 0.91x the time of dropping at COMPACT_FRACTION alone; to 1e-4 (steps 100-300)
#: 1.03x, within the A/B run's noise
COMPACT_PAYBACK = 4.0
#: "encode": D^T x (the paper's text); "thresholded_encode": S_lam(D^T x) with the full lam (the
#: original VARS code's start point); "zeros"
INITS = ("encode", "thresholded_encode", "zeros")


class ConvergenceWarning(UserWarning):
    """A solve or an adjoint solve stopped at max_steps above its tolerance."""


@dataclass
class SolveStats:
    """Per-problem statistics, shaped like the problems' batch dims.

    steps: steps taken (T evaluations). residual: final relative residual.
    residual_trace / energy_trace: (steps, *batch) when traced, NaN after a problem stopped.
    """

    steps: torch.Tensor
    residual: torch.Tensor
    residual_trace: torch.Tensor | None = None
    energy_trace: torch.Tensor | None = None
    #: seconds since the loop started, after each step (traced solves with a tol, which sync anyway)
    time_trace: list[float] | None = None
    #: problem rows the steps iterated, summed over steps (per-problem stopping of sparse coding:
    #: steps.sum() plus the stopped problems iterated until they left the batch); None elsewhere
    rows_iterated: int | None = None
    solver: str = ""
    max_steps: int = 0
    tol: float | None = None
    _energy_fn: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    #: filled by the implicit backward of sparse_code / fixed_point when it runs
    adjoint: "AdjointStats | None" = None

    @property
    def energy(self) -> torch.Tensor | None:
        """Final energy E(z) per problem (sparse coding only; computed on first access)."""
        if self._energy_fn is None:
            return None
        if not hasattr(self, "_energy"):
            self._energy = self._energy_fn()
        return self._energy

    @property
    def converged_fraction(self) -> torch.Tensor:
        tol = REPORT_TOL if self.tol is None else self.tol
        return (self.residual < tol).float().mean()


@dataclass
class AdjointStats:
    """Statistics of the implicit backward's adjoint solve (set when backward runs)."""

    method: str = ""
    steps: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    calls: int = 0


@dataclass
class Solution:
    """z: the output T(z_final) (exactly sparse for lasso); converged: per problem (bool)."""

    z: torch.Tensor
    converged: torch.Tensor
    stats: SolveStats


class MapBatch:
    """A generic fixed-point map f over a batch of P problems (internal)."""

    is_lasso = False

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size):
        self.f, self.shape = f, shape

    def T(self, z: torch.Tensor) -> torch.Tensor:
        out = self.f(z.reshape(self.shape))
        if out.shape != self.shape:
            raise ValueError(f"the map returned shape {tuple(out.shape)} for an input of shape {tuple(self.shape)}")
        return out.reshape(z.shape)


def check_loop_args(max_steps: int, tol: float | None) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be None (fixed steps) or a number > 0, got {tol!r}")


def initial_codes(problem: SparseCoding, z0) -> torch.Tensor:
    """Flat (P, M, C) starting codes: a name in INITS or a tensor."""
    flat = problem.flat()
    if z0 is None or (isinstance(z0, str) and z0 == "encode"):
        return flat.b
    if isinstance(z0, str):
        if z0 == "thresholded_encode":
            return threshold(flat.b, flat.lam, flat.nonneg)
        if z0 == "zeros":
            return torch.zeros_like(flat.b)
        raise ValueError(f"z0 must be a tensor or one of {INITS}, got {z0!r}")
    if not isinstance(z0, torch.Tensor):
        raise ValueError(f"z0 must be a tensor or one of {INITS}, got {type(z0).__name__}")
    if z0.shape != torch.Size(problem.code_shape):
        raise ValueError(f"z0 must have the codes' shape {problem.code_shape}, got {tuple(z0.shape)}")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 holds NaN or Inf")
    return z0.reshape(flat.b.shape).to(flat.b.dtype)


def solve(
    problem: SparseCoding,
    solver: str | Solver = "anderson",
    max_steps: int = 100,
    tol: float | None = 1e-4,
    z0: torch.Tensor | str | None = None,
    trace: bool | str = False,
    per_problem: bool = True,
) -> Solution:
    """Solve a batch of sparse-coding problems to their fixed points.

    Args:
        problem: a :class:`SparseCoding`.
        solver: a name from ``SOLVERS`` or a solver object.
        max_steps: most steps per problem (0 returns z0).
        tol: per-problem relative residual to stop at; None runs exactly max_steps (no syncs).
        z0: starting codes: None or "encode" (D^T x), "thresholded_encode" (S_lam(D^T x)), "zeros",
            or a tensor (..., M, C).
        trace: True records per-step residual and energy traces (one extra product per step)
            and, with a tol, per-step wall times; "residual" records residuals and times only;
            "log" adds energies at log-spaced steps (1, 2, 3, 4, 6, 8, 11, ...; NaN between),
            cheap enough to leave the timing honest.
        per_problem: stop each problem on its own and drop it from the batch (default); False
            iterates the whole batch until every problem is below tol (for comparisons).

    Problems that stop at max_steps above ``tol`` are reported in ``Solution.converged`` and a
    :class:`ConvergenceWarning` names them. Gradients flow through the steps (the unrolled
    backward); see :func:`vars_deq.sparse_code` for implicit and phantom gradients.
    """
    sol = solve_quietly(problem, solver, max_steps, tol, z0, trace, per_problem)
    warn_unconverged(sol, "solve")
    return sol


def solve_quietly(problem, solver="anderson", max_steps=100, tol=1e-4, z0=None, trace=False, per_problem=True):
    """:func:`solve` without the warning (callers that report convergence their own way)."""
    if not isinstance(problem, SparseCoding):
        raise ValueError(f"problem must be a SparseCoding, got {type(problem).__name__}")
    solver = make_solver(solver)
    check_loop_args(max_steps, tol)
    if trace not in (False, True, "residual", "log"):
        raise ValueError(f"trace must be False, True, 'residual' or 'log', got {trace!r}")
    flat = problem.flat()
    solver.check(flat)
    times: list[float] = []
    rows: list[int] = []
    z, steps, residual, rtrace, etrace = run(flat, solver, initial_codes(problem, z0), max_steps, tol, trace,
                                             per_problem, times=times, rows=rows)
    sol = package(problem.batch_shape, problem.code_shape, z, steps, residual, rtrace, etrace, solver, max_steps, tol,
                  energy_fn=lambda: problem.energy(z.detach().reshape(problem.code_shape)))
    sol.stats.time_trace = times or None
    sol.stats.rows_iterated = sum(rows) if rows else None
    return sol


def warn_unconverged(sol: Solution, what: str) -> None:
    if sol.stats.tol is None or bool(sol.converged.all()):
        return
    n = int((~sol.converged).sum())
    warnings.warn(
        f"{what}: {n} of {sol.converged.numel()} problems did not reach tol={sol.stats.tol:g} in "
        f"max_steps={sol.stats.max_steps} with {sol.stats.solver} (largest residual "
        f"{sol.stats.residual.max().item():.3g}); see Solution.converged and stats.residual",
        ConvergenceWarning,
        stacklevel=3,
    )


def package(batch, out_shape, z, steps, residual, rtrace, etrace, solver, max_steps, tol, energy_fn=None) -> Solution:
    converged = residual < (REPORT_TOL if tol is None else tol)
    stats = SolveStats(
        steps=steps.reshape(batch),
        residual=residual.reshape(batch),
        residual_trace=None if rtrace is None else rtrace.reshape(-1, *batch),
        energy_trace=None if etrace is None else etrace.reshape(-1, *batch),
        solver=repr(solver),
        max_steps=max_steps,
        tol=tol,
        _energy_fn=energy_fn,
    )
    return Solution(z.reshape(out_shape), converged.reshape(batch), stats)


def run(flat, solver: Solver, z0: torch.Tensor, max_steps: int, tol: float | None, trace,
        per_problem: bool = True, residual_scale: torch.Tensor | None = None, times: list | None = None,
        rows: list | None = None):
    """The loop on a flat batch (P, ...). Returns z, steps, residual and optional traces (flat).

    ``residual_scale`` (P,) replaces ||p|| as the residual's denominator (adjoint solves measure
    against the right-hand side); only the whole-batch loop of generic maps takes it."""
    P = z0.shape[0]
    dev = z0.device
    lasso = isinstance(flat, LassoBatch)
    if P == 0:  # no problems: nothing to iterate
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return z0, empty, torch.zeros(0, dtype=z0.dtype, device=dev), None, None
    if max_steps == 0:
        with torch.no_grad():
            res = relative_residual(z0, flat.T(z0))
        steps = torch.zeros(P, dtype=torch.long, device=dev)
        return z0, steps, res, None, None
    if isinstance(solver, LoopSolver):
        record = [] if trace else None
        z, steps = solver.solve_all(flat, z0, max_steps, tol, record)
        with torch.no_grad():
            res = relative_residual(z, flat.T(z))
        if record and times is not None:
            times.extend(t for _, t in record)
        return z, steps, res, _stack([r for r, _ in record]) if record else None, None
    if tol is None:
        return _run_fixed(flat, solver, z0, max_steps, trace, lasso)
    if lasso and per_problem:
        return _run_compacting(flat, solver, z0, max_steps, tol, trace, times, rows)
    return _run_frozen(flat, solver, z0, max_steps, tol, trace, residual_scale)


def _energy(flat, solver, state):
    with torch.no_grad():
        return flat.energy(solver.iterate(state))


def _run_fixed(flat, solver, z0, max_steps, trace, lasso):
    state = solver.init(flat, z0)
    rt, et = [], []
    for _ in range(max_steps):
        state, p, tp = solver.step(flat, state, may_sync=False)
        with torch.no_grad():
            res = relative_residual(p, tp)
        if trace:
            rt.append(res)
            if lasso and trace is True:
                et.append(_energy(flat, solver, state))
    steps = torch.full((z0.shape[0],), max_steps, dtype=torch.long, device=z0.device)
    return tp, steps, res, _stack(rt), _stack(et)


def _run_compacting(flat: LassoBatch, solver, z0, max_steps, tol, trace, times=None, rows_iterated=None):
    """Per-problem stopping on separable (lasso) problems: a problem's output, steps and residual
    are recorded at the step it falls below tol; it leaves the batch at the next compaction, once
    the stopped rows reach COMPACT_FRACTION of the batch and the drop pays back (COMPACT_PAYBACK;
    until then it iterates on unread)."""
    P = z0.shape[0]
    dev = z0.device
    active = torch.arange(P, device=dev)  # problem of each row of the current batch
    live = torch.ones(P, dtype=torch.bool, device=dev)  # rows not yet stopped
    stopped_rows = 0
    first_stop = None  # the step at which the first problem stopped
    sub = flat
    state = solver.init(sub, z0)
    steps = torch.full((P,), max_steps, dtype=torch.long, device=dev)
    residual = torch.full((P,), math.inf, dtype=z0.dtype, device=dev)
    idx_parts, val_parts, rt, et = [], [], [], []
    start = time.perf_counter()
    for k in range(max_steps):
        state, p, tp = solver.step(sub, state, may_sync=True)  # this loop syncs once a step anyway
        if rows_iterated is not None:
            rows_iterated.append(live.numel())
        with torch.no_grad():
            res = relative_residual(p, tp)
        if trace:
            rt.append(_scatter_row(P, active, torch.where(live, res, math.nan)))
            if trace is True or (trace == "log" and _log_step(k + 1)):
                et.append(_scatter_row(P, active, torch.where(live, _energy(sub, solver, state), math.nan)))
            elif trace == "log":
                et.append(torch.full((P,), math.nan, dtype=res.dtype, device=res.device))
        done = live & (res < tol)
        any_done = bool(done.any())  # the host sync of tol mode; the step's time is real after it
        if trace and times is not None:
            times.append(time.perf_counter() - start)
        if k == max_steps - 1:
            done = live
            any_done = True
        if any_done:
            rows = done.nonzero().squeeze(-1)
            problems = active[rows]
            idx_parts.append(problems)
            val_parts.append(tp[rows])
            residual[problems] = res[rows]
            steps[problems] = k + 1
            live = live & ~done
            stopped_rows += rows.numel()
            if stopped_rows == live.numel() or k == max_steps - 1:
                break
            if first_stop is None:
                first_stop = k
            if stopped_rows >= COMPACT_FRACTION * live.numel() and (
                    stopped_rows * (k - first_stop) >= COMPACT_PAYBACK * live.numel()):
                keep = live.nonzero().squeeze(-1)
                active, sub, state = active[keep], sub.take(keep), take_state(state, keep)
                live = torch.ones(keep.numel(), dtype=torch.bool, device=dev)
                stopped_rows = 0
    idx = torch.cat(idx_parts)
    vals = torch.cat(val_parts)
    z = vals.new_zeros(P, *vals.shape[1:]).index_copy(0, idx, vals)
    return z, steps, residual, _stack(rt), _stack(et)


def _run_frozen(flat, solver, z0, max_steps, tol, trace, residual_scale=None):
    """Whole-batch iteration until every problem is below tol; stopped problems keep their output."""
    P = z0.shape[0]
    dev = z0.device
    state = solver.init(flat, z0)
    frozen = torch.zeros(P, dtype=torch.bool, device=dev)
    steps = torch.zeros(P, dtype=torch.long, device=dev)
    residual = torch.full((P,), math.inf, dtype=z0.dtype, device=dev)
    out, rt = None, []
    for k in range(max_steps):
        # no sync inside the step: the loop's own check below is the one sync per step
        state, p, tp = solver.step(flat, state, may_sync=False)
        with torch.no_grad():
            res = relative_residual(p, tp) if residual_scale is None else (tp - p).flatten(1).norm(dim=-1) / residual_scale
        live = ~frozen
        out = tp if out is None else torch.where(_expand(live, tp), tp, out)
        residual = torch.where(live, res, residual)
        steps = torch.where(live, torch.full_like(steps, k + 1), steps)
        if trace:
            rt.append(torch.where(live, res, torch.full_like(res, math.nan)))
        frozen = frozen | (res < tol)
        if bool(frozen.all()):
            break
    return out, steps, residual, _stack(rt), None


def _log_step(k: int) -> bool:
    """Steps 1, 2, 3, 4, 6, 8, 11, 16, 22, 32, ...: about four per octave."""
    return k <= 4 or k in _LOG_STEPS


_LOG_STEPS = {int(round(2 ** (e / 4))) for e in range(8, 4 * 24)}


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _scatter_row(P, active, vals):
    row = torch.full((P,), math.nan, dtype=vals.dtype, device=vals.device)
    row[active] = vals
    return row


def _stack(rows):
    return torch.stack(rows) if rows else None

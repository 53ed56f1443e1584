"""TorchDEQ's solvers as forward solvers, for comparison (Geng & Kolter, "TorchDEQ", 2023).

TorchDEQ runs its own loop over the whole batch and stops when every problem is below tol, so
this adapter hands it the whole solve (``solve_all``) rather than single steps; the map it
iterates is the same T. Its vocabulary is kept: ``stop_mode`` "rel" or "abs", ``nstep`` steps.
The returned point is TorchDEQ's lowest-residual value f(x), which is a value of T.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .base import LoopSolver

__all__ = ["TorchDEQSolver", "TORCHDEQ_METHODS"]

TORCHDEQ_METHODS = ("anderson", "broyden", "fixed_point_iter")
STOP_MODES = ("rel", "abs")


class TorchDEQSolver(LoopSolver):
    """torchdeq.solver.<method> behind this library's solver interface.

    Args:
        method: "anderson", "broyden" or "fixed_point_iter".
        stop_mode: TorchDEQ's stopping residual, "rel" (default, like this library) or "abs".
        **options: passed to the TorchDEQ solver (e.g. ``m``, ``lam``, ``tau`` for anderson).
    """

    def __init__(self, method: str = "anderson", stop_mode: str = "rel", **options: Any):
        if method not in TORCHDEQ_METHODS:
            raise ValueError(f"method must be one of {TORCHDEQ_METHODS}, got {method!r}")
        if stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
        from torchdeq.solver import get_solver

        self.method, self.stop_mode, self.options = method, stop_mode, options
        self.name = f"torchdeq_{method}"
        self._fn = get_solver(method)

    def __repr__(self) -> str:
        return f"TorchDEQSolver({self.method!r})"

    def solve_all(self, problem, z0: torch.Tensor, max_steps: int, tol: float | None, record: list | None = None):
        """Run TorchDEQ's loop; returns the output (a value of T) and its steps (nstep) per problem.

        ``record``, if given, receives (relative residual per problem, seconds) at every
        evaluation of T, measured the way this library measures its own solvers.
        """
        from ..problems import relative_residual

        fn = problem.T
        if record is not None:
            start = time.perf_counter()

            def fn(z):
                tz = problem.T(z)
                res = relative_residual(z, tz)
                if z.is_cuda:
                    torch.cuda.synchronize(z.device)
                record.append((res, time.perf_counter() - start))
                return tz

        # tol=None: a negative tolerance is never reached, so every step runs
        z, _, info = self._fn(fn, z0, max_iter=max_steps, tol=-1.0 if tol is None else tol,
                              stop_mode=self.stop_mode, **self.options)
        nstep = info["nstep"].reshape(-1).to(torch.long)
        steps = nstep.expand(z0.shape[0]) if nstep.numel() == 1 else nstep
        return z.reshape(z0.shape), steps.to(z0.device)

"""FISTA (Beck & Teboulle, SIAM J. Imaging Sci. 2009) with its monotone variant MFISTA (Beck &
Teboulle, IEEE TIP 2009) and adaptive restarts (O'Donoghue & Candes, FoCM 2015).

    t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2
    y_k     = x_k + (t_k / t_{k+1}) (u_k - x_k) + ((t_k - 1) / t_{k+1}) (x_k - x_{k-1})
    u_{k+1} = T(y_k)
    x_{k+1} = u_{k+1}                       (plain; then u = x and y is Nesterov's point)
    x_{k+1} = argmin(E(u_{k+1}), E(x_k))    (monotone)

Plain FISTA satisfies E(x_k) - E* <= 2 L ||x_0 - x*||^2 / (k + 1)^2 but is not monotone.
Restart "function" resets the momentum (t = 1) when E(u_{k+1}) > E(x_k); "gradient" when
<y_k - u_{k+1}, u_{k+1} - x_k> > 0. Restarts are per problem. The energy comparisons (function
restart, monotone choice) are decided on E(u_{k+1}) - E(x_k) summed from per-entry terms
(:meth:`LassoBatch.energy_change`), never on two energies, whose float32 difference is noise near
the solution.

One Gram product per step. Plain FISTA keeps u = x, so its step is y = x + c (x - x_prev) and it
takes G y directly; with a restart or the monotone choice the energies need G u, so G y is
combined from G u, G x and G x_prev (linear). On VARS-sized problems an elementwise pass over the
codes costs about as much as the product, so the plain step, with three passes fewer and no Gram
products in its state, is the faster one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .base import StepSolver

RESTARTS = (None, "function", "gradient")


def nesterov_point(x: torch.Tensor, xp: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
    """Plain FISTA's extrapolation: (y = x + ((t - 1) / t_new) (x - xp), t_new), with t a Python
    number (every problem follows the same sequence) and y formed in one pass over the codes."""
    t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
    return torch.lerp(xp, x, 1 + (t - 1) / t_new), t_new


class FISTAState(NamedTuple):
    """x: the iterate, xp: the previous one, u = T(y) of the last step; g*: their Gram products
    G x, G xp, G u (P, M, C); t: the momentum (P, 1, 1). Plain FISTA keeps only x, xp and t
    (u = x, and it forms G y itself): the other fields are None, and t, the same for every
    problem, is a float."""

    x: torch.Tensor
    gx: torch.Tensor
    xp: torch.Tensor
    gxp: torch.Tensor
    u: torch.Tensor
    gu: torch.Tensor
    t: torch.Tensor


class FISTA(StepSolver):
    name = "fista"
    needs_lasso = True

    def __init__(self, restart: str | None = None, monotone: bool = False):
        if restart not in RESTARTS:
            raise ValueError(f"restart must be one of {RESTARTS}, got {restart!r}")
        self.restart, self.monotone = restart, bool(monotone)

    def __repr__(self) -> str:
        return f"FISTA(restart={self.restart!r}, monotone={self.monotone})"

    @property
    def plain(self) -> bool:
        """No restart and no monotone choice: every step keeps u = x."""
        return self.restart is None and not self.monotone

    def init(self, problem, z0):
        # t = 0 makes the first step plain (y_1 = x_0) and sets t_1 = 1, as in Beck & Teboulle
        if self.plain:  # every problem follows the same t sequence: a Python number, no tensor work
            return FISTAState(z0, None, z0, None, None, None, 0.0)
        t = torch.zeros(z0.shape[0], 1, 1, dtype=z0.dtype, device=z0.device)
        gz = problem.normal(z0)
        return FISTAState(z0, gz, z0, gz, z0, gz, t)

    def step(self, problem, state, may_sync=False):
        x, gx, xp, gxp, u, gu, t = state.x, state.gx, state.xp, state.gxp, state.u, state.gu, state.t
        if self.plain:
            y, t_new = nesterov_point(x, xp, t)
            u_new = problem.T(y)
            return FISTAState(u_new, None, x, None, None, None, t_new), y, u_new
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
        c = (t - 1) / t_new
        a = t / t_new
        y = x + a * (u - x) + c * (x - xp)
        gy = gx + a * (gu - gx) + c * (gx - gxp)
        u_new = problem.T_from(y, gy)
        gu_new = problem.normal(u_new)
        # E(u_{k+1}) > E(x_k)
        rose = problem.energy_change(x, gx, u_new, gu_new) > 0 if self.monotone or self.restart == "function" else None
        if self.monotone:
            keep_old = rose.reshape(-1, 1, 1)
            x_new = torch.where(keep_old, x, u_new)
            gx_new = torch.where(keep_old, gx, gu_new)
        else:
            x_new, gx_new = u_new, gu_new
        new = FISTAState(x_new, gx_new, x, gx, u_new, gu_new, t_new)
        if self.restart is not None:
            if self.restart == "function":
                bad = rose
            else:
                bad = ((y - u_new) * (u_new - x)).sum((-2, -1)) > 0
            bad = bad.reshape(-1, 1, 1)
            # momentum off: x_{k-1} = x_k and u = x_k make the next y equal x_k
            new = new._replace(
                t=torch.where(bad, torch.ones_like(t_new), t_new),
                xp=torch.where(bad, x_new, x), gxp=torch.where(bad, gx_new, gx),
                u=torch.where(bad, x_new, u_new), gu=torch.where(bad, gx_new, gu_new),
            )
        return new, y, u_new

    def iterate(self, state):
        return state.x

"""The solver protocol: small objects with ``init`` and ``step``; :func:`vars_deq.solve` owns the loop.

A step evaluates the map T once at some point p (the iterate for ISTA, the extrapolated point for
FISTA, the current point for Anderson) and returns ``(state, p, T(p))``. The loop measures the
residual ||T(p) - p|| / ||p|| and outputs T(p) of the last step, so every output is exactly a
value of T (sparse, and the point the implicit backward attaches to).

Each solver has its own typed state (a NamedTuple): tensor fields whose first dim is the problem
(so the loop can drop converged problems), Python scalars shared by all problems, and None for
fields a variant does not use. A backend that owns its whole loop (TorchDEQ) is a
:class:`LoopSolver` instead, with one ``solve_all``.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch

__all__ = ["Solver", "StepSolver", "LoopSolver"]

State = TypeVar("State", bound=NamedTuple)


class Solver:
    """A forward solver: a :class:`StepSolver` (the library's loop runs its steps) or a
    :class:`LoopSolver` (it runs its own loop)."""

    name: str = "solver"
    #: solvers that use the lasso structure (Gram products, energies) set this
    needs_lasso: bool = False

    def check(self, problem) -> None:
        if self.needs_lasso and not getattr(problem, "is_lasso", False):
            raise ValueError(f"solver {self!r} needs a sparse-coding problem; for a generic map use 'ista' or 'anderson'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StepSolver(Solver):
    """A solver the library's loop drives one step at a time.

    ``step(problem, state, may_sync)``: ``may_sync`` says whether this step may synchronise with
    the host (the loop allows it only where it stops problems on a tolerance anyway); a solver may
    use it to skip work for problems it can see need none.
    """

    def init(self, problem, z0: torch.Tensor) -> NamedTuple:
        raise TypeError(f"{type(self).__name__} does not define init")

    def step(self, problem, state, may_sync: bool = False) -> tuple[NamedTuple, torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} does not define step")

    def iterate(self, state) -> torch.Tensor:
        """The solver's current iterate (the sequence whose energy the guarantees are about)."""
        return state.z


class LoopSolver(Solver):
    """A backend that runs its own loop over the whole batch (it has no single steps, so autograd
    cannot record an unroll through it)."""

    def solve_all(self, problem, z0: torch.Tensor, max_steps: int, tol: float | None,
                  record: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} does not define solve_all")


def take_state(state: State, keep: torch.Tensor) -> State:
    """Keep problems ``keep`` (an index tensor) of every per-problem tensor in a typed state."""
    return type(state)(*(v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in state))

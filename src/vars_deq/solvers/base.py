"""The solver protocol: small objects with ``init`` and ``step``; :func:`vars_deq.solve` owns the loop.

A step evaluates the map T once at some point p (the iterate for ISTA, the extrapolated point for
FISTA, the current point for Anderson) and returns ``(state, p, T(p))``. The loop measures the
residual ||T(p) - p|| / ||p|| and outputs T(p) of the last step, so every output is exactly a
value of T (sparse, and the point the implicit backward attaches to).

States are dicts of tensors whose first dim is the problem (so the loop can drop converged
problems), plus Python scalars shared by all problems.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Solver", "take_state"]

State = dict[str, Any]


class Solver:
    """A forward solver. Step solvers implement ``init`` and ``step`` and the library's loop runs
    them; a backend that owns its loop (TorchDEQ) implements ``solve_all`` instead."""

    name: str = "solver"
    #: solvers that use the lasso structure (Gram products, energies) set this
    needs_lasso: bool = False

    def init(self, problem, z0: torch.Tensor) -> State:
        raise TypeError(f"{type(self).__name__} runs its own loop (solve_all): it has no single steps")

    def step(self, problem, state: State) -> tuple[State, torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} runs its own loop (solve_all): it has no single steps")

    def iterate(self, state: State) -> torch.Tensor:
        """The solver's current iterate (the sequence whose energy the guarantees are about)."""
        return state["z"]

    def check(self, problem) -> None:
        if self.needs_lasso and not getattr(problem, "is_lasso", False):
            raise ValueError(f"solver {self!r} needs a sparse-coding problem; for a generic map use 'ista' or 'anderson'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def take_state(state: State, keep: torch.Tensor) -> State:
    """Keep problems ``keep`` (an index tensor) of every per-problem tensor in a state."""
    return {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in state.items()}

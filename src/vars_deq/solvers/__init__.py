"""Forward solvers and their registry (name -> factory)."""

from __future__ import annotations

from typing import Callable

from .anderson import SAFEGUARDS, Anderson
from .base import LoopSolver, Solver, StepSolver
from .fista import RESTARTS, FISTA
from .fista_rank1 import RankOneFISTA
from .ista import ISTA
from .torchdeq_adapter import TORCHDEQ_METHODS, TorchDEQSolver

SOLVERS: dict[str, Callable[[], Solver]] = {
    "ista": ISTA,
    "fista": FISTA,
    "mfista": lambda: FISTA(monotone=True),
    "fista_restart": lambda: FISTA(restart="function"),
    "fista_gradient_restart": lambda: FISTA(restart="gradient"),
    "fista_rank1": RankOneFISTA,
    "anderson": Anderson,
    "anderson_residual": lambda: Anderson(safeguard="residual"),
    "anderson_plain": lambda: Anderson(safeguard=None),
}


def _register_torchdeq() -> None:
    for method in TORCHDEQ_METHODS:
        SOLVERS[f"torchdeq_{method}"] = lambda method=method: TorchDEQSolver(method)


_register_torchdeq()


def make_solver(spec: str | Solver, generic: bool = False) -> Solver:
    """A solver object from a name in SOLVERS or an instance. For a generic map ("generic"),
    the name "anderson" means Anderson with the residual safeguard (there is no energy)."""
    if isinstance(spec, Solver):
        return spec
    if not isinstance(spec, str) or spec not in SOLVERS:
        raise ValueError(f"unknown solver {spec!r}; valid names: {sorted(SOLVERS)}, or a Solver object")
    if generic and spec == "anderson":
        return Anderson(safeguard="residual")
    return SOLVERS[spec]()


__all__ = ["SOLVERS", "Solver", "StepSolver", "LoopSolver", "ISTA", "FISTA", "RankOneFISTA", "Anderson", "make_solver", "SAFEGUARDS",
           "RESTARTS", "TorchDEQSolver", "TORCHDEQ_METHODS"]

"""vars_deq: VARS attention (recurrent sparse reconstruction) as a deep-equilibrium layer."""

from .dictionaries import (
    ConvDictionary,
    DenseDictionary,
    DictionaryOperator,
    PerformerDictionary,
    UnionDictionary,
)
from .equilibrium import ConvergenceWarning, Solution, SolveStats, solve
from .problems import SparseCoding
from .solvers import FISTA, ISTA, SOLVERS, Anderson, Solver, make_solver

__version__ = "0.1.0"

__all__ = [
    "ConvDictionary",
    "DenseDictionary",
    "DictionaryOperator",
    "PerformerDictionary",
    "UnionDictionary",
    "SparseCoding",
    "solve",
    "Solution",
    "SolveStats",
    "ConvergenceWarning",
    "Solver",
    "ISTA",
    "FISTA",
    "Anderson",
    "SOLVERS",
    "make_solver",
]

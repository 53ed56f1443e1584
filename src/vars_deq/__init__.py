"""vars_deq: VARS attention (recurrent sparse reconstruction) as a deep-equilibrium layer.

Importing the package registers the VARS models with timm (``timm.create_model("vars_sd_digits")``).
"""

from .backward import ADJOINTS, BACKWARDS, Backward, ConvergenceError, Implicit, Phantom, Unroll, fixed_point, sparse_code
from .dictionaries import (
    ConvDictionary,
    DenseDictionary,
    DictionaryOperator,
    PerformerDictionary,
    UnionDictionary,
)
from .equilibrium import ConvergenceWarning, Solution, SolveStats, solve
from .layers import SparseReconstruction, VARSAttention, configure_layers, layer_stats
from .problems import SparseCoding
from .solvers import FISTA, ISTA, SOLVERS, Anderson, Solver, TorchDEQSolver, make_solver
from .models import attention_maps, convert_vit  # noqa: E402  (also registers the models with timm)

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
    "TorchDEQSolver",
    "SOLVERS",
    "make_solver",
    "Backward",
    "Implicit",
    "Unroll",
    "Phantom",
    "BACKWARDS",
    "ADJOINTS",
    "sparse_code",
    "fixed_point",
    "ConvergenceError",
    "SparseReconstruction",
    "configure_layers",
    "layer_stats",
    "VARSAttention",
    "convert_vit",
    "attention_maps",
]

"""The public API, imported on first use of any ``vars_deq.<name>`` (see the package docstring)."""

from .backward import ADJOINTS, BACKWARDS, Backward, ConvergenceError, Implicit, Phantom, Unroll, fixed_point, sparse_code
from .dictionaries import (
    ConvDictionary,
    DenseDictionary,
    DictionaryOperator,
    PerformerDictionary,
    UnionDictionary,
)
from .equilibrium import ConvergenceWarning, Solution, SolveStats, solve
from .layers import SparseReconstruction, VARSAttention, WarmStart, configure_layers, layer_stats, original_forward
from .problems import SparseCoding
from .solvers import FISTA, ISTA, SOLVERS, Anderson, RankOneFISTA, Solver, TorchDEQSolver, make_solver
from .models import attention_maps, convert_vit  # also registers the models with timm

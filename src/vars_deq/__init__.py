"""vars_deq: VARS attention (recurrent sparse reconstruction) as a deep-equilibrium layer.

The public names load on first use (``vd.SparseCoding``, ``from vars_deq import ...``), so that
``import vars_deq`` and the ``vars-deq`` command's start-up stay light. That first use also
registers the VARS models with timm, as does ``import vars_deq.models``; when timm is already
imported, ``import vars_deq`` registers them at once.
"""

import sys

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
    "RankOneFISTA",
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
    "original_forward",
    "VARSAttention",
    "WarmStart",
    "convert_vit",
    "attention_maps",
]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        globals().update({n: getattr(api, n) for n in __all__})
        return globals()[name]
    raise AttributeError(f"module 'vars_deq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if "timm" in sys.modules:  # timm is there anyway: register the models now, as an eager import would
    from . import models  # noqa: F401,E402

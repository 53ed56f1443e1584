"""The VARS layer options of the command line, applied to every VARS layer of a model; unset ones
keep the model's own values. The flags are derived from the layer's own declaration
(``SparseReconstruction.configure`` and the backward objects' fields), never listed by hand."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

HELP = {
    "lam": "sparsity weight lambda of the lasso energy",
    "solver": "forward solver (default: the backward's preset)",
    "max_steps": "solver iterations (an upper bound when a tol is set)",
    "tol": "stop a problem once its relative fixed-point residual is below this",
    "backward": "gradient of the equilibrium (implicit also switches the forward to a converging preset)",
    "lipschitz": "bound L >= ||D||^2 for the step 1/L",
    "lipschitz_margin": "added to the bound (default: +1 with the Gershgorin bound, as the original code)",
    "init": "starting codes",
}


def _declared() -> dict[str, dict[str, Any]]:
    """flag name -> argparse keywords, from the layer's run-time options."""
    from ..backward import ADJOINTS, BACKWARD_TYPES, BACKWARDS, UNCONVERGED
    from ..dictionaries.base import LIPSCHITZ_MODES
    from ..equilibrium import INITS
    from ..layers.sparse_reconstruction import RUNTIME_OPTIONS
    from ..solvers import SOLVERS

    choices = {"backward": BACKWARDS, "solver": sorted(SOLVERS), "lipschitz": LIPSCHITZ_MODES, "init": INITS,
               "adjoint": ADJOINTS, "on_unconverged": UNCONVERGED}
    types: dict[str, type] = {"max_steps": int}
    helps = dict(HELP)
    for cls in BACKWARD_TYPES.values():
        for f in dataclasses.fields(cls):
            if "flat" in f.metadata:
                types[f.metadata["flat"]] = type(f.default)
                helps[f.metadata["flat"]] = f"{cls.__name__}.{f.name} (with --backward {cls.name})"
    out = {}
    for name in RUNTIME_OPTIONS:
        kw: dict[str, Any] = {"help": helps.get(name, name)}
        if name in choices:
            kw["choices"] = choices[name]
        else:
            kw["type"] = types.get(name, float)
        out[name] = kw
    return out


def add_layer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VARS layers", "applied to every VARS layer of the model; unset ones keep the model's")
    for name, kw in _declared().items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, **kw)


def layer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The layer options the user gave, by their configure keyword."""
    from ..layers.sparse_reconstruction import RUNTIME_OPTIONS

    return {k: getattr(args, k) for k in RUNTIME_OPTIONS if getattr(args, k, None) is not None}

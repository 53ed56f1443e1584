"""The VARS layer options of the command line (--backward, --solver, --max-steps, --tol, --lam),
applied to every VARS layer of a model; unset ones keep the model's own values."""

from __future__ import annotations

import argparse
from typing import Any


def add_layer_options(p: argparse.ArgumentParser) -> None:
    from ..backward import BACKWARDS
    from ..solvers import SOLVERS

    g = p.add_argument_group("VARS layers", "applied to every VARS layer of the model; unset ones keep the model's")
    g.add_argument("--backward", choices=BACKWARDS, help="gradient of the equilibrium")
    g.add_argument("--solver", choices=sorted(SOLVERS), metavar="NAME",
                   help=f"forward solver: {', '.join(sorted(SOLVERS))}")
    g.add_argument("--max-steps", type=int, help="solver iterations (upper bound when --tol is set)")
    g.add_argument("--tol", type=float, help="stop a problem once its fixed-point residual is below this")
    g.add_argument("--lam", type=float, help="sparsity weight lambda of the lasso energy")


def layer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The layer options the user gave, by their configure keyword."""
    from ..train.factory import LAYER_OPTIONS

    return {k: getattr(args, k) for k in LAYER_OPTIONS if getattr(args, k, None) is not None}

"""SparseReconstruction: the VARS layer as a deep-equilibrium module, X_hat = D z*(X)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backward import check_backward_options, sparse_code
from ..dictionaries.base import check_lipschitz_mode
from ..equilibrium import INITS, REPORT_TOL, check_loop_args
from ..problems import SparseCoding
from ..solvers import Solver, make_solver

__all__ = ["SparseReconstruction", "configure_layers", "layer_stats"]

#: the layer's default damping of the implicit adjoint: layers run short, unconverged forwards
#: (5 steps) whose support can exceed the token count, where the exact system is singular
LAYER_ADJOINT_RIDGE = 1e-3

_BACKWARD_KEYS = ("adjoint", "adjoint_tol", "adjoint_max_steps", "adjoint_ridge", "phantom_steps", "tau",
                  "on_unconverged")


class SparseReconstruction(nn.Module):
    """Reconstruct a signal from a sparse code over a dictionary bound to the input.

    forward(x, source=None): x (..., N, C) is the signal, ``source`` (default x) what the
    dictionary is built from (the queries for VARS-D). Solves

        z* = argmin_z 1/2 ||x - D z||^2 + lam ||z||_1     (z >= 0 if nonneg)

    with the chosen solver and returns D z* (the residual connection is the caller's). The
    statistics of the latest forward are in ``last_stats`` (tensors, no host sync).

    Args:
        dictionary: a dictionary module (DenseDictionary, ConvDictionary, PerformerDictionary,
            UnionDictionary or any module returning a DictionaryOperator).
        lam: sparsity weight >= 0 (float, or a tensor broadcastable to the codes).
        learn_lam: make lam a parameter, kept positive through lam = softplus(raw).
        solver, max_steps, tol, init: the forward solve ("ista", 5 steps, fixed, "encode" follow
            the original VARS code).
        backward: "unroll" (original code), "implicit" or "phantom"; ``backward_options`` are
            passed to :func:`vars_deq.sparse_code` (adjoint, adjoint_tol, adjoint_max_steps,
            adjoint_ridge (default here 1e-3, see LAYER_ADJOINT_RIDGE), phantom_steps, tau,
            on_unconverged).
        nonneg: restrict codes to z >= 0.
        lipschitz: "exact", "power" or "gershgorin" bound for the step 1/L.
        check_finite: reject NaN/Inf input with a ValueError (one host sync per forward).
    """

    def __init__(
        self,
        dictionary: nn.Module,
        lam: float | torch.Tensor = 0.3,
        solver: str | Solver = "ista",
        max_steps: int = 5,
        tol: float | None = None,
        backward: str = "unroll",
        nonneg: bool = False,
        lipschitz: str = "exact",
        learn_lam: bool = False,
        init: str = "encode",
        check_finite: bool = False,
        **backward_options: Any,
    ):
        super().__init__()
        if not isinstance(dictionary, nn.Module):
            raise ValueError(f"dictionary must be a dictionary module, got {type(dictionary).__name__}")
        self.dictionary = dictionary
        lam_t = torch.as_tensor(lam, dtype=torch.get_default_dtype())
        # checked on the CPU: under a meta device context (timm builds models there) lam_t has no values
        lam_cpu = torch.as_tensor(lam, dtype=torch.get_default_dtype(), device="cpu")
        if not bool(torch.isfinite(lam_cpu).all()) or bool((lam_cpu < 0).any()):
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        self.learn_lam = bool(learn_lam)
        if self.learn_lam:
            # softplus^{-1}(lam); lam = 0 is the boundary of the parametrization, start just above it
            self.lam_raw = nn.Parameter(_softplus_inv(lam_t.clamp_min(1e-6)))
        else:
            self.register_buffer("lam_value", lam_t.clone())
        self.nonneg, self.check_finite = bool(nonneg), bool(check_finite)
        self.backward_options: dict[str, Any] = {}
        self.configure(solver=solver, max_steps=max_steps, tol=tol, backward=backward, lipschitz=lipschitz,
                       init=init, **backward_options)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.last_solution = None

    @property
    def lam(self) -> torch.Tensor:
        return nn.functional.softplus(self.lam_raw) if self.learn_lam else self.lam_value

    def configure(self, **options: Any) -> None:
        """Change solver, max_steps, tol, backward, lipschitz, init, lam or backward options, validated."""
        known = {"solver", "max_steps", "tol", "backward", "lipschitz", "init", "lam", *_BACKWARD_KEYS}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(known)}")
        if "solver" in options:
            solver = options["solver"]
            make_solver(solver)  # validates the name
            self.solver = solver
        max_steps = options.get("max_steps", getattr(self, "max_steps", 5))
        tol = options.get("tol", getattr(self, "tol", None))
        check_loop_args(max_steps, tol)
        self.max_steps, self.tol = max_steps, tol
        if "lipschitz" in options:
            self.lipschitz = check_lipschitz_mode(options["lipschitz"])
        if "init" in options:
            if options["init"] not in INITS:
                raise ValueError(f"init must be one of {INITS}, got {options['init']!r}")
            self.init = options["init"]
        if "lam" in options:
            lam = torch.as_tensor(options["lam"], dtype=torch.get_default_dtype())
            if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
                raise ValueError(f"lam must be finite and >= 0, got {options['lam']}")
            with torch.no_grad():
                if self.learn_lam:
                    self.lam_raw.copy_(_softplus_inv(lam.clamp_min(1e-6)).expand_as(self.lam_raw))
                else:
                    self.lam_value = lam.to(self.lam_value.device).clone()
        opts = {"adjoint_ridge": LAYER_ADJOINT_RIDGE, **self.backward_options,
                **{k: options[k] for k in _BACKWARD_KEYS if k in options}}
        backward = options.get("backward", getattr(self, "backward", "unroll"))
        full = {"adjoint": "cg", "adjoint_tol": 1e-6, "adjoint_max_steps": 200, "phantom_steps": 1, "tau": 1.0,
                "on_unconverged": "warn", **opts}
        ridge = full.pop("adjoint_ridge", LAYER_ADJOINT_RIDGE)
        if not (isinstance(ridge, (int, float)) and ridge >= 0):
            raise ValueError(f"adjoint_ridge must be a number >= 0, got {ridge!r}")
        check_backward_options(backward, **full)
        self.backward, self.backward_options = backward, opts

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        op = self.dictionary(x if source is None else source)
        lam = self.lam.to(device=x.device, dtype=x.dtype)
        problem = SparseCoding(op, x, lam, nonneg=self.nonneg, lipschitz=self.lipschitz,
                               check_finite=self.check_finite)
        z, sol = sparse_code(problem, solver=self.solver, backward=self.backward, max_steps=self.max_steps,
                             tol=self.tol, z0=self.init, return_solution=True, **self.backward_options)
        stats = sol.stats
        tol = REPORT_TOL if self.tol is None else self.tol
        self.last_stats = {
            "steps": stats.steps.float().mean().detach(),
            "residual": stats.residual.detach().amax(),
            "converged": (stats.residual < tol).float().mean().detach(),
        }
        self.last_solution = sol
        return problem.D.decode(z)

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, max_steps={self.max_steps}, tol={self.tol}, backward={self.backward!r}, "
            f"lipschitz={self.lipschitz!r}, nonneg={self.nonneg}, learn_lam={self.learn_lam}"
        )


def _softplus_inv(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def configure_layers(model: nn.Module, **options: Any) -> int:
    """Apply solver/backward options to every SparseReconstruction in ``model``; returns how many.

    Raises ValueError if the model has none (so a command-line option is never silently ignored).
    """
    layers = [m for m in model.modules() if isinstance(m, SparseReconstruction)]
    if not layers and options:
        raise ValueError(f"the model has no VARS (SparseReconstruction) layers to apply {sorted(options)} to")
    for layer in layers:
        layer.configure(**options)
    return len(layers)


def layer_stats(model: nn.Module) -> list[dict[str, float]]:
    """The latest solver statistics of each SparseReconstruction in ``model`` (host values)."""
    return [
        {k: float(v) for k, v in m.last_stats.items()}
        for m in model.modules()
        if isinstance(m, SparseReconstruction) and m.last_stats
    ]

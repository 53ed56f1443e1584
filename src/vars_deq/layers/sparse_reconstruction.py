"""SparseReconstruction: the VARS layer as a deep-equilibrium module, X_hat = D z*(X)."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .. import unrolled
from ..backward import FLAT_BACKWARD_KEYS, Backward, Implicit, _caller, make_backward, sparse_code
from ..dictionaries.base import check_lipschitz_mode
from ..dictionaries.dense import DenseDictionary
from ..dictionaries.union import UnionDictionary
from ..equilibrium import INITS, REPORT_TOL, Solution, SolveStats, check_loop_args, initial_codes
from ..problems import SparseCoding
from ..solvers import Solver, make_solver
from .warm_start import active_warm_start

__all__ = ["SparseReconstruction", "configure_layers", "layer_stats", "original_forward", "RUNTIME_OPTIONS", "PRESET",
           "FORWARD_PRESETS"]

#: the layer's damping of the implicit adjoint when ``backward="implicit"`` is given by name:
#: layers run short, unconverged forwards (5 steps) whose support can exceed the token count,
#: where the exact system is singular. A ``vd.Implicit(...)`` object is used as given.
LAYER_ADJOINT_RIDGE = 1e-3

#: the warning registry of the construction-time warnings (shown once per message and user line)
_WARNED: dict = {}

#: "not given" for configure's keywords (None is a valid tol)
_KEEP: Any = object()


class _Preset:
    """The default of solver, max_steps and tol: the backward's forward preset (FORWARD_PRESETS)."""

    def __repr__(self) -> str:
        return "PRESET"


PRESET: Any = _Preset()

#: the original VARS code's forward: 5 ISTA steps, no stopping test (no host sync)
ORIGINAL_FORWARD = {"solver": "ista", "max_steps": 5, "tol": None}
#: a forward that converges, for gradients that assume an equilibrium (implicit, phantom): FISTA to a
#: relative residual of 1e-2 per problem, at most 100 steps. Measured on the digits VARS-SD model
#: (README, implicit training): 16-19 steps a layer, every problem converged, and implicit training
#: meets 97% best / 96.5% final on every seed tried, against 55-60 steps and 5 of 9 seeds at 1e-3
DEQ_FORWARD = {"solver": "fista", "max_steps": 100, "tol": 1e-2}
#: backward name -> the solver, max_steps and tol a layer uses where they are not given
FORWARD_PRESETS = {"unroll": ORIGINAL_FORWARD, "implicit": DEQ_FORWARD, "phantom": DEQ_FORWARD}

#: set inside original_forward() (a context variable, as WarmStart.use's: per thread and task)
_ORIGINAL: contextvars.ContextVar[bool] = contextvars.ContextVar("vars_deq_original_forward", default=False)


@contextlib.contextmanager
def original_forward() -> Iterator[None]:
    """Inside, every SparseReconstruction runs the original VARS code's forward and backward
    (ORIGINAL_FORWARD, unrolled), whatever solver, max_steps, tol and backward it is configured
    with; its lam, dictionary, step bound and start stay its own. It writes no module state, so
    leaving the block restores the configured layers.

    This is the shallow pretraining of deep-equilibrium models (Bai, Koltun and Kolter,
    "Multiscale deep equilibrium models", NeurIPS 2020, and DEQ-Flow): a few epochs of the cheap
    unrolled model before the equilibrium model trains (``TrainConfig.pretrain_epochs``).
    """
    token = _ORIGINAL.set(True)
    try:
        yield
    finally:
        _ORIGINAL.reset(token)


def fixed_counts(dictionary: nn.Module) -> tuple[int, int] | None:
    """(N tokens, M atoms) of a dictionary whose atoms are over a fixed token count (free atoms,
    alone or in a VARS-SD union), else None (Performer and convolutional atoms take N from the input)."""
    parts = [dictionary.a, dictionary.b] if isinstance(dictionary, UnionDictionary) else [dictionary]
    tokens = {p.num_tokens for p in parts if isinstance(p, DenseDictionary)}
    if len(tokens) != 1:
        return None
    (n,) = tokens
    atoms = 0
    for p in parts:
        m = getattr(p, "num_atoms", None)
        m = m(n) if callable(m) else m
        if not isinstance(m, int):
            return None
        atoms += m
    return n, atoms


def layer_backward(spec: "str | Backward", **flat: Any) -> Backward:
    """The backward object of a layer: names resolve with the layer's presets, then flat keywords refine it."""
    if isinstance(spec, str) and spec == Implicit.name:
        spec = Implicit(ridge=LAYER_ADJOINT_RIDGE)
    return make_backward(spec, **flat)


#: the backward inside original_forward()
_ORIGINAL_BACKWARD = layer_backward("unroll")


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
        solver, max_steps, tol, init: the forward solve. solver, max_steps and tol default to the
            backward's preset (FORWARD_PRESETS): with "unroll", 5 ISTA steps and no stopping test
            (the original VARS code); with "implicit" or "phantom", whose gradients assume an
            equilibrium, FISTA to a relative residual of 1e-2, at most 100 steps (DEQ_FORWARD).
            ``PRESET`` restores the preset in :meth:`configure`.
        backward: ``vd.Unroll()`` (the original code; "unroll"), ``vd.Implicit(...)`` or
            ``vd.Phantom(...)``, or their names. By name, "implicit" damps the adjoint with
            ``LAYER_ADJOINT_RIDGE``; ``backward_options`` are flat sugar for the backward's fields
            (adjoint, adjoint_tol, adjoint_max_steps, adjoint_ridge, on_unconverged, phantom_steps, tau).
        nonneg: restrict codes to z >= 0.
        lipschitz: "exact", "power" or "gershgorin" bound for the step 1/L.
        lipschitz_margin: added to the bound, L = bound + margin; None (default): 1 with the
            Gershgorin bound (the original VARS code's L = Gershgorin + 1), 0 otherwise.
        check_finite: reject NaN/Inf input with a ValueError (one host sync per forward).
    """

    def __init__(
        self,
        dictionary: nn.Module,
        lam: float | torch.Tensor = 0.3,
        solver: str | Solver = PRESET,
        max_steps: int = PRESET,
        tol: float | None = PRESET,
        backward: str | Backward = "unroll",
        nonneg: bool = False,
        lipschitz: str = "exact",
        learn_lam: bool = False,
        init: str = "encode",
        check_finite: bool = False,
        lipschitz_margin: float | None = None,
        **backward_options: Any,
    ):
        super().__init__()
        if not isinstance(dictionary, nn.Module):
            raise ValueError(f"dictionary must be a dictionary module, got {type(dictionary).__name__}")
        self.dictionary = dictionary
        # float64, so that lam = 0.3 is 0.3 in a float64 layer (a float32 value cast up is 0.30000001)
        lam_t = torch.as_tensor(lam, dtype=torch.float64)
        # checked on the CPU: under a meta device context (timm builds models there) lam_t has no values
        lam_cpu = torch.as_tensor(lam, dtype=torch.float64, device="cpu")
        if not bool(torch.isfinite(lam_cpu).all()) or bool((lam_cpu < 0).any()):
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        self.learn_lam = bool(learn_lam)
        if self.learn_lam:
            # softplus^{-1}(lam); lam = 0 is the boundary of the parametrization, start just above it
            self.lam_raw = nn.Parameter(_softplus_inv(lam_t.clamp_min(1e-6)).to(torch.get_default_dtype()))
        else:
            self.register_buffer("lam_value", lam_t.clone())
        self.nonneg, self.check_finite = bool(nonneg), bool(check_finite)
        self._forward: dict[str, Any] = {}  # solver, max_steps, tol given explicitly
        self.backward: Backward = layer_backward("unroll")
        self.configure(solver=solver, max_steps=max_steps, tol=tol, backward=backward, lipschitz=lipschitz,
                       init=init, lipschitz_margin=lipschitz_margin, **backward_options)
        self.last_stats: dict[str, torch.Tensor] = {}
        #: the latest forward's Solution with detached codes and statistics (no autograd graph kept)
        self.last_solution: Solution | None = None

    def _forward_option(self, name: str) -> Any:
        return self._forward.get(name, FORWARD_PRESETS[self.backward.name][name])

    @property
    def solver(self) -> str | Solver:
        """The forward solver: as given, or the backward's preset (FORWARD_PRESETS)."""
        return self._forward_option("solver")

    @property
    def max_steps(self) -> int:
        return self._forward_option("max_steps")

    @property
    def tol(self) -> float | None:
        return self._forward_option("tol")

    @property
    def margin(self) -> float:
        """The margin in use: ``lipschitz_margin``, or for None 1 with the Gershgorin bound, else 0."""
        if self.lipschitz_margin is not None:
            return float(self.lipschitz_margin)
        return 1.0 if self.lipschitz == "gershgorin" else 0.0

    @property
    def lam(self) -> torch.Tensor:
        return nn.functional.softplus(self.lam_raw) if self.learn_lam else self.lam_value

    def configure(self, *, lam: Any = _KEEP, solver: Any = _KEEP, max_steps: Any = _KEEP, tol: Any = _KEEP,
                  backward: Any = _KEEP, lipschitz: Any = _KEEP, lipschitz_margin: Any = _KEEP, init: Any = _KEEP,
                  **backward_options: Any) -> None:
        """Change the run-time options (validated, all or nothing); unset ones are kept.

        ``backward_options`` (flat backward fields) refine the given backward, or the current one.
        """
        unknown = sorted(set(backward_options) - set(FLAT_BACKWARD_KEYS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(RUNTIME_OPTIONS)}")
        forward = dict(self._forward)
        for name, value in (("solver", solver), ("max_steps", max_steps), ("tol", tol)):
            if value is PRESET:
                forward.pop(name, None)
            elif value is not _KEEP:
                forward[name] = value
        new_backward = layer_backward(self.backward if backward is _KEEP else backward, **backward_options)
        effective = {**FORWARD_PRESETS[new_backward.name], **forward}
        make_solver(effective["solver"])  # validates the name
        check_loop_args(effective["max_steps"], effective["tol"])
        if lipschitz is not _KEEP:
            check_lipschitz_mode(lipschitz)
        if lipschitz_margin is not _KEEP and lipschitz_margin is not None and not (
                isinstance(lipschitz_margin, (int, float)) and not isinstance(lipschitz_margin, bool)
                and math.isfinite(lipschitz_margin) and lipschitz_margin >= 0):
            raise ValueError(f"lipschitz_margin must be None or a finite number >= 0, got {lipschitz_margin!r}")
        if init is not _KEEP and init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if lam is not _KEEP:
            lam_t = torch.as_tensor(lam, dtype=torch.float64)
            if not bool(torch.isfinite(lam_t).all()) or bool((lam_t < 0).any()):
                raise ValueError(f"lam must be finite and >= 0, got {lam}")
        if (backward is not _KEEP or backward_options) and isinstance(new_backward, Implicit) and new_backward.ridge == 0:
            counts = fixed_counts(self.dictionary)
            if counts is not None and counts[1] > counts[0]:
                # once per message and user line (the layers of one model share both)
                warnings.warn_explicit(
                    f"an undamped implicit backward (adjoint_ridge=0) on a layer of {counts[1]} atoms over "
                    f"{counts[0]} tokens: a support can hold more atoms than there are tokens, where the support "
                    f"Gram is singular and the adjoint does not converge; pass adjoint_ridge > 0 (backward="
                    f"'implicit' by name uses {LAYER_ADJOINT_RIDGE:g})", UserWarning, *_caller(), registry=_WARNED)
        # every option is valid: apply them together
        self._forward, self.backward = forward, new_backward
        if lipschitz is not _KEEP:
            self.lipschitz = lipschitz
        if lipschitz_margin is not _KEEP:
            self.lipschitz_margin = lipschitz_margin
        if init is not _KEEP:
            self.init = init
        if lam is not _KEEP:
            with torch.no_grad():
                if self.learn_lam:
                    self.lam_raw.copy_(_softplus_inv(lam_t.clamp_min(1e-6)).expand_as(self.lam_raw))
                else:
                    self.lam_value = lam_t.to(self.lam_value.device, self.lam_value.dtype).clone()

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None,
                num_prefix_tokens: int | None = None) -> torch.Tensor:
        op = self.dictionary(x if source is None else source, num_prefix_tokens=num_prefix_tokens)
        lam = self.lam.to(device=x.device, dtype=x.dtype)
        problem = SparseCoding(op, x, lam, nonneg=self.nonneg, lipschitz=self.lipschitz,
                               check_finite=self.check_finite, lipschitz_margin=self.margin)
        if _ORIGINAL.get():
            backward = _ORIGINAL_BACKWARD
            solver, max_steps, tol = (ORIGINAL_FORWARD[k] for k in ("solver", "max_steps", "tol"))
        else:
            backward, solver, max_steps, tol = self.backward, self.solver, self.max_steps, self.tol
        # only a solve to a tolerance may start anywhere: a fixed-step output depends on its start
        warm = active_warm_start() if tol is not None else None
        z0 = self.init
        if warm is not None:
            with torch.no_grad():
                z0 = warm.start(self, initial_codes(problem, self.init).reshape(problem.code_shape))
        # the original forward (ISTA, fixed steps, unrolled) as one autograd node where it applies
        fast = unrolled.unrolled_sparse_code(problem, solver, backward, max_steps, tol, self.init)
        z, sol = fast if fast is not None else sparse_code(
            problem, solver=solver, backward=backward, max_steps=max_steps, tol=tol, z0=z0, return_solution=True)
        if warm is not None:
            warm.keep(self, z.detach())
        stats = sol.stats
        tol = REPORT_TOL if tol is None else tol
        self.last_stats = {
            "steps": stats.steps.float().mean().detach(),
            "residual": stats.residual.detach().amax(),
            "converged": (stats.residual < tol).float().mean().detach(),
        }
        # detached copies only: keeping sol itself would hold this forward's autograd graph alive
        self.last_solution = Solution(z.detach(), sol.converged, SolveStats(
            steps=stats.steps, residual=stats.residual.detach(), solver=stats.solver, max_steps=stats.max_steps,
            tol=stats.tol, adjoint=stats.adjoint))
        return problem.D.decode(z)

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, max_steps={self.max_steps}, tol={self.tol}, backward={self.backward}, "
            f"lipschitz={self.lipschitz!r}, margin={self.margin:g}, init={self.init!r}, nonneg={self.nonneg}, "
            f"learn_lam={self.learn_lam}"
        )


def layer_options_of(fn) -> tuple[str, ...]:
    """A layer's options: the keyword-only parameters of ``fn`` and the flat backward keywords."""
    names = [n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return (*names, *FLAT_BACKWARD_KEYS)


#: the options :meth:`SparseReconstruction.configure` (and configure_layers, the CLI) can change
RUNTIME_OPTIONS: tuple[str, ...] = layer_options_of(SparseReconstruction.configure)


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

"""Sparse-coding (lasso) problems: the energy VARS minimizes and its proximal-gradient map.

Per problem (every leading dim of x is one, e.g. batch x head), with X (N, C), D (N, M), Z (M, C):

    E(Z) = 1/2 ||X - D Z||_F^2 + lam * ||Z||_1        (+ indicator(Z >= 0) if nonneg)
    T(Z) = S_{eta lam}(Z - eta D^T (D Z - X)),        eta = 1 / L,  L >= ||D||_2^2

The fixed point Z* = T(Z*) is the lasso minimizer (Shi et al., "Visual Attention Emerges from
Recurrent Sparse Reconstruction", ICML 2022; Daubechies, Defrise & De Mol 2004 for ISTA).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .dictionaries.base import DictionaryOperator, check_lipschitz_mode
from .dictionaries.dense import DenseOperator
from .dictionaries.union import UnionOperator
from .prox import active_mask, threshold

__all__ = ["SparseCoding"]

_EPS = 1e-12
#: LassoBatch.T's fused no-grad step (tests and benchmarks/bench_step_map.py set it False for the plain one)
STEP_MAP = True


def _as_operator(D, x: torch.Tensor) -> DictionaryOperator:
    if isinstance(D, DictionaryOperator):
        return D
    if isinstance(D, torch.Tensor):
        return DenseOperator(D)
    if isinstance(D, nn.Module):
        op = D(x)
        if not isinstance(op, DictionaryOperator):
            raise ValueError(f"the dictionary module {type(D).__name__} did not return a DictionaryOperator")
        return op
    raise ValueError(
        "D must be a tensor of atoms (..., N, M), a dictionary module or a DictionaryOperator, "
        f"got {type(D).__name__}"
    )


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN or Inf value(s); sparse coding needs finite input")


class LassoBatch:
    """A flat batch of P lasso problems in the form the solvers use (internal).

    ``b = D^T x`` is formed once; each step needs one Gram product ``G z = D^T D z``, and energy
    comparisons inside the solvers come from those products (:meth:`energy_change`).
    """

    is_lasso = True

    def __init__(self, op, x, b, lam, eta, nonneg, step_map=None):
        self.op, self.x, self.b, self.lam, self.eta, self.nonneg = op, x, b, lam, eta, nonneg
        # the fused no-grad step (StepMap), built on the first T without autograd; False: not used
        self._step_map = step_map

    @property
    def num_problems(self) -> int:
        return self.b.shape[0]

    def normal(self, z: torch.Tensor) -> torch.Tensor:
        return self.op.normal(z)

    def T_from(self, z: torch.Tensor, gz: torch.Tensor) -> torch.Tensor:
        return threshold(z - self.eta * (gz - self.b), self.eta * self.lam, self.nonneg)

    def T(self, z: torch.Tensor) -> torch.Tensor:
        """T(z) = S_t(z - eta (G z - b)), t = eta lam.

        Where autograd does not record (no grad mode, or nothing here requires grad) and the atoms
        are explicit, T runs fused (:class:`StepMap`, built once per batch and taken along when the
        loop drops problems): S_t(A z + c) with A = I - eta G where the Gram is formed, else
        S_t((z + c) + (-eta D^T)(D z)), with c = eta b. Same products as the plain form, two or three
        elementwise passes over the codes fewer; equal to it to rounding (tests/test_fast_paths.py)."""
        return threshold(*self.pre_step(z), self.nonneg)

    def pre_step(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z - eta (G z - b), eta lam): the gradient step of T and its threshold, T(z) =
        threshold(*pre_step(z)); fused where T runs fused (see :meth:`T`)."""
        if not (torch.is_grad_enabled() and (z.requires_grad or self.b.requires_grad or self.lam.requires_grad)):
            step_map = self.step_map()
            if step_map is not None:
                return step_map.pre_threshold(z), step_map.t
        return z - self.eta * (self.normal(z) - self.b), self.eta * self.lam

    def step_map(self) -> "StepMap | None":
        """The fused no-grad step of these problems, or None where the operator keeps no explicit
        atoms (FFT convolutions) or ``STEP_MAP`` is off."""
        if self._step_map is None:
            self._step_map = StepMap.build(self) if STEP_MAP else False
        return self._step_map or None

    def l1(self, z: torch.Tensor) -> torch.Tensor:
        return (self.lam * z.abs()).sum((-2, -1))

    def energy_change(self, z: torch.Tensor, gz: torch.Tensor, w: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
        """E(w) - E(z) per problem, from the Gram products gz = G z and gw = G w.

        Summed from per-entry terms, f(w) - f(z) = <w - z, (G w + G z) / 2 - b> (f is quadratic)
        and lam (|w| - |z|), so its rounding is relative to the change, not to E: a difference of
        two energies each computed in float32 is noise once the change is below about 1e-7 E, and
        the comparisons of restarts and safeguards then go either way (function-restart FISTA
        stalled at a relative energy gap of 6e-5 on the captured digits problems in float32, and
        reaches the float64 run's 6e-7 with this form). Nonneg: +inf where w has a negative entry
        (E(w) = inf), else -inf where z has one (a start such as D^T x)."""
        terms = (w - z) * (0.5 * (gw + gz) - self.b) + self.lam * (w.abs() - z.abs())
        change = terms.sum((-2, -1))
        if self.nonneg:
            change = torch.where((z < 0).flatten(1).any(-1), torch.full_like(change, -math.inf), change)
            change = torch.where((w < 0).flatten(1).any(-1), torch.full_like(change, math.inf), change)
        return change

    def majorizer_change(self, z: torch.Tensor, gz: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
        """Q(T z; z) - E(z) <= 0 per problem, for the proximal-gradient majorizer at the plain step

            Q(T z; z) = f(z) + <grad f(z), d> + ||d||^2 / (2 eta) + lam ||T z||_1 >= E(T z),   d = T z - z,

        summed from per-entry terms like :meth:`energy_change`, so E(w) <= Q(T z; z) is decided as
        energy_change(z, gz, w, gw) <= majorizer_change(z, gz, tz) without forming either energy."""
        d = tz - z
        terms = (gz - self.b) * d + d * d / (2 * self.eta) + self.lam * (tz.abs() - z.abs())
        return terms.sum((-2, -1))

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """E(z) with the residual formed explicitly (no cancellation in ||x||^2 - ...)."""
        r = self.x - self.op.decode(z)
        e = 0.5 * r.pow(2).sum((-2, -1)) + self.l1(z)
        if self.nonneg:
            e = torch.where((z < 0).flatten(1).any(-1), torch.full_like(e, math.inf), e)
        return e

    def take(self, index: torch.Tensor) -> "LassoBatch":
        def pick(t):
            return t if t.shape[0] == 1 else t[index]

        step_map = self._step_map.take(pick) if self._step_map else self._step_map
        return LassoBatch(
            self.op.take(index), self.x[index], self.b[index], pick(self.lam), pick(self.eta), self.nonneg, step_map,
        )


class StepMap(NamedTuple):
    """The prox-gradient map's affine part, per problem, for :meth:`LassoBatch.T` without autograd.

    Gram form (the operator keeps its Gram, M < 2N): ``left`` = A = I - eta G (P, M, M),
    ``atoms`` None, and A z + c is one baddbmm. Factored form: ``left`` = -eta D^T (P, M, N),
    ``atoms`` = D (P, N, M), and (z + c) + left (D z) is a product and a baddbmm. c = eta b
    (P, M, C); t = eta lam, broadcastable to the codes.
    """

    left: torch.Tensor
    atoms: torch.Tensor | None
    c: torch.Tensor
    t: torch.Tensor

    @staticmethod
    def build(batch: "LassoBatch") -> "StepMap | bool":
        op, eta = batch.op, batch.eta
        P = batch.b.shape[0]
        with torch.no_grad():
            c, t = eta * batch.b, eta * batch.lam
            gram = getattr(op, "gram", None)
            if gram is not None:
                M = op.num_atoms
                eye = torch.eye(M, dtype=gram.dtype, device=gram.device)
                return StepMap((eye - eta * gram).expand(P, M, M).contiguous(), None, c, t)
            atoms = _explicit_atoms(op, P)
            if atoms is None:
                return False
            return StepMap((-eta * atoms.transpose(-1, -2)).contiguous(), atoms.contiguous(), c, t)

    def pre_threshold(self, z: torch.Tensor) -> torch.Tensor:
        if self.atoms is None:
            return torch.baddbmm(self.c, self.left, z)
        if torch.is_autocast_enabled(z.device.type):  # autocast casts baddbmm's inputs, not baddbmm_'s
            return torch.baddbmm(z + self.c, self.left, self.atoms @ z)
        return (z + self.c).baddbmm_(self.left, self.atoms @ z)  # in place: baddbmm would copy z + c

    def take(self, pick) -> "StepMap":
        return StepMap(pick(self.left), None if self.atoms is None else pick(self.atoms), pick(self.c), pick(self.t))


def _explicit_atoms(op, P: int) -> torch.Tensor | None:
    """D as (P, N, M) for dense atoms and unions of them (shared parts expanded), else None."""
    if isinstance(op, DenseOperator):
        return op.weight.expand(P, *op.weight.shape[-2:])
    if isinstance(op, UnionOperator) and op._dense_parts:
        a, b = op.a.weight, op.b.weight
        return torch.cat([a.expand(P, *a.shape[-2:]), b.expand(P, *b.shape[-2:])], dim=-1)
    return None


class SparseCoding:
    """The lasso problems min_Z 1/2 ||X - D Z||^2 + lam ||Z||_1, one per leading index of x.

    Args:
        D: atoms as a tensor (..., N, M), a dictionary module (bound to ``x``), or an operator
            bound from one. Its leading dims broadcast against x's. Gradients flow to whatever
            tensors D was built from.
        x: signals (..., N, C); every leading dim indexes an independent problem.
        lam: sparsity weight >= 0: a float or a tensor broadcastable to the codes (..., M, C),
            e.g. shape (H, 1, 1) for one lam per head. May require grad.
        nonneg: restrict codes to Z >= 0.
        lipschitz: how L >= ||D||^2 is computed: "exact", "power" or "gershgorin".
        check_finite: reject NaN/Inf in x, D and lam (one host sync).
        lipschitz_margin: >= 0 added to the bound, L = bound + margin (the original VARS code
            steps with 1 / (Gershgorin bound + 1)).
    """

    def __init__(
        self,
        D,
        x: torch.Tensor,
        lam: float | torch.Tensor,
        nonneg: bool = False,
        lipschitz: str = "exact",
        check_finite: bool = True,
        lipschitz_margin: float = 0.0,
    ):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a tensor (..., N, C), got {getattr(x, 'shape', type(x))}")
        check_lipschitz_mode(lipschitz)
        if not (isinstance(lipschitz_margin, (int, float)) and not isinstance(lipschitz_margin, bool)
                and math.isfinite(lipschitz_margin) and lipschitz_margin >= 0):
            raise ValueError(f"lipschitz_margin must be a finite number >= 0, got {lipschitz_margin!r}")
        if x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"x must have at least one token and one channel, got shape {tuple(x.shape)}")
        op = _as_operator(D, x)
        if op.num_tokens != x.shape[-2]:
            raise ValueError(f"D has atoms over N={op.num_tokens} tokens but x has N={x.shape[-2]} (x: {tuple(x.shape)})")
        d_dtype = op.tensors()[0].dtype
        if d_dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"D is {d_dtype} but x is {x.dtype}: give both the same dtype (or run under torch.autocast)"
            )
        batch = x.shape[:-2]
        try:
            full = torch.broadcast_shapes(op.batch_shape, batch)
        except RuntimeError:
            full = None
        if full != batch:
            raise ValueError(
                f"D's leading dims {tuple(op.batch_shape)} do not broadcast to x's problem dims {tuple(batch)}"
            )
        if not isinstance(lam, torch.Tensor):
            if isinstance(lam, bool) or not isinstance(lam, (int, float)):
                raise ValueError(f"lam must be a number >= 0 or a tensor, got {type(lam).__name__} {lam!r}")
            if not math.isfinite(float(lam)) or float(lam) < 0:
                raise ValueError(f"lam must be a finite number >= 0, got {lam}")
            lam_t = torch.as_tensor(float(lam), dtype=x.dtype, device=x.device)
        else:
            lam_t = lam
        code_shape = (*batch, op.num_atoms, x.shape[-1])
        try:
            lam_ok = torch.broadcast_shapes(lam_t.shape, code_shape) == torch.Size(code_shape)
        except RuntimeError:
            lam_ok = False
        if not lam_ok:
            raise ValueError(f"lam of shape {tuple(lam_t.shape)} does not broadcast to the codes {code_shape}")
        if check_finite:
            _check_finite("x", x)
            for t in op.tensors():
                _check_finite("D", t)
            _check_finite("lam", lam_t)
            if bool((lam_t < 0).any()):
                raise ValueError(f"lam must be >= 0, got min {lam_t.min().item():g}")
        self.D, self.x, self.lam, self.nonneg, self.lipschitz = op, x, lam_t, bool(nonneg), lipschitz
        self.lipschitz_margin = float(lipschitz_margin)
        self.batch_shape = batch
        self.num_tokens, self.num_atoms, self.num_channels = op.num_tokens, op.num_atoms, x.shape[-1]
        self._flat: dict[bool, LassoBatch] = {}
        self._eta: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> "SparseCoding":
        """The same problems in another dtype, detached (for reference solves)."""
        return SparseCoding(self.D.to(dtype), self.x.detach().to(dtype), self.lam.detach().to(dtype),
                            nonneg=self.nonneg, lipschitz=self.lipschitz, check_finite=False,
                            lipschitz_margin=self.lipschitz_margin)

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.num_atoms, self.num_channels)

    @property
    def num_problems(self) -> int:
        return math.prod(self.batch_shape)

    def flat(self) -> LassoBatch:
        """The P = prod(batch) problems flattened for the solvers.

        Built once per grad mode: a forward under no_grad (implicit, phantom) gets a graph-free
        copy, and the differentiable one is built only for the final application of T. The step
        eta = 1/L is computed once, without gradient (z* does not depend on it).
        """
        grad = torch.is_grad_enabled()
        if grad not in self._flat:
            batch, n, c, m = self.batch_shape, self.num_tokens, self.num_channels, self.num_atoms
            op = self.D.flatten(batch)
            x = self.x.reshape(-1, n, c)
            b = op.encode(x)
            lam = _flatten_param(self.lam, batch, m, c)
            if self._eta is None:
                lip = op.lipschitz(self.lipschitz).detach().reshape(-1) + self.lipschitz_margin
                self._eta = (1.0 / lip.clamp_min(torch.finfo(lip.dtype).tiny)).to(x.dtype).reshape(-1, 1, 1)
            self._flat[grad] = LassoBatch(op, x, b, lam, self._eta, self.nonneg)
        return self._flat[grad]

    def _codes(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape != torch.Size(self.code_shape):
            raise ValueError(f"codes must have shape {self.code_shape}, got {tuple(z.shape)}")
        return z.reshape(-1, self.num_atoms, self.num_channels)

    def _batch(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.batch_shape)

    # -- public evaluations on codes z (..., M, C) -----------------------------------------
    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """E(z) per problem, shape (...)."""
        return self._batch(self.flat().energy(self._codes(z)))

    def gradient(self, z: torch.Tensor) -> torch.Tensor:
        """Gradient of the smooth part, D^T (D z - x)."""
        f = self.flat()
        zf = self._codes(z)
        return (f.normal(zf) - f.b).reshape(self.code_shape)

    def prox_grad(self, z: torch.Tensor) -> torch.Tensor:
        """T(z) = S_{eta lam}(z - eta D^T (D z - x))."""
        return self.flat().T(self._codes(z)).reshape(self.code_shape)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """Relative fixed-point residual ||T(z) - z|| / max(||z||, eps) per problem."""
        zf = self._codes(z)
        return self._batch(relative_residual(zf, self.flat().T(zf)))

    def kkt_violation(self, z: torch.Tensor) -> torch.Tensor:
        """Largest violation of the lasso optimality conditions per problem, with g = D^T(Dz - x):
        g_i = -lam sign(z_i) where z_i != 0 and |g_i| <= lam where z_i = 0 (nonneg: g_i = -lam where
        z_i > 0, g_i >= -lam where z_i = 0, and z >= 0)."""
        f = self.flat()
        zf = self._codes(z)
        g = f.normal(zf) - f.b
        lam = f.lam.expand_as(g)
        if self.nonneg:
            on = zf > 0
            v = torch.where(on, (g + lam).abs(), torch.relu(-(g + lam)))
            v = torch.maximum(v, torch.relu(-zf))
        else:
            on = zf != 0
            v = torch.where(on, (g + lam * torch.sign(zf)).abs(), torch.relu(g.abs() - lam))
        return self._batch(v.flatten(1).amax(-1))

    def support(self, z: torch.Tensor) -> torch.Tensor:
        """Entries of the codes where T has slope 1 (the active set of the implicit backward)."""
        f = self.flat()
        zf = self._codes(z)
        u = zf - f.eta * (f.normal(zf) - f.b)
        return active_mask(u, f.eta * f.lam, self.nonneg).reshape(self.code_shape)


def relative_residual(z: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
    """||T z - z|| / max(||z||, eps) over all but the first dim."""
    num = (tz - z).flatten(1).norm(dim=-1)
    den = z.flatten(1).norm(dim=-1).clamp_min(_EPS)
    return num / den


def _flatten_param(t: torch.Tensor, batch: Sequence[int], m: int, c: int) -> torch.Tensor:
    """A tensor broadcastable to (*batch, M, C) -> (P or 1, M or 1, C or 1) without copying shared values."""
    nd = len(batch) + 2
    t = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape))
    tail = t.shape[-2:]
    if all(s == 1 for s in t.shape[:-2]):
        return t.reshape(1, *tail)
    return t.expand(*batch, *tail).reshape(-1, *tail)

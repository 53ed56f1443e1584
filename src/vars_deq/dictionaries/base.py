"""The linear-operator protocol every dictionary binds to.

A dictionary module, called on the layer input, returns a :class:`DictionaryOperator`: the
per-input linear map ``D`` from codes ``z`` (..., M, C) to signals (..., N, C). Its batch shape
(the leading dims) is either the problems' batch shape or all ones (shared atoms, never copied).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from typing import Sequence

import torch

__all__ = ["DictionaryOperator", "LIPSCHITZ_MODES", "POWER_SAFETY"]

LIPSCHITZ_MODES = ("exact", "power", "gershgorin")

#: Power iteration approaches ||D||^2 from below; its estimate is multiplied by this factor.
#: It is a safety margin, not a guarantee: use "exact" or "gershgorin" for a proven bound.
POWER_SAFETY = 1.05
POWER_ITERATIONS = 30


def check_lipschitz_mode(mode: str) -> str:
    if mode not in LIPSCHITZ_MODES:
        raise ValueError(f"lipschitz must be one of {LIPSCHITZ_MODES}, got {mode!r}")
    return mode


class DictionaryOperator(ABC):
    """A batch of linear maps D: R^{M x C} -> R^{N x C}, applied column by column.

    Subclasses implement ``decode`` (D z), ``encode`` (D^T x), ``take`` (select problems of a
    flattened batch) and may override ``normal`` (D^T D z), ``lipschitz`` and ``materialize``.
    """

    num_tokens: int
    num_atoms: int
    batch_shape: torch.Size

    # -- the map -------------------------------------------------------------------------
    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (..., M, C) -> (..., N, C)
        ...

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, C) -> (..., M, C)
        ...

    def normal(self, z: torch.Tensor) -> torch.Tensor:
        """D^T D z, the Gram operator (the only product the solvers need per step)."""
        return self.encode(self.decode(z))

    # -- batch handling ------------------------------------------------------------------
    @abstractmethod
    def flatten(self, batch_shape: Sequence[int]) -> "DictionaryOperator":
        """Broadcast to the problems' batch shape and flatten it to one dim P (or keep 1 if shared)."""
        ...

    @abstractmethod
    def take(self, index: torch.Tensor) -> "DictionaryOperator":
        """Problems ``index`` of a flattened operator (a shared operator returns itself)."""
        ...

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The tensors the operator is built from (for finiteness checks)."""
        ...

    @abstractmethod
    def to(self, dtype: torch.dtype) -> "DictionaryOperator":
        """The same operator in another floating dtype (e.g. a float64 reference solve)."""
        ...

    # -- dense views and bounds ----------------------------------------------------------
    def materialize(self) -> torch.Tensor:
        """The explicit atoms (*batch, N, M): decode of the identity. For tests and small sizes."""
        m = self.num_atoms
        ref = self.tensors()[0]
        eye = torch.eye(m, dtype=self.dtype, device=ref.device)
        eye = eye.expand(*self.batch_shape, m, m)
        return self.decode(eye)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors()[0].dtype if not self.tensors()[0].is_complex() else torch.float32

    def lipschitz(self, mode: str = "exact") -> torch.Tensor:
        """An upper bound L >= ||D||_2^2 per problem (*batch), without gradient.

        ``exact``: largest eigenvalue of the Gram D^T D. ``gershgorin``: max row sum of |D^T D|,
        a guaranteed bound (the original VARS code's choice). ``power``: power iteration times
        ``POWER_SAFETY`` (an estimate from below, inflated: not a proof).
        """
        check_lipschitz_mode(mode)
        with torch.no_grad():
            if mode == "power":
                return self._power_iteration()
            gram = self._gram()
            if mode == "exact":
                return torch.linalg.eigvalsh(_wide(gram))[..., -1].clamp_min(0).to(gram.dtype)
            return gram.abs().sum(-1).amax(-1)

    def _gram(self) -> torch.Tensor:
        d = self.materialize()
        return d.transpose(-1, -2) @ d

    def _power_iteration(self) -> torch.Tensor:
        ref = self.tensors()[0]
        gen = torch.Generator(device=ref.device).manual_seed(0)
        v = torch.randn(*self.batch_shape, self.num_atoms, 1, generator=gen, device=ref.device, dtype=self.dtype)
        v = v / v.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        est = torch.zeros(self.batch_shape, device=ref.device, dtype=self.dtype)
        for _ in range(POWER_ITERATIONS):
            w = self.normal(v)
            est = w.norm(dim=(-2, -1))
            v = w / est[..., None, None].clamp_min(1e-30)
        return est * POWER_SAFETY


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Small dense linear algebra runs in float32 or wider, whatever the autocast dtype."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def flat_size(shape: Sequence[int]) -> int:
    return math.prod(shape) if len(shape) else 1

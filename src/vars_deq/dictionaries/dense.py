"""Explicit atoms: D is a tensor (..., N, M)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import DictionaryOperator, flat_size

__all__ = ["DenseOperator", "DenseDictionary", "FreeAtoms"]


class DenseOperator(DictionaryOperator):
    """D given by its atoms ``weight`` (*batch, N, M).

    When M < 2N the Gram D^T D (*batch, M, M) is formed once and each solver step costs one
    M x M product instead of two N x M products.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor | None = None, use_gram: bool | None = None):
        if weight.dim() < 2:
            raise ValueError(f"D must have shape (..., N, M), got {tuple(weight.shape)}")
        self.weight = weight
        self.num_tokens, self.num_atoms = weight.shape[-2:]
        self.batch_shape = weight.shape[:-2]
        if use_gram is None:
            use_gram = self.num_atoms < 2 * self.num_tokens
        self.use_gram = use_gram
        self.gram = gram
        if use_gram and gram is None:
            self.gram = weight.transpose(-1, -2) @ weight

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.weight @ z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.transpose(-1, -2) @ x

    def normal(self, z: torch.Tensor) -> torch.Tensor:
        if self.gram is not None:
            return self.gram @ z
        return self.encode(self.decode(z))

    def flatten(self, batch_shape: Sequence[int]) -> "DenseOperator":
        if flat_size(self.batch_shape) == 1:
            w = self.weight.reshape(1, self.num_tokens, self.num_atoms)
            g = None if self.gram is None else self.gram.reshape(1, self.num_atoms, self.num_atoms)
            return DenseOperator(w, g, self.use_gram)
        n, m = self.num_tokens, self.num_atoms
        w = self.weight.expand(*batch_shape, n, m).reshape(-1, n, m)
        g = None if self.gram is None else self.gram.expand(*batch_shape, m, m).reshape(-1, m, m)
        return DenseOperator(w, g, self.use_gram)

    def take(self, index: torch.Tensor) -> "DenseOperator":
        if self.weight.shape[0] == 1:
            return self
        g = None if self.gram is None else self.gram[index]
        return DenseOperator(self.weight[index], g, self.use_gram)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def to(self, dtype: torch.dtype) -> "DenseOperator":
        return DenseOperator(self.weight.to(dtype), use_gram=self.use_gram)

    def materialize(self) -> torch.Tensor:
        return self.weight

    def _gram(self) -> torch.Tensor:
        return self.gram if self.gram is not None else self.weight.transpose(-1, -2) @ self.weight


class DenseDictionary(nn.Module):
    """Explicit atoms as a learnable parameter, shape (..., N, M) (leading dims broadcast
    against the problems, e.g. (H, N, M) for one dictionary per head).

    Calling the module (with or without the layer input) binds a :class:`DenseOperator`.
    """

    def __init__(self, weight: torch.Tensor, learnable: bool = True):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise ValueError("weight must be a tensor of atoms with shape (..., N, M)")
        if not weight.is_meta and not torch.isfinite(weight).all():  # a meta tensor (timm's meta builds) has no values
            raise ValueError("weight holds NaN or Inf")
        if learnable:
            self.weight = nn.Parameter(weight.detach().clone())
        else:
            self.register_buffer("weight", weight.detach().clone())

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[-2]

    @property
    def num_atoms(self) -> int:
        return self.weight.shape[-1]

    def forward(self, source: torch.Tensor | None = None, num_prefix_tokens: int | None = None) -> DenseOperator:
        if source is not None and source.shape[-2] != self.num_tokens:
            raise ValueError(
                f"DenseDictionary has atoms over N={self.num_tokens} tokens, input has {source.shape[-2]}"
            )
        return DenseOperator(self.weight)


class FreeAtoms(DenseDictionary):
    """Free learned static atoms, one (N x M) matrix per head, L2-normalized over the tokens at use.

    The static half of the original VARS-SD code: a learned (1, H, N, m) matrix concatenated with
    the dynamic atoms phi(Q) and normalized over tokens together with them (a per-atom
    normalization, so normalizing each part apart is the same). Initialized N(0, 1), as there.

    Args:
        num_heads: H.
        num_tokens: N, the token count the atoms are defined over (fixed: no other input size).
        num_atoms: M_s atoms per head.
    """

    def __init__(self, num_heads: int, num_tokens: int, num_atoms: int):
        for name, value in (("num_heads", num_heads), ("num_tokens", num_tokens), ("num_atoms", num_atoms)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        super().__init__(torch.randn(num_heads, num_tokens, num_atoms))

    def forward(self, source: torch.Tensor | None = None, num_prefix_tokens: int | None = None) -> DenseOperator:
        if source is not None and source.shape[-2] != self.num_tokens:
            raise ValueError(
                f"static_atoms='free' holds atoms over num_tokens={self.num_tokens} tokens, the input has "
                f"{source.shape[-2]}; build the layer with num_tokens={source.shape[-2]} or use static_atoms='conv'"
            )
        return DenseOperator(self.weight / self.weight.norm(dim=-2, keepdim=True).clamp_min(1e-6))

"""Explicit atoms: D is a tensor (..., N, M)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import DictionaryOperator, flat_size

__all__ = ["DenseOperator", "DenseDictionary"]


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
        if not torch.isfinite(weight).all():
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

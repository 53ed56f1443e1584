"""VARS-SD: the union of two dictionaries, D = [D_a, D_b] (atoms of a first, then b)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import DictionaryOperator, check_lipschitz_mode

__all__ = ["UnionDictionary", "UnionOperator"]


class UnionOperator(DictionaryOperator):
    def __init__(self, a: DictionaryOperator, b: DictionaryOperator):
        if a.num_tokens != b.num_tokens:
            raise ValueError(f"union of dictionaries over different token counts: {a.num_tokens} vs {b.num_tokens}")
        self.a, self.b = a, b
        self.num_tokens = a.num_tokens
        self.num_atoms = a.num_atoms + b.num_atoms
        self.batch_shape = torch.broadcast_shapes(a.batch_shape, b.batch_shape)

    def decode(self, z):
        ma = self.a.num_atoms
        return self.a.decode(z[..., :ma, :]) + self.b.decode(z[..., ma:, :])

    def encode(self, x):
        return torch.cat([self.a.encode(x), self.b.encode(x)], dim=-2)

    def flatten(self, batch_shape: Sequence[int]) -> "UnionOperator":
        return UnionOperator(self.a.flatten(batch_shape), self.b.flatten(batch_shape))

    def take(self, index):
        return UnionOperator(self.a.take(index), self.b.take(index))

    def tensors(self):
        return self.a.tensors() + self.b.tensors()

    def to(self, dtype):
        return UnionOperator(self.a.to(dtype), self.b.to(dtype))

    @property
    def dtype(self):
        return self.a.dtype

    def lipschitz(self, mode: str = "exact") -> torch.Tensor:
        """"gershgorin": the max absolute row sum of the union's whole Gram [D_a, D_b]^T [D_a, D_b]
        (what the original VARS-SD code bounds); "exact" and "power": ||[D_a, D_b]||^2 <=
        ||D_a||^2 + ||D_b||^2, the sum of the parts' bounds (no union Gram is formed)."""
        check_lipschitz_mode(mode)
        if mode == "gershgorin":
            return super().lipschitz(mode)
        return self.a.lipschitz(mode) + self.b.lipschitz(mode)


class UnionDictionary(nn.Module):
    """VARS-SD: calling it binds both parts to the same input and concatenates their atoms."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, source: torch.Tensor, num_prefix_tokens: int | None = None) -> UnionOperator:
        return UnionOperator(self.a(source, num_prefix_tokens), self.b(source, num_prefix_tokens))

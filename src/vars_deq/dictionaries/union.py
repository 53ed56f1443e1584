"""VARS-SD: the union of two dictionaries, D = [D_a, D_b] (atoms of a first, then b)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import DictionaryOperator, check_lipschitz_mode, flat_size
from .dense import DenseOperator

__all__ = ["UnionDictionary", "UnionOperator"]


class UnionOperator(DictionaryOperator):
    """D = [D_a, D_b]: decode D_a z_a + D_b z_b, encode [D_a^T x; D_b^T x].

    When both parts are explicit atoms (:class:`DenseOperator`) and M = M_a + M_b < 2N, the
    union's Gram is assembled once per forward from its blocks,

        G = [[G_a, D_a^T D_b], [D_b^T D_a, G_b]]        (*batch, M, M),

    with G_a, G_b the parts' own Grams (a part shared by the batch, like the free static atoms
    (H, N, M_b), has its G_b formed once, not per sample; only G_a and the cross block are per
    sample), and each solver step costs one M x M product instead of decode + encode (2 N M
    multiply-adds per code column). The Gram is ``.gram`` (None when not formed), which the
    Gershgorin bound and the direct adjoint read.
    """

    def __init__(self, a: DictionaryOperator, b: DictionaryOperator, gram: torch.Tensor | None = None,
                 use_gram: bool | None = None):
        if a.num_tokens != b.num_tokens:
            raise ValueError(f"union of dictionaries over different token counts: {a.num_tokens} vs {b.num_tokens}")
        self.a, self.b = a, b
        self.num_tokens = a.num_tokens
        self.num_atoms = a.num_atoms + b.num_atoms
        self.batch_shape = torch.broadcast_shapes(a.batch_shape, b.batch_shape)
        if use_gram is None:
            use_gram = self._dense_parts and self.num_atoms < 2 * self.num_tokens
        self.use_gram = use_gram
        self.gram = gram
        if use_gram and gram is None:
            self.gram = self._block_gram()

    @property
    def _dense_parts(self) -> bool:
        return isinstance(self.a, DenseOperator) and isinstance(self.b, DenseOperator)

    def _block_gram(self) -> torch.Tensor:
        """[[G_a, D_a^T D_b], [D_b^T D_a, G_b]] from the parts' Grams and one cross product."""
        cross = self.a.weight.transpose(-1, -2) @ self.b.weight
        ma, mb = self.a.num_atoms, self.b.num_atoms
        ga = self.a._gram().expand(*self.batch_shape, ma, ma)
        gb = self.b._gram().expand(*self.batch_shape, mb, mb)
        cross = cross.expand(*self.batch_shape, ma, mb)
        return torch.cat([torch.cat([ga, cross], dim=-1), torch.cat([cross.transpose(-1, -2), gb], dim=-1)], dim=-2)

    def decode(self, z):
        ma = self.a.num_atoms
        return self.a.decode(z[..., :ma, :]) + self.b.decode(z[..., ma:, :])

    def encode(self, x):
        return torch.cat([self.a.encode(x), self.b.encode(x)], dim=-2)

    def normal(self, z):
        if self.gram is not None:
            return self.gram @ z
        return self.encode(self.decode(z))

    def flatten(self, batch_shape: Sequence[int]) -> "UnionOperator":
        gram = self.gram
        if gram is not None:
            m = self.num_atoms
            if flat_size(self.batch_shape) == 1:
                gram = gram.reshape(1, m, m)
            else:
                gram = gram.expand(*batch_shape, m, m).reshape(-1, m, m)
        return UnionOperator(self.a.flatten(batch_shape), self.b.flatten(batch_shape), gram, self.use_gram)

    def take(self, index):
        gram = self.gram
        if gram is not None and gram.shape[0] != 1:
            gram = gram[index]
        return UnionOperator(self.a.take(index), self.b.take(index), gram, self.use_gram)

    def tensors(self):
        return self.a.tensors() + self.b.tensors()

    def to(self, dtype):
        return UnionOperator(self.a.to(dtype), self.b.to(dtype), use_gram=self.use_gram)

    @property
    def dtype(self):
        return self.a.dtype

    def _gram(self) -> torch.Tensor:
        if self.gram is not None:
            return self.gram
        if self._dense_parts:
            return self._block_gram()
        return super()._gram()

    def lipschitz(self, mode: str = "exact") -> torch.Tensor:
        """"gershgorin": the max absolute row sum of the union's whole Gram [D_a, D_b]^T [D_a, D_b]
        (what the original VARS-SD code bounds; read from ``.gram`` when formed); "exact" and
        "power": ||[D_a, D_b]||^2 <= ||D_a||^2 + ||D_b||^2, the sum of the parts' bounds."""
        check_lipschitz_mode(mode)
        if mode == "gershgorin":
            with torch.no_grad():  # the l1 norm of each row: no |G| temporary of the Gram's size
                return torch.linalg.vector_norm(self._gram(), ord=1, dim=-1).amax(-1)
        return self.a.lipschitz(mode) + self.b.lipschitz(mode)


class UnionDictionary(nn.Module):
    """VARS-SD: calling it binds both parts to the same input and concatenates their atoms."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, source: torch.Tensor, num_prefix_tokens: int | None = None) -> UnionOperator:
        return UnionOperator(self.a(source, num_prefix_tokens), self.b(source, num_prefix_tokens))

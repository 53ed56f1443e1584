"""VARS-D: a dynamic dictionary of positive random features of the queries.

phi(u) = exp(w^T u - |u|^2 / 2) / sqrt(m) on L2-normalized u, with a fixed Gaussian projection
w per head (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021): the kernel
phi(q)^T phi(k) is an unbiased estimate of exp(q^T k). Each random feature is one atom, a
template over the N tokens, L2-normalized over the tokens as in the VARS code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .dense import DenseOperator

__all__ = ["PerformerDictionary", "performer_features"]


def performer_features(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(Q): q (*, H, N, d) with projection (H, m, d) -> (*, H, N, m), unnormalized atoms."""
    u = nn.functional.normalize(q, dim=-1)
    m = projection.shape[-2]
    logits = torch.einsum("...hnd,hmd->...hnm", u, projection.to(u.dtype))
    return torch.exp(logits - 0.5 * u.pow(2).sum(-1, keepdim=True)) / math.sqrt(m)


class PerformerDictionary(nn.Module):
    """Atoms phi(Q) built from the queries Q (B, H, N, head_dim) the module is called on.

    Args:
        head_dim: channels of each query.
        num_features: m, the number of atoms; default ``2 * head_dim`` (the VARS code's choice).
        num_heads: one fixed projection per head.
        orthogonal: draw each head's projection with orthogonal rows (blocks of head_dim),
            rescaled to Gaussian norms, which lowers the estimator's variance.
        normalize_atoms: L2-normalize each atom over the tokens.
        seed: the projection is a buffer drawn from this seed, so checkpoints are reproducible.
    """

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        num_heads: int = 1,
        orthogonal: bool = False,
        normalize_atoms: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        num_features = 2 * head_dim if num_features is None else num_features
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.head_dim, self.num_features, self.num_heads = head_dim, num_features, num_heads
        self.orthogonal, self.normalize_atoms = orthogonal, normalize_atoms
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", self._draw(gen))

    @property
    def num_atoms(self) -> int:
        return self.num_features

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        h, m, d = self.num_heads, self.num_features, self.head_dim
        w = torch.randn(h, m, d, generator=gen)
        if not self.orthogonal:
            return w
        blocks = []
        for start in range(0, m, d):
            g = torch.randn(h, d, d, generator=gen)
            qmat, _ = torch.linalg.qr(g)
            blocks.append(qmat.transpose(-1, -2)[:, : min(d, m - start)])
        rows = torch.cat(blocks, dim=1)
        return rows * w.norm(dim=-1, keepdim=True)

    def atoms(self, q: torch.Tensor) -> torch.Tensor:
        if q.dim() < 3 or q.shape[-1] != self.head_dim or q.shape[-3] not in (1, self.num_heads):
            raise ValueError(
                f"PerformerDictionary expects queries (..., H={self.num_heads}, N, head_dim={self.head_dim}), "
                f"got {tuple(q.shape)}"
            )
        d = performer_features(q, self.projection)
        if self.normalize_atoms:
            d = d / d.norm(dim=-2, keepdim=True).clamp_min(1e-6)
        return d

    def forward(self, q: torch.Tensor, num_prefix_tokens: int | None = None) -> DenseOperator:
        """Bind to queries (..., H, N, head_dim); prefix tokens are tokens like any other here."""
        return DenseOperator(self.atoms(q))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, num_heads={self.num_heads}"

"""Performer linear attention (FAVOR+), the paper's "DeiT*" baseline, as a timm attention layer.

Softmax attention softmax(Q K^T / sqrt(d)) V is approximated with positive random features
(Choromanski et al., "Rethinking Attention with Performers", ICLR 2021):

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),     x' = x / d^{1/4},    W (m x d) Gaussian
    out    = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1))

which costs O(N m d) instead of O(N^2 d). The projection W is a fixed buffer per head (drawn from
a seed, so checkpoints reproduce); it is not redrawn during training.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from timm.layers import register_notrace_module
from torch import nn

__all__ = ["PerformerAttention"]


# a leaf for timm's fx feature extraction: tracing into forward would branch on a Proxy's attn_mask
@register_notrace_module
class PerformerAttention(nn.Module):
    """Linear attention with the constructor keywords and forward of timm's ``Attention``.

    ``attn_drop`` must be 0 (there is no attention matrix to drop). ``num_features`` is m
    (default 2 * head_dim, as for the VARS-D dictionary, so the two compare at equal width).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_features: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or give attn_head_dim")
            attn_head_dim = dim // num_heads
        if attn_drop:
            raise ValueError(f"attn_drop must be 0 for PerformerAttention (got {attn_drop}): no attention matrix")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        num_features = 2 * attn_head_dim if num_features is None else num_features
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_heads, self.head_dim = num_heads, attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.num_features = num_features
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(num_heads, num_features, attn_head_dim, generator=gen)
        self.register_buffer("projection", w.to(**dd))

    def _features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        x = x * self.head_dim ** -0.25
        logits = torch.einsum("bhnd,hmd->bhnm", x, self.projection.to(x.dtype))
        logits = logits - 0.5 * x.pow(2).sum(-1, keepdim=True)
        # a constant per query row (or per head for keys) cancels in the normalized output; it
        # only keeps exp() in range
        dims = [-1] if is_query else [-2, -1]
        logits = logits - logits.detach().amax(dim=dims, keepdim=True)
        return torch.exp(logits) / math.sqrt(self.num_features)

    def _qkv(self, x: torch.Tensor):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized linear-attention matrix (B, H, N, N): rows phi(q_i)^T phi(k_j) / sum_j (same)."""
        q, k, _ = self._qkv(x)
        scores = self._features(q, True) @ self._features(k, False).transpose(-1, -2)
        return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("PerformerAttention does not support attn_mask or is_causal")
        if x.dim() != 3:
            raise ValueError(f"PerformerAttention expects x of shape (B, N, C), got {x.shape}")
        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        fq, fk = self._features(q, True), self._features(k, False)
        kv = fk.transpose(-1, -2) @ v  # (B, H, m, d)
        denom = fq @ fk.sum(-2).unsqueeze(-1)  # (B, H, N, 1)
        # denom is 0 only where every phi(q_i)^T phi(k_j) underflowed, and then so is the numerator
        out = (fq @ kv) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_features={self.num_features}"

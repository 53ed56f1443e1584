"""convert_vit: swap the self-attention of a timm vision transformer for VARSAttention, in place."""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.layers import Attention
from torch import nn

from ..layers.vars_attention import VARSAttention

__all__ = ["convert_vit"]


def convert_vit(model: nn.Module, dictionary: str = "sd", **layer_config: Any) -> nn.Module:
    """Replace every ``timm.layers.Attention`` in ``model.blocks`` by :class:`VARSAttention`.

    The query, value and output projections are copied from timm's fused ``qkv`` and ``proj``
    (rows [0, A) of qkv are the queries, [2A, 3A) the values, A = heads * head_dim); the key rows
    are dropped, since VARS ties the key to the query ("s" has no queries: only the value rows
    are used). Query normalization, the output norm and the gate are kept as they are. The layers
    get the model's prefix-token count (class and register tokens), so a static dictionary knows
    where the grid starts.

    A static-only dictionary ("s") reconstructs each prefix token from its own identity atom, so
    it is refused for a model that classifies from its class token (``global_pool='token'``).

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, with class and/or register tokens).
        dictionary: "sd", "s" or "d".
        layer_config: further :class:`VARSAttention` keywords (lam, solver, max_steps, tol,
            backward, lipschitz, num_kernels, ...).

    Returns:
        ``model``, converted in place.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"convert_vit needs a timm VisionTransformer with .blocks, got {type(model).__name__}")
    for key in ("num_prefix_tokens", "dim", "num_heads"):
        if key in layer_config:
            raise ValueError(f"convert_vit reads {key} from the model; do not pass it")
    num_prefix = getattr(model, "num_prefix_tokens", None)
    if dictionary == "s" and num_prefix and getattr(model, "global_pool", None) == "token":
        # the static dictionary gives each prefix token its own identity atom (block diagonal D):
        # a class token would be reconstructed from itself alone and never see the image
        raise ValueError(
            "dictionary 's' keeps prefix tokens apart from the grid, so a class-token classifier would never see "
            "the image; use 'sd' or 'd', or a model with global_pool='avg'"
        )
    found = 0
    for i, block in enumerate(blocks):
        old = getattr(block, "attn", None)
        if isinstance(old, VARSAttention):
            raise ValueError(f"block {i} already has VARSAttention; convert_vit expects timm self-attention")
        if type(old) is not Attention:
            raise ValueError(
                f"block {i} has attention {type(old).__name__}; convert_vit converts timm.layers.Attention only"
            )
        block.attn = _convert_attention(old, dictionary, num_prefix, layer_config)
        found += 1
    if not found:
        raise ValueError("the model has no blocks to convert")
    return model


def _convert_attention(old: Attention, dictionary: str, num_prefix: int | None, config: dict) -> VARSAttention:
    if old.attn_drop.p:
        raise ValueError(
            f"attention dropout {old.attn_drop.p} has no VARS counterpart; build the model with attn_drop_rate=0"
        )
    w = old.qkv.weight
    A = old.attn_dim
    gate = getattr(old, "gate", None)
    # without dynamic atoms ("s") there are no queries, so nothing for a query norm to act on
    qk_norm = not isinstance(old.q_norm, nn.Identity) and "d" in dictionary
    scale_norm = not isinstance(old.norm, nn.Identity)
    new = VARSAttention(
        old.qkv.in_features,
        num_heads=old.num_heads,
        attn_head_dim=old.head_dim,
        dim_out=old.proj.out_features,
        qkv_bias=old.qkv.bias is not None,
        qk_norm=qk_norm,
        scale_norm=scale_norm,
        proj_bias=old.proj.bias is not None,
        gated=gate is not None,
        proj_drop=old.proj_drop.p,
        norm_layer=nn.LayerNorm if qk_norm or scale_norm else None,  # replaced by copies of the originals below
        device=w.device,
        dtype=w.dtype,
        dictionary=dictionary,
        num_prefix_tokens=num_prefix,
        **config,
    )
    with torch.no_grad():
        if new.q is not None:
            new.q.weight.copy_(w[:A])
            if old.qkv.bias is not None:
                new.q.bias.copy_(old.qkv.bias[:A])
        new.v.weight.copy_(w[2 * A:])
        if old.qkv.bias is not None:
            new.v.bias.copy_(old.qkv.bias[2 * A:])
        new.proj.load_state_dict(old.proj.state_dict())
        if gate is not None:
            new.gate.load_state_dict(gate.state_dict())
    if qk_norm:
        new.q_norm = copy.deepcopy(old.q_norm)
    if scale_norm:
        new.norm = copy.deepcopy(old.norm)
    return new.train(old.training)

"""Per-layer attention maps of VARS, self-attention and Performer vision transformers."""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from ..layers.vars_attention import VARSAttention
from .performer import PerformerAttention

__all__ = ["attention_maps"]


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Maps (B, layers, h, w) in [0, 1], one per attention layer, over the h x w token grid.

    The map of a layer, per image, is defined by its kind of attention:

    - VARS (:class:`~vars_deq.VARSAttention`): the norm of each grid token's reconstruction,
      m_j = ||(D z*)_j||_2 over all heads and channels, the convention of the authors' follow-up
      work (where the layer puts its reconstruction is where it attends).
    - self-attention (``timm.layers.Attention``): the class token's attention to each grid token,
      m_j = mean_heads softmax(q_cls K^T / sqrt(d))_j; without a class token, the attention each
      grid token receives averaged over all queries and heads.
    - Performer linear attention: the same with its normalized weights
      phi(q_i)^T phi(k_j) / sum_l phi(q_i)^T phi(k_l) in place of the softmax.

    Each map is then min-max normalized per image and layer, m <- (m - min m) / (max m - min m)
    (a constant map becomes 0), so maps of different layers and models compare on one scale.

    The model runs once in eval mode without gradients; hooks are removed and the training mode
    restored afterwards.

    Args:
        model: a timm ``VisionTransformer`` (with ``blocks`` and ``patch_embed``).
        images: (B, C, H, W).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (B, C, H, W), got {getattr(images, 'shape', type(images))}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or not len(blocks):
        raise ValueError(f"attention_maps needs a timm VisionTransformer with .blocks, got {type(model).__name__}")
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    has_class_token = getattr(model, "cls_token", None) is not None
    h, w = _grid(model, images)

    maps: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def store(i: int, token_scores: torch.Tensor) -> None:  # (B, N) -> grid
        grid = token_scores[:, num_prefix:]
        if grid.shape[1] != h * w:
            raise ValueError(
                f"layer {i} has {token_scores.shape[1]} tokens; with {num_prefix} prefix tokens that is not the "
                f"{h} x {w} grid of the patch embedding"
            )
        maps[i] = grid.reshape(-1, h, w).float()

    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if isinstance(attn, VARSAttention):
            handles.append(attn.vars.register_forward_hook(_vars_hook(i, store)))
        elif isinstance(attn, (Attention, PerformerAttention)):
            handles.append(attn.register_forward_hook(_weights_hook(i, store, has_class_token)))
        else:
            raise ValueError(
                f"block {i} has attention {type(attn).__name__}; attention_maps knows VARSAttention, "
                "timm.layers.Attention and PerformerAttention"
            )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = torch.stack(maps, dim=1)  # (B, L, h, w)
    lo = out.amin(dim=(-2, -1), keepdim=True)
    span = out.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (out - lo) / span.clamp_min(torch.finfo(out.dtype).tiny), torch.zeros_like(out))


def _grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise ValueError("attention_maps needs model.patch_embed to know the token grid")
    if getattr(model, "dynamic_img_size", False) and hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size(tuple(images.shape[-2:])))
    return tuple(embed.grid_size)


def _vars_hook(i, store):
    def hook(module, args, output):  # output: D z*, (B, H, N, head_dim)
        store(i, output.float().pow(2).sum(dim=(1, 3)).sqrt())

    return hook


def _weights_hook(i, store, has_class_token):
    def hook(module, args, output):
        x = args[0]
        if isinstance(module, PerformerAttention):
            weights = module.attention_weights(x)
        else:
            weights = _softmax_weights(module, x)
        weights = weights.float().mean(1)  # heads: (B, N, N)
        store(i, weights[:, 0] if has_class_token else weights.mean(1))

    return hook


def _softmax_weights(module: Attention, x: torch.Tensor) -> torch.Tensor:
    B, N, _ = x.shape
    q, k, _ = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    return ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

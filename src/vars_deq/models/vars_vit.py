"""VARS vision transformers registered with timm, their baselines, and a convolutional stem.

Every model is a timm ``VisionTransformer``; only the attention (and, with ``conv_stem=True``,
the patch embedding) differs. The VARS models follow the original code's settings (its RVT
skeletons have no class token and pool the average of the tokens):

- ``vars_d_*``: VARS-D (Performer atoms of the queries, lam 0.3, 5 ISTA steps, L = Gershgorin + 1);
- ``vars_sd_*``: VARS-SD with free learned static atoms over the model's token count;
- ``vars_s_*``: VARS-S per channel (one head per channel): 5 full-size circular kernels, lam 3.5,
  3 steps, the exact step bound;
- ``vars_{s,d,sd}_deit_{tiny,small}_patch16_224`` and ``performer_deit_{tiny,small}_patch16_224``
  (Performer linear attention, the paper's "DeiT*") use the convolutional patch stem the paper used
  for every starred model; the self-attention baseline is timm's own ``deit_{tiny,small}_patch16_224``;
- ``vars_{s,d,sd}_digits``, ``deit_digits``, ``performer_digits``: one small skeleton for the
  8 x 8 grayscale digits of scikit-learn (img_size 8, in_chans 1, 10 classes, patch 2 so a 4 x 4
  grid, width 64, depth 4, 4 heads, MLP ratio 2), practical on a CPU.

VARS keywords (every name in ``VARS_LAYER_KEYS``: lam, solver, max_steps, tol, backward, lipschitz,
static_atoms, num_kernels, ... and the flat backward options) given to ``timm.create_model`` reach
every VARS layer and override the variant's settings. No weights are downloaded: ``pretrained=True``
needs a local file, ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

import math
from typing import Any

from timm.layers import PatchEmbed, register_notrace_module, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..layers.vars_attention import LAYER_OPTIONS, VARSAttention
from .convert import convert_vit
from .performer import PerformerAttention

__all__ = ["ConvStemPatchEmbed", "VARS_LAYER_KEYS"]

#: create_model keywords that configure the VARS layers rather than the VisionTransformer: every
#: layer option except those the model fixes (the dictionary, by name; the prefix count, by its tokens)
VARS_LAYER_KEYS = frozenset(LAYER_OPTIONS) - {"dictionary", "num_prefix_tokens"}

# a leaf for timm's fx feature extraction (create_feature_extractor, features_only with feature_cls='fx'):
# the solver's loop and its argument checks cannot be traced symbolically
register_notrace_module(VARSAttention)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# vars_deq.data feeds digits in pixel space [0, 1], unnormalized (corruption and PGD budgets are
# defined there), so the identity is the honest normalization to advertise
DIGITS_MEAN, DIGITS_STD = (0.0,), (1.0,)

DEIT_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
DEIT_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
# patch 2 (a 4 x 4 grid, 17 tokens): an epoch of 1,437 images at batch 64 takes seconds on a CPU
DIGITS = dict(img_size=8, in_chans=1, num_classes=10, patch_size=2, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
# conv templates on digits (static_atoms="conv"): 3 x 3, since a 5 x 5 one would wrap around the 4 x 4 torus
DIGITS_STATIC = dict(kernel_size=3)
# the original VARS models (RVT skeletons) have no class token and pool the average of the tokens
NO_CLASS_TOKEN = dict(class_token=False, global_pool="avg")


class ConvStemPatchEmbed(PatchEmbed):
    """Patch embedding by early convolutions (Xiao et al., "Early Convolutions Help Transformers
    See Better", NeurIPS 2021), the stem the VARS paper used.

    log2(patch_size) stride-2 3 x 3 convolutions with batch norm and ReLU, widths doubling up to
    ``embed_dim`` (for patch 1, one stride-1 3 x 3 convolution), then a 1 x 1 projection. The
    output grid is the same as the patchify stem's, so everything downstream is unchanged.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, device=None, dtype=None,
                 **kwargs: Any):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                         device=device, dtype=dtype, **kwargs)
        ph, pw = self.patch_size
        if ph != pw or ph & (ph - 1):
            raise ValueError(f"conv_stem needs a square power-of-two patch_size, got {self.patch_size}")
        dd = {"device": device, "dtype": dtype}
        num_down = int(math.log2(ph))
        layers: list[nn.Module] = []
        cin = in_chans
        for i in range(max(num_down, 1)):
            cout = max(embed_dim >> (max(num_down, 1) - i), 8)
            stride = 2 if i < num_down else 1
            layers += [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False, **dd), nn.BatchNorm2d(cout, **dd), nn.ReLU(inplace=True)
            ]
            cin = cout
        layers.append(nn.Conv2d(cin, embed_dim, 1, bias=bias, **dd))
        self.proj = nn.Sequential(*layers)

    def set_input_size(self, img_size=None, patch_size=None):
        if patch_size is not None and tuple(to_2tuple(patch_size)) != self.patch_size:
            raise ValueError("the conv stem's patch size is fixed by its strides; it cannot be resampled")
        super().set_input_size(img_size=img_size)


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


def _digits_cfg() -> dict:
    return _cfg(num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, interpolation="nearest", mean=DIGITS_MEAN,
                std=DIGITS_STD)


_KINDS = ("s", "d", "sd")
default_cfgs = generate_default_cfgs({
    # the starred models' convolutional stem: its first convolution is patch_embed.proj.0
    **{f"vars_{k}_deit_{size}_patch16_224": _cfg(first_conv="patch_embed.proj.0") for k in _KINDS
       for size in ("tiny", "small")},
    **{f"performer_deit_{size}_patch16_224": _cfg(first_conv="patch_embed.proj.0") for size in ("tiny", "small")},
    **{f"vars_{k}_digits": _digits_cfg() for k in _KINDS},
    "deit_digits": _digits_cfg(),
    "performer_digits": _digits_cfg(),
})


def _per_channel(skeleton: dict) -> dict:
    """VARS-S codes every channel on its own (the original's groups = dim): one head per channel."""
    return {**skeleton, **NO_CLASS_TOKEN, "num_heads": skeleton["embed_dim"]}


def _grid_tokens(model: VisionTransformer) -> int:
    return int(math.prod(model.patch_embed.grid_size))


def _sd_defaults(model: VisionTransformer, config: dict) -> dict:
    """The original VARS-SD: free static atoms over the model's token count (unless conv atoms are asked for)."""
    if config.get("static_atoms", "free") != "free":
        return DIGITS_STATIC if model.patch_embed.grid_size == (4, 4) else {}
    return {"static_atoms": "free", "num_tokens": _grid_tokens(model) + model.num_prefix_tokens}


def _s_defaults(model: VisionTransformer, config: dict, lam: float = 3.5) -> dict:
    """The original VARS-S: per channel (the skeleton has one head per channel), 5 full-size
    circular kernels through the FFT, lam 3.5, 3 steps, the exact step bound."""
    side = model.patch_embed.grid_size[0]
    return dict(num_kernels=5, kernel_size=side, lam=lam, max_steps=3, lipschitz="exact", static_impl="fft")


def _s_digits_defaults(model: VisionTransformer, config: dict) -> dict:
    """VARS-S on digits: the original's settings but lam 0.3 (the O(1) signals of this small model
    would leave every code zero at lam 3.5, so the layer would learn nothing)."""
    return _s_defaults(model, config, lam=0.3)


def _no_pre_norm(model: VisionTransformer) -> None:
    """The original VARS-S block feeds the attention the un-normalized tokens (no norm1)."""
    for block in model.blocks:
        block.norm1 = nn.Identity()


def _build(variant: str, pretrained: bool, model_args: dict, kwargs: dict, dictionary: str | None = None,
           attn_layer: type[nn.Module] | None = None, layer_defaults=None,
           conv_stem: bool = False) -> VisionTransformer:
    """Build the skeleton and swap in the attention inside timm's builder, so that its weight loading
    (VARS checkpoints fit) and ``features_only`` wrapping both see the final model.

    ``layer_defaults(model, config) -> dict``: the variant's layer settings, given the built
    skeleton and the user's layer config (which overrides them)."""
    kwargs = dict(kwargs)
    layer_config = {k: kwargs.pop(k) for k in list(kwargs) if k in VARS_LAYER_KEYS}
    if dictionary is None and (layer_config or "dictionary" in kwargs):
        given = sorted(set(layer_config) | ({"dictionary"} & set(kwargs)))
        raise ValueError(f"{variant} has no VARS layers to apply {given} to")
    if "dictionary" in kwargs:
        raise ValueError(f"{variant} fixes the dictionary in its name; pick vars_s_/vars_d_/vars_sd_ instead")
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.file or cfg.state_dict):
            raise ValueError(
                f"{variant} has no published weights; pass pretrained_cfg_overlay=dict(file='checkpoint.pth')"
            )
    if kwargs.pop("conv_stem", conv_stem):
        kwargs["embed_layer"] = ConvStemPatchEmbed
    if attn_layer is not None:
        kwargs["attn_layer"] = attn_layer
    out_indices = kwargs.pop("out_indices", 3)
    def vision_transformer(**model_kwargs: Any) -> VisionTransformer:
        model = VisionTransformer(**model_kwargs)
        if dictionary is None:
            return model
        defaults = layer_defaults(model, layer_config) if layer_defaults is not None else {}
        convert_vit(model, dictionary, **{**defaults, **layer_config})
        if dictionary == "s":
            _no_pre_norm(model)
        return model

    return build_model_with_cfg(
        vision_transformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **{**model_args, **kwargs},
    )


# -- DeiT skeletons --------------------------------------------------------------------------


@register_model
def vars_s_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny with VARS-S attention (static conv templates)."""
    return _build("vars_s_deit_tiny_patch16_224", pretrained, _per_channel(DEIT_TINY), kwargs, dictionary="s",
                  layer_defaults=_s_defaults, conv_stem=True)


@register_model
def vars_d_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny with VARS-D attention (dynamic Performer atoms of the queries)."""
    return _build("vars_d_deit_tiny_patch16_224", pretrained, {**DEIT_TINY, **NO_CLASS_TOKEN}, kwargs, dictionary="d",
                  conv_stem=True)


@register_model
def vars_sd_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny with VARS-SD attention (static and dynamic atoms)."""
    return _build("vars_sd_deit_tiny_patch16_224", pretrained, {**DEIT_TINY, **NO_CLASS_TOKEN}, kwargs,
                  dictionary="sd", layer_defaults=_sd_defaults, conv_stem=True)


@register_model
def vars_s_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small with VARS-S attention."""
    return _build("vars_s_deit_small_patch16_224", pretrained, _per_channel(DEIT_SMALL), kwargs, dictionary="s",
                  layer_defaults=_s_defaults, conv_stem=True)


@register_model
def vars_d_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small with VARS-D attention."""
    return _build("vars_d_deit_small_patch16_224", pretrained, {**DEIT_SMALL, **NO_CLASS_TOKEN}, kwargs, dictionary="d",
                  conv_stem=True)


@register_model
def vars_sd_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small with VARS-SD attention."""
    return _build("vars_sd_deit_small_patch16_224", pretrained, {**DEIT_SMALL, **NO_CLASS_TOKEN}, kwargs,
                  dictionary="sd", layer_defaults=_sd_defaults, conv_stem=True)


@register_model
def performer_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny with Performer linear attention (the paper's DeiT* baseline)."""
    return _build("performer_deit_tiny_patch16_224", pretrained, DEIT_TINY, kwargs, attn_layer=PerformerAttention,
                  conv_stem=True)


@register_model
def performer_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small with Performer linear attention."""
    return _build("performer_deit_small_patch16_224", pretrained, DEIT_SMALL, kwargs, attn_layer=PerformerAttention,
                  conv_stem=True)


# -- the digits skeleton ---------------------------------------------------------------------


@register_model
def vars_s_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """VARS-S on 8 x 8 digits."""
    return _build("vars_s_digits", pretrained, _per_channel(DIGITS), kwargs, dictionary="s",
                  layer_defaults=_s_digits_defaults)


@register_model
def vars_d_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """VARS-D on 8 x 8 digits."""
    return _build("vars_d_digits", pretrained, {**DIGITS, **NO_CLASS_TOKEN}, kwargs, dictionary="d")


@register_model
def vars_sd_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """VARS-SD on 8 x 8 digits."""
    return _build("vars_sd_digits", pretrained, {**DIGITS, **NO_CLASS_TOKEN}, kwargs, dictionary="sd",
                  layer_defaults=_sd_defaults)


@register_model
def deit_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Self-attention (timm's Attention) on the digits skeleton."""
    return _build("deit_digits", pretrained, DIGITS, kwargs)


@register_model
def performer_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Performer linear attention on the digits skeleton."""
    return _build("performer_digits", pretrained, DIGITS, kwargs, attn_layer=PerformerAttention)

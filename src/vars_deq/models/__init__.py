"""VARS vision transformers for timm: importing this package registers the models.

``timm.create_model("vars_sd_deit_tiny_patch16_224")`` and the other names of
:mod:`vars_deq.models.vars_vit`; :func:`convert_vit` converts an existing timm ViT;
:func:`attention_maps` compares VARS and self-attention models on the same footing.
"""

from . import vars_vit  # noqa: F401  (registers the models with timm)
from .convert import convert_vit
from .maps import attention_maps
from .performer import PerformerAttention
from .vars_vit import VARS_LAYER_KEYS, ConvStemPatchEmbed

__all__ = ["convert_vit", "attention_maps", "PerformerAttention", "ConvStemPatchEmbed", "VARS_LAYER_KEYS"]

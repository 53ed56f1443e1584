"""Layers: the DEQ sparse-reconstruction module and the timm attention drop-in."""

from .sparse_reconstruction import SparseReconstruction, configure_layers, layer_stats, original_forward
from .vars_attention import VARSAttention
from .warm_start import WarmStart

__all__ = ["SparseReconstruction", "configure_layers", "layer_stats", "original_forward", "VARSAttention", "WarmStart"]

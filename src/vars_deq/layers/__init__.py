"""Layers: the DEQ sparse-reconstruction module and the timm attention drop-in."""

from .sparse_reconstruction import SparseReconstruction, configure_layers, layer_stats

__all__ = ["SparseReconstruction", "configure_layers", "layer_stats"]

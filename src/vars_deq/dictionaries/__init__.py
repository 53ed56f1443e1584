"""Dictionaries: modules that bind a per-input linear operator D (decode D z, encode D^T x, bound L)."""

from .base import LIPSCHITZ_MODES, DictionaryOperator
from .conv import ConvDictionary, ConvOperator
from .dense import DenseDictionary, DenseOperator, FreeAtoms
from .performer import PerformerDictionary, performer_features
from .union import UnionDictionary, UnionOperator

__all__ = [
    "LIPSCHITZ_MODES",
    "DictionaryOperator",
    "DenseDictionary",
    "DenseOperator",
    "FreeAtoms",
    "ConvDictionary",
    "ConvOperator",
    "PerformerDictionary",
    "performer_features",
    "UnionDictionary",
    "UnionOperator",
]

"""Building timm models by name, with the VARS models registered and VARS layer options applied."""

from __future__ import annotations

import ast
from typing import Any, Iterable

import timm
from torch import nn

from .. import models as _models  # noqa: F401  (registers the VARS models with timm)
from ..layers import SparseReconstruction, configure_layers
from ..layers.sparse_reconstruction import RUNTIME_OPTIONS

__all__ = ["LAYER_OPTIONS", "create_model", "parse_model_kwargs", "apply_layer_options"]

#: the run-time VARS layer options a training config may set (declared by SparseReconstruction.configure)
LAYER_OPTIONS = RUNTIME_OPTIONS


def parse_model_kwargs(items: Iterable[str]) -> dict[str, Any]:
    """``["embed_dim=32", "qkv_bias=False", "act_layer=gelu"]`` -> keyword arguments.

    Values are Python literals where they parse as one (numbers, booleans, None, tuples),
    otherwise strings.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs entries must look like key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def create_model(name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **model_kwargs)`` with clear errors."""
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; list the available ones with timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False, **(model_kwargs or {}))
    except TypeError as e:
        raise ValueError(f"bad --model-kwargs {model_kwargs} for model {name!r}: {e}") from e


def apply_layer_options(model: nn.Module, name: str, options: dict[str, Any]) -> int:
    """Configure every VARS layer of ``model`` with ``options``; returns how many layers there are.

    Options given for a model without VARS layers are an error, never silently ignored.
    """
    unknown = set(options) - set(LAYER_OPTIONS)
    if unknown:
        raise ValueError(f"unknown VARS layer option(s) {sorted(unknown)}; valid: {list(LAYER_OPTIONS)}")
    if options and not any(isinstance(m, SparseReconstruction) for m in model.modules()):
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise ValueError(f"model {name!r} has no VARS (SparseReconstruction) layers, so {flags} cannot apply to it")
    return configure_layers(model, **options)

"""Training checkpoints: atomic writes, validated reads, RNG state capture."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "default_checkpoint",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "check_same_model",
    "load_model_weights",
    "model_from_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "vars_deq.train.checkpoint/1"
_REQUIRED = ("format", "model_name", "model_kwargs", "model", "epoch", "step_in_epoch", "global_step", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is not a vars-deq checkpoint, or belongs to another model."""


def default_checkpoint() -> Path:
    """The VARS-SD digits checkpoint shipped with the package (its recipe lies beside it)."""
    return Path(str(resources.files("vars_deq") / "assets" / "vars_sd_digits.pt"))


def _atomic_replace(path: Path, write) -> None:
    # the temporary file lives in the target's directory so os.replace is a same-filesystem rename:
    # a reader (or a crash) sees either the old file or the complete new one, never a partial one
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    _atomic_replace(Path(path), lambda f: f.write(data))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temporary file in the same directory, then os.replace)."""
    _atomic_replace(Path(path), lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (on the CPU).

    Loading uses ``weights_only=True``: a checkpoint holds tensors and plain Python values only,
    so a tampered file cannot run code. A file that is not such a checkpoint is a one-line
    CheckpointError that names the path and what is wrong with it (torch's own message, which
    advises unsafe loading, is never passed on).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is a directory, not a checkpoint file")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle; all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {str(p)!r} is not a readable vars_deq checkpoint (corrupt or unreadable: {_why_unreadable(p, e)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a vars-deq training checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: missing {missing}")
    return ckpt


def _why_unreadable(path: Path, error: Exception) -> str:
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        zip_header = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not zip_header:
        return "not a torch.save archive"
    if zipfile.is_zipfile(path) and isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain values, which are not loaded"
    return "a damaged torch.save archive"


def check_same_model(ckpt: dict[str, Any], name: str, model_kwargs: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint trained for another model name or other model keyword arguments."""
    if ckpt["model_name"] != name or dict(ckpt["model_kwargs"]) != dict(model_kwargs):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from model {ckpt['model_name']!r} with kwargs {dict(ckpt['model_kwargs'])}, "
            f"not {name!r} with kwargs {dict(model_kwargs)}"
        )


def load_model_weights(model: nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Load the checkpoint's weights strictly; a mismatch is a CheckpointError naming the keys."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit model {ckpt['model_name']!r}: {first}") from e


def model_from_checkpoint(
    path: str | os.PathLike,
    layer_overrides: dict[str, Any] | None = None,
    expect_model: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint, with its training's VARS options re-applied.

    Solver/backward options are module attributes, not weights, so they come from the
    checkpoint's config; ``layer_overrides`` then change any of them.
    """
    from .factory import apply_layer_options, create_model

    ckpt = load_checkpoint(path)
    if expect_model is not None and expect_model != ckpt["model_name"]:
        raise CheckpointError(f"checkpoint {str(path)!r} is from model {ckpt['model_name']!r}, not {expect_model!r}")
    model = create_model(ckpt["model_name"], dict(ckpt["model_kwargs"]))
    load_model_weights(model, ckpt, path)
    options = {**dict(ckpt["config"].get("layer_options") or {}), **(layer_overrides or {})}
    apply_layer_options(model, ckpt["model_name"], options)
    return model, ckpt


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    # random.setstate needs tuples; a serializer may hand back lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x

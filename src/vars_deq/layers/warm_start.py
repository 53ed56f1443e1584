"""Warm starts across epochs: each sample's equilibria of its previous forward start its next one.

A layer that solves to a tolerance (``tol`` set: the DEQ presets) aims at an equilibrium that does
not depend on where its solver started, so the codes a training sample reached at its last visit
are a valid start for its next: between epochs the weights move a little and the new equilibrium
lies near the old one. It reaches that equilibrium only to its tolerance, and a relative residual
is a loose measure of distance on ill-conditioned lasso problems: on the digits VARS-SD layers a
FISTA solve to 1e-3 stops 31-40% (median, codes) from the fixed point, 5-10% at 1e-4. So warm and
cold starts give different codes, and a warm-started run's model is not quite the cold one (README,
implicit training). Measured on the digits VARS-SD DEQ (FISTA to 1e-3): after one epoch at lr
1e-4 the next solve takes 6-11 steps instead of 50-53, at lr 1e-3 30-43 (README, implicit training).
At the DEQ preset (FISTA to 1e-2), over five seeds of 45 epochs, warm-started training brought the
forward from 18 steps a layer to 1 but reached 97.2 / 96.9% mean best / final test accuracy against
97.6 / 97.2% cold, the thresholds on three seeds of five against all five: the trainer starts cold
unless asked (``--warm-start``).
A fixed-step layer (``tol=None``, the original's 5 ISTA steps) is never warm-started: its output
is a function of its start, and changing the start would change the model.

    cache = vd.WarmStart(model, num_samples=len(train_set))
    for x, y, ids in batches:              # ids: each sample's index in the training set
        with cache.use(ids):
            loss = criterion(model(x), y)

The cache is the caller's state, not the model's (the forward writes no module state): the
trainer keeps one per run and saves it in its checkpoints, so a resumed run continues exactly.
Outside ``use`` (evaluation, attacks) every forward starts cold from the layer's ``init``.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["WarmStart", "WARM_START_MAX_BYTES"]

#: the most memory a cache holds by default (one float32 code tensor per sample and VARS layer)
WARM_START_MAX_BYTES = 2**30

_ACTIVE: contextvars.ContextVar[tuple["WarmStart", torch.Tensor] | None] = contextvars.ContextVar(
    "vars_deq_warm_start", default=None)


class WarmStart:
    """Per-sample codes of the VARS layers of ``model`` that converge to a tolerance.

    Args:
        model: the module whose SparseReconstruction layers it serves (named by their module path,
            so a cache saved with :meth:`state_dict` loads into a fresh copy of the model).
        num_samples: samples of the training set; ``use`` takes indices in [0, num_samples).
        max_bytes: memory cap; a layer whose codes would exceed it is not cached (a warning says so).
    """

    def __init__(self, model: nn.Module, num_samples: int, max_bytes: int = WARM_START_MAX_BYTES):
        from .sparse_reconstruction import SparseReconstruction

        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.names = {id(m): name for name, m in model.named_modules() if isinstance(m, SparseReconstruction)}
        if not self.names:
            raise ValueError(f"the model ({type(model).__name__}) has no VARS (SparseReconstruction) layers to warm-start")
        self.num_samples, self.max_bytes = num_samples, max_bytes
        self.codes: dict[str, torch.Tensor] = {}   # layer name -> (num_samples, *per-sample code shape)
        self.filled: dict[str, torch.Tensor] = {}  # layer name -> (num_samples,) bool
        self.skipped: set[str] = set()
        #: samples started warm / all samples solved, over the forwards since the last reset_counts
        self.warm, self.total = 0, 0

    @contextlib.contextmanager
    def use(self, sample_ids: torch.Tensor | list[int]) -> Iterator[None]:
        """Forwards inside read and write the codes of these samples (one id per batch row)."""
        ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise ValueError(f"sample ids must lie in [0, {self.num_samples}), got {int(ids.min())}..{int(ids.max())}")
        token = _ACTIVE.set((self, ids))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def start(self, layer: nn.Module, default: torch.Tensor) -> torch.Tensor:
        """The starting codes of ``layer``: ``default`` (B, ...) with the cached rows put in."""
        _, ids = self._check(layer, default)
        name = self.names[id(layer)]
        self.total += ids.numel()
        if name not in self.filled:
            return default
        hit = self.filled[name][ids]
        n = int(hit.sum())
        self.warm += n
        if n == 0:
            return default
        cached = self.codes[name][ids].to(device=default.device, dtype=default.dtype)
        return torch.where(hit.to(default.device).reshape(-1, *([1] * (default.dim() - 1))), cached, default)

    def keep(self, layer: nn.Module, codes: torch.Tensor) -> None:
        """Store ``layer``'s equilibrium codes (B, ...) of the samples in ``use``."""
        _, ids = self._check(layer, codes)
        name = self.names[id(layer)]
        if name in self.skipped:
            return
        if name not in self.codes:
            shape = (self.num_samples, *codes.shape[1:])
            nbytes = 4 * self.num_samples * codes[0].numel()
            if nbytes + self.nbytes > self.max_bytes:
                self.skipped.add(name)
                warnings.warn(f"warm start: the codes of layer {name!r} ({nbytes / 2**20:.0f} MiB) would exceed "
                              f"max_bytes={self.max_bytes}; that layer starts cold", stacklevel=3)
                return
            self.codes[name] = torch.zeros(shape, dtype=torch.float32)
            self.filled[name] = torch.zeros(self.num_samples, dtype=torch.bool)
        self.codes[name][ids] = codes.detach().to("cpu", torch.float32)
        self.filled[name][ids] = True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.codes.values())

    def reset_counts(self) -> None:
        self.warm, self.total = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "codes": dict(self.codes), "filled": dict(self.filled),
                "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"the saved cache holds {state['num_samples']} samples, this one {self.num_samples}")
        unknown = set(state["codes"]) - set(self.names.values())
        if unknown:
            raise ValueError(f"the saved cache names layers this model does not have: {sorted(unknown)}")
        self.codes = {k: v.clone() for k, v in state["codes"].items()}
        self.filled = {k: v.clone() for k, v in state["filled"].items()}
        self.skipped = set(state["skipped"])

    def _check(self, layer: nn.Module, t: torch.Tensor) -> tuple["WarmStart", torch.Tensor]:
        active = _ACTIVE.get()
        assert active is not None and active[0] is self, "start/keep are called by layers inside use()"
        ids = active[1]
        if id(layer) not in self.names:
            raise ValueError(f"layer {type(layer).__name__} is not one of the model's VARS layers this cache serves")
        if t.shape[0] != ids.numel():
            raise ValueError(f"the layer's codes have {t.shape[0]} samples in their first dim but use() was given "
                             f"{ids.numel()} sample ids")
        return active


def active_warm_start() -> WarmStart | None:
    """The cache of the enclosing :meth:`WarmStart.use`, if any (the layers call this)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]

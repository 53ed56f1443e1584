"""Proximal maps of the lasso penalty.

``soft_threshold`` is the prox of ``t * ||.||_1``; ``nonneg_threshold`` the prox of
``t * ||.||_1 + indicator(. >= 0)``. Both take a threshold that broadcasts against ``u``.
"""

from __future__ import annotations

import torch

__all__ = ["soft_threshold", "nonneg_threshold", "threshold"]


def soft_threshold(u: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """S_t(u) = sign(u) * max(|u| - t, 0), computed as u - clamp(u, -t, t).

    The two forms are equal bit for bit (u - t and -(|u| - t) round alike, and u - u = 0), and
    the clamp form reads and writes the codes twice instead of five times: the threshold runs
    once per solver step, where such elementwise passes cost as much as the Gram product on
    VARS-sized problems (tests/test_fast_paths.py checks both the values and the gradients)."""
    return u - u.clamp(-t, t)


def nonneg_threshold(u: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """max(u - t, 0): the prox of the l1 norm restricted to the nonnegative orthant."""
    return torch.relu(u - t)


def threshold(u: torch.Tensor, t: torch.Tensor | float, nonneg: bool) -> torch.Tensor:
    return nonneg_threshold(u, t) if nonneg else soft_threshold(u, t)


def active_mask(u: torch.Tensor, t: torch.Tensor | float, nonneg: bool) -> torch.Tensor:
    """Entries whose pre-threshold value clears the threshold (where the prox has slope 1)."""
    return (u > t) if nonneg else (u.abs() > t)

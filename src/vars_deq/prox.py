"""Proximal maps of the lasso penalty.

``soft_threshold`` is the prox of ``t * ||.||_1``; ``nonneg_threshold`` the prox of
``t * ||.||_1 + indicator(. >= 0)``. Both take a threshold that broadcasts against ``u``.
"""

from __future__ import annotations

import torch

__all__ = ["soft_threshold", "nonneg_threshold", "threshold"]


def soft_threshold(u: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """S_t(u) = sign(u) * max(|u| - t, 0).

    Where autograd records, the textbook form (its backward is a few cheap masks); elsewhere, in
    the solvers' no-grad loops, u - clamp(u, -t, t) (for a tensor t >= 0 as u - max(min(u, t), -t)):
    equal bit for bit (u - t and -(|u| - t) round alike, and u - u = 0), reading and writing the
    codes two or three times instead of five, which matters where an elementwise pass costs as
    much as the Gram product (VARS-sized problems).
    tests/test_fast_paths.py checks the two forms' values and gradients against each other."""
    if torch.is_grad_enabled() and (u.requires_grad or (isinstance(t, torch.Tensor) and t.requires_grad)):
        return _soft_threshold_textbook(u, t)
    return _soft_threshold_clamp(u, t)


def _soft_threshold_textbook(u: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(u) * torch.relu(u.abs() - t)


def _soft_threshold_clamp(u: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        return u - u.clamp(-t, t)
    # clamp with tensor bounds takes an unvectorized broadcasting loop on CPU: 3-4x the time of
    # minimum, maximum and the subtraction together for a per-problem t (P, 1, 1) (VARS codes)
    if torch.is_grad_enabled() and (u.requires_grad or t.requires_grad):
        return u - torch.maximum(torch.minimum(u, t), -t)
    inner = torch.minimum(u, t)
    torch.maximum(inner, -t, out=inner)
    return torch.sub(u, inner, out=inner)


def nonneg_threshold(u: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """max(u - t, 0): the prox of the l1 norm restricted to the nonnegative orthant."""
    return torch.relu(u - t)


def threshold(u: torch.Tensor, t: torch.Tensor | float, nonneg: bool) -> torch.Tensor:
    return nonneg_threshold(u, t) if nonneg else soft_threshold(u, t)


def active_mask(u: torch.Tensor, t: torch.Tensor | float, nonneg: bool) -> torch.Tensor:
    """Entries whose pre-threshold value clears the threshold (where the prox has slope 1)."""
    return (u > t) if nonneg else (u.abs() > t)

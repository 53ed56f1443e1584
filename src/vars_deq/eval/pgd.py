"""Projected gradient descent (L-infinity), Madry et al., ICLR 2018."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["pgd_attack"]


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-inf PGD on images in [0, 1]: maximize the cross-entropy within the eps-ball.

        x_0     = x + U(-eps, eps)                      (random start)
        x_{k+1} = P( x_k + alpha * sign(grad_x CE(f(x_k), y)) )
        P       = projection onto {x' : |x' - x|_inf <= eps} intersected with [0, 1]^n

    The gradient is plain autograd through ``model``, so with VARS layers it is whatever
    backward they are configured with (implicit, unrolled or phantom). Only the input gets a
    gradient; the parameters' ``.grad`` are left untouched.

    Args:
        eps: radius of the L-inf ball, in pixel units of [0, 1] images (>= 0).
        steps: number of signed-gradient steps (>= 0; 0 with random_start is random noise).
        step_size: alpha; default 2.5 * eps / steps (Madry et al.'s choice).
        generator: a CPU generator for the random start, for reproducible attacks.
    Returns:
        The adversarial images, detached, with |x_adv - x|_inf <= eps and values in [0, 1].
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if step_size is None:
        step_size = 2.5 * eps / steps if steps else 0.0
    if not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    x = x.detach()
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        x_adv = torch.max(torch.min(x + eps * (2 * noise - 1), hi), lo)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.max(torch.min(x_adv.detach() + step_size * grad.sign(), hi), lo)
    return x_adv.detach()

"""Projected gradient descent (L-infinity), Madry et al., ICLR 2018."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["pgd_attack", "pgd_robust_counts"]


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
    x_adv = x.detach()
    for _, x_adv in _iterates(model, x, y, eps, steps, step_size, random_start, generator):
        pass
    return x_adv


def _iterates(model, x, y, eps, steps, step_size, random_start, generator):
    """(step, x_k) for k = 0 (the start) .. steps of signed-gradient ascent projected on the ball."""
    x = x.detach()
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        x_adv = torch.max(torch.min(x + eps * (2 * noise - 1), hi), lo)
    yield 0, x_adv
    for step in range(1, steps + 1):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.max(torch.min(x_adv.detach() + step_size * grad.sign(), hi), lo)
        yield step, x_adv.detach()


def pgd_robust_counts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    *,
    sources: dict[str, nn.Module] | None = None,
    restarts: int = 1,
    step_size: float | None = None,
    checkpoints: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Examples of ``(x, y)`` that ``model`` still classifies correctly under PGD, against steps.

    A strong evaluation of a model whose gradient may be masked (an iterative layer): each source
    in ``sources`` (name -> a module with ``model``'s weights and another backward, e.g. the VARS
    layers unrolled or implicit) supplies the gradients of its own attacks, ``restarts`` random
    starts each, and every iterate at a step in ``checkpoints`` is judged by ``model`` itself. An
    example counts as robust at step k when ``model`` is right on every judged iterate up to k of
    every attack; per source the same with that source's attacks only.

    Returns:
        {"checkpoints": [k...], "robust": {k: count}, "per_source": {name: {k: count}},
         "num_examples": B} with counts of robust examples.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    sources = {"autograd": model} if sources is None else dict(sources)
    if not sources:
        raise ValueError("sources must name at least one gradient source")
    checks = sorted(set(range(steps + 1) if checkpoints is None else checkpoints) | {steps})
    if checks[0] < 0 or checks[-1] > steps:
        raise ValueError(f"checkpoints must lie in [0, steps={steps}], got {list(checkpoints or [])}")
    if step_size is None:
        step_size = 2.5 * eps / steps if steps else 0.0
    x, model = x.detach(), model.eval()
    fooled = {name: torch.zeros(len(checks), x.shape[0], dtype=torch.bool, device=x.device) for name in sources}
    for name, source in sources.items():
        source.eval()
        for _ in range(restarts):
            for step, x_adv in _iterates(source, x, y, eps, steps, step_size, True, generator):
                if step in checks:
                    with torch.no_grad():
                        fooled[name][checks.index(step)] |= model(x_adv).argmax(-1) != y

    def robust(flags: torch.Tensor) -> dict[int, int]:  # fooled at any judged iterate up to k
        return {k: int((~flags[: i + 1].any(0)).sum()) for i, k in enumerate(checks)}

    return {"checkpoints": checks, "num_examples": x.shape[0],
            "robust": robust(torch.stack(list(fooled.values())).any(0)),
            "per_source": {name: robust(flags) for name, flags in fooled.items()}}

"""Training curves as a PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

from torch import nn

from .checkpoint import atomic_write_bytes

__all__ = ["describe_layers", "plot_curves"]


def describe_layers(model: nn.Module) -> str:
    """What the VARS layers of ``model`` run, for a plot title; "" when it has none.

    E.g. ``"backward implicit (adjoint direct), forward fista to tol 0.001 in <= 100 steps"``.
    Layers configured differently are listed each once, joined by "; ".
    """
    from ..layers import SparseReconstruction

    seen: list[str] = []
    for m in model.modules():
        if isinstance(m, SparseReconstruction):
            text = f"backward {_backward_text(m.backward)}, forward {_forward_text(m.solver, m.tol, m.max_steps)}"
            if text not in seen:
                seen.append(text)
    return "; ".join(seen)


def _backward_text(backward: Any) -> str:
    name = getattr(backward, "name", type(backward).__name__)
    if name == "implicit":
        return f"implicit (adjoint {backward.adjoint})"
    if name == "phantom":
        return f"phantom (k={backward.steps}, tau={backward.tau:g})"
    return str(name)


def _forward_text(solver: Any, tol: float | None, max_steps: int) -> str:
    name = solver if isinstance(solver, str) else type(solver).__name__
    return f"{name} {max_steps} steps" if tol is None else f"{name} to tol {tol:g} in <= {max_steps} steps"


def _per_layer(history: Sequence[dict[str, Any]], key: str) -> list[list[float | None]] | None:
    """The series of ``key`` per layer: metrics hold a number (the mean over layers) or a list per layer."""
    values = [h.get(key) for h in history]
    if all(v is None for v in values):
        return None
    width = max((len(v) for v in values if isinstance(v, (list, tuple))), default=0)
    if width == 0:
        return [[None if v is None else float(v) for v in values]]
    return [[float(v[i]) if isinstance(v, (list, tuple)) and i < len(v) and v[i] is not None else None
             for v in values] for i in range(width)]


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "", *,
                layers: str = "", num_classes: int | None = None) -> None:
    """Loss and accuracy per epoch, and the VARS forward's convergence where the metrics have it.

    Axes are fixed so that flat curves look flat: loss from 0, accuracy on [0, 1] with the chance
    level 1/num_classes drawn (when given), integer epoch ticks. The solver panels show the mean
    forward steps, the largest relative residual and the fraction of converged problems, per layer
    where the metrics have ``solver_{steps,residual,converged}_per_layer`` (the trainer writes
    them), else ``solver_steps`` and ``solver_converged`` (a number, the mean over layers, or a
    list with one value per layer). Epochs marked ``pretrain`` (the trainer's unrolled pretraining
    of an equilibrium model) are shaded on every panel.

    Args:
        history: the per-epoch records of metrics.jsonl (epoch, train/test loss and accuracy, ...).
        path: the PNG to write (atomically).
        title: the model name.
        layers: what the VARS layers ran (:func:`describe_layers`), shown under the title.
        num_classes: draws the chance line at 1/num_classes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    # per layer where the metrics have it (the trainer's), else the mean over layers
    steps = _per_layer(history, "solver_steps_per_layer") or _per_layer(history, "solver_steps")
    converged = _per_layer(history, "solver_converged_per_layer") or _per_layer(history, "solver_converged")
    residual = _per_layer(history, "solver_residual_per_layer")
    ncols = 2 + sum(series is not None for series in (steps, residual, converged))
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6), squeeze=False)
    axes = list(axes[0])
    for split, style in (("train", "-o"), ("test", "-s")):
        axes[0].plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        axes[1].plot(epochs, [h[f"{split}_acc"] for h in history], style, ms=3, label=split)
    top = max((h[f"{s}_loss"] for h in history for s in ("train", "test")), default=1.0)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss", ylim=(0, 1.05 * top if top > 0 else 1.0))
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    if num_classes:
        axes[1].axhline(1 / num_classes, color="grey", ls=":", lw=1, label=f"chance (1/{num_classes})")
    panel = 2
    for series, label, ylim in ((steps, "mean forward steps", (0, None)),
                                (residual, "largest residual", None),
                                (converged, "converged fraction", (0, 1.02))):
        if series is None:
            continue
        ax = axes[panel]
        panel += 1
        for i, ys in enumerate(series):
            ax.plot(epochs, ys, "-o", ms=3, label=f"layer {i}" if len(series) > 1 else "mean over layers")
        ax.set(xlabel="epoch", ylabel=label, title=f"VARS forward (train): {label}")
        if ylim is None:  # residuals span decades; a step's largest one, averaged over the epoch
            ax.set_yscale("log")
        else:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=7)
    pretrained = [e for e, h in zip(epochs, history) if h.get("pretrain")]
    for ax in axes:
        if pretrained:
            ax.axvspan(min(pretrained) - 0.5, max(pretrained) + 0.5, color="0.85", zorder=0,
                       label="unrolled pretraining" if ax is axes[1] else None)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    axes[0].legend()
    axes[1].legend(fontsize=8)
    heading = "\n".join(t for t in (title, layers) if t)
    if heading:
        fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

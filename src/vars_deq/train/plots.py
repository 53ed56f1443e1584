"""Training curves as a PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

from .checkpoint import atomic_write_bytes

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss, accuracy and mean solver steps per epoch; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    has_steps = any(h.get("solver_steps") is not None for h in history)
    ncols = 3 if has_steps else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4))
    for split, style in (("train", "-o"), ("test", "-s")):
        axes[0].plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        axes[1].plot(epochs, [100 * h[f"{split}_acc"] for h in history], style, ms=3, label=split)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if has_steps:
        axes[2].plot(epochs, [h.get("solver_steps") for h in history], "-o", ms=3)
        axes[2].set(xlabel="epoch", ylabel="mean solver steps", title="VARS layers (train)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

"""Figures of the command line (matplotlib, headless Agg backend, imported only when drawing).

- :func:`plot_convergence`: ``vars-deq compare``'s solver traces.
- :func:`plot_attention_maps`: ``vars-deq maps``' attention-map panels.

Training curves are :func:`vars_deq.train.plots.plot_curves`.
"""

from __future__ import annotations

import io
import itertools
import os
from typing import Any, Sequence

import torch

__all__ = ["plot_convergence", "plot_attention_maps"]

# line styles and markers cycle at different periods, so overlapping curves stay distinguishable
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "h", "<", ">")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    cycle = itertools.cycle(zip(itertools.cycle(_LINESTYLES), _MARKERS))
    return {n: {"linestyle": ls, "marker": m, "markersize": 4, "markevery": 0.12, "linewidth": 1.3}
            for n, (ls, m) in zip(names, cycle)}


def _png(fig, path: str | os.PathLike) -> None:
    from .train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def plot_convergence(results: dict[str, dict[str, Any]], path: str | os.PathLike, title: str,
                     tol: float | None = None) -> None:
    """One row per suite of :func:`vars_deq.compare.compare_solvers` results: the largest relative
    residual over the problems per iteration (every solver, with ``tol`` as a horizontal line),
    and the mean relative energy gap per iteration and per second (solvers with an energy trace;
    the panel names those without one)."""
    plt = _pyplot()
    suites = list(results)
    fig, axes = plt.subplots(len(suites), 3, figsize=(16, 4.0 * len(suites)), squeeze=False)
    for row, suite in enumerate(suites):
        per_solver = results[suite]
        styles = _styles(list(per_solver))
        no_energy = []
        for name, r in per_solver.items():
            res = r.get("log10_max_residual_trace") or []
            if res:
                axes[row, 0].plot([k for k, _ in res], [10**v for _, v in res], label=name, **styles[name])
            gap = r.get("log10_gap_trace")
            if not gap:
                no_energy.append(name)
                continue
            its = [k for k, _ in gap]
            gaps = [10**g for _, g in gap]
            axes[row, 1].plot(its, gaps, label=name, **styles[name])
            axes[row, 2].plot([i * r["seconds_per_iteration"] for i in its], gaps, label=name, **styles[name])
        if tol is not None:
            axes[row, 0].axhline(tol, color="k", linewidth=1.0, linestyle=(0, (6, 3)), label=f"tol {tol:g}")
        labels = (("iteration", "largest relative residual", "residual (all problems)"),
                  ("iteration", "mean relative energy gap", "energy gap"),
                  ("seconds (from the timed run)", "mean relative energy gap", "energy gap over time"))
        for col, (xlabel, ylabel, what) in enumerate(labels):
            ax = axes[row, col]
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{suite}: {what}")
            ax.title.set_fontsize(9)
            ax.grid(True, which="both", alpha=0.3)
        axes[row, 0].legend(fontsize=7, ncol=2)
        if no_energy:
            axes[row, 1].text(0.02, 0.02, "no energy trace (loop exposes no iterate):\n" + ", ".join(no_energy),
                              transform=axes[row, 1].transAxes, fontsize=7, va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    _png(fig, path)
    plt.close(fig)


def plot_attention_maps(
    panels: dict[str, dict[str, Any]],
    path: str | os.PathLike,
    title: str,
    labels: torch.Tensor | None = None,
) -> None:
    """Attention maps over their images: one row per image, one column per panel.

    Args:
        panels: column title -> {"images": (B, C, H, W) in [0, 1], "maps": (B, H, W) in [0, 1],
            "predictions": (B,) class indices}; columns appear in this order.
        labels: (B,) true classes, or None when unknown; a prediction that matches is drawn green,
            one that does not red.
    """
    plt = _pyplot()
    columns = list(panels)
    rows = next(iter(panels.values()))["images"].shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.1 * len(columns) + 1.0, 2.2 * rows + 0.6),
                             squeeze=False)

    overlay = None
    for j, column in enumerate(columns):
        panel = panels[column]
        for i in range(rows):
            ax = axes[i, j]
            img = panel["images"][i].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", interpolation="nearest")
            overlay = ax.imshow(panel["maps"][i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1,
                                interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            pred = int(panel["predictions"][i])
            colour = "black" if labels is None else ("green" if pred == int(labels[i]) else "red")
            ax.set_xlabel(f"pred {pred}", fontsize=8, color=colour)
            if i == 0:
                ax.set_title(column, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"image {i}" + ("" if labels is None else f"\ntrue {int(labels[i])}"), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar = fig.colorbar(overlay, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("attention map (min-max normalized per image and layer)", fontsize=8)
    _png(fig, path)
    plt.close(fig)

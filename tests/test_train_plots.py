"""The training plot (vars_deq.train.plots): renders with and without solver statistics."""

from __future__ import annotations

import pytest
import torch

import vars_deq.train.plots as plots
from vars_deq.train import apply_layer_options, create_model

PNG = b"\x89PNG\r\n\x1a\n"


def _history(n: int, solver: object = None, converged: object = None) -> list[dict]:
    return [{"epoch": e + 1, "train_loss": 2.3 / (e + 1), "test_loss": 2.2 / (e + 1), "train_acc": 0.1 + 0.1 * e,
             "test_acc": 0.1 + 0.09 * e, "solver_steps": solver, "solver_converged": converged} for e in range(n)]


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures plt.subplots makes during the test."""
    import matplotlib.pyplot as plt

    made = []
    real = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        made.append(fig)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    return made


@pytest.mark.parametrize("solver,converged,panels", [
    (None, None, 2),
    (60.5, 1.0, 4),
    ([5.0, 7.0], [0.0, 0.5], 4),
])
def test_plot_renders_with_fixed_axes(tmp_path, figures, solver, converged, panels):
    path = tmp_path / "curves.png"
    plots.plot_curves(_history(3, solver, converged), path, title="vars_sd_digits",
                      layers="backward implicit (adjoint direct), forward fista", num_classes=10)
    assert path.read_bytes()[:8] == PNG
    (fig,) = figures
    axes = fig.axes
    assert len(axes) == panels
    assert axes[0].get_ylim()[0] == 0 and axes[1].get_ylim() == (0.0, 1.0)
    assert any(list(line.get_ydata()) == [0.1, 0.1] for line in axes[1].get_lines())  # the chance line
    assert all(float(t).is_integer() for ax in axes for t in ax.get_xticks())
    assert "vars_sd_digits" in fig.get_suptitle() and "implicit" in fig.get_suptitle()
    if isinstance(solver, list):
        assert len(axes[2].get_lines()) == len(solver)


def test_describe_layers_names_backward_and_forward():
    model = create_model("vars_sd_digits")
    assert plots.describe_layers(model) == "backward unroll, forward ista 5 steps"
    apply_layer_options(model, "vars_sd_digits", {"backward": "implicit", "adjoint": "cg"})
    assert plots.describe_layers(model) == "backward implicit (adjoint cg), forward fista to tol 0.01 in <= 100 steps"
    apply_layer_options(model, "vars_sd_digits", {"backward": "phantom", "phantom_steps": 5})
    assert plots.describe_layers(model).startswith("backward phantom (k=5, tau=1)")
    assert plots.describe_layers(torch.nn.Linear(2, 2)) == ""


def test_plot_takes_the_per_layer_statistics_with_a_log_residual_panel(tmp_path, figures):
    history = _history(3, 6.0, 0.5)  # the means stand beside the per-layer series, which win
    for h in history:
        h.update(solver_steps_per_layer=[5.0, 7.0, 9.0], solver_residual_per_layer=[1e-4, 3e-4, 2e-3],
                 solver_converged_per_layer=[1.0, 0.5, 0.0])
    path = tmp_path / "curves.png"
    plots.plot_curves(history, path, title="vars_sd_digits")
    assert path.read_bytes()[:8] == PNG
    (fig,) = figures
    steps, residual, converged = fig.axes[2:]
    assert [list(line.get_ydata()) for line in steps.get_lines()] == [[5.0] * 3, [7.0] * 3, [9.0] * 3]
    assert residual.get_yscale() == "log" and len(residual.get_lines()) == 3
    assert [list(line.get_ydata()) for line in converged.get_lines()] == [[1.0] * 3, [0.5] * 3, [0.0] * 3]


def test_pretraining_epochs_are_shaded_on_every_panel(tmp_path, figures):
    history = _history(4, 5.0, 0.0)
    for h in history:
        h["pretrain"] = h["epoch"] <= 2
    plots.plot_curves(history, tmp_path / "curves.png")
    (fig,) = figures
    for ax in fig.axes:
        (span,) = ax.patches
        xs = span.get_patch_transform().transform(span.get_path().vertices)[:, 0]  # data x: epochs
        assert (xs.min(), xs.max()) == (0.5, 2.5)
    assert "unrolled pretraining" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    plots.plot_curves(_history(4, 5.0, 0.0), tmp_path / "plain.png")
    assert all(not ax.patches for ax in figures[1].axes)

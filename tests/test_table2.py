"""The Table 2 study (``vars-deq study table2``): its PGD judge, its gradient sources, and the whole
command in its quick mode on the embedded digits and on a CIFAR-10 folder given by path."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import vars_deq as vd
import vars_deq.models  # noqa: F401  (registers the models with timm)
from vars_deq.cli import main
from vars_deq.eval import pgd_robust_counts
from vars_deq.layers.sparse_reconstruction import LAYER_ADJOINT_RIDGE
from vars_deq.studies import table2

from test_data import write_fake_cifar10

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _linear(seed: int, dim: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, classes))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.5), steps=st.integers(0, 6), restarts=st.integers(1, 2))
def test_robust_counts_only_fall_with_steps_and_sources(seed, eps, steps, restarts):
    model, other = _linear(seed), _linear(seed + 1)
    x = torch.rand(12, 1, 2, 3, generator=torch.Generator().manual_seed(seed))
    y = model(x).argmax(-1)  # every clean example right
    y[::3] = (y[::3] + 1) % 3  # and some wrong
    res = pgd_robust_counts(model, x, y, eps, steps, sources={"own": model, "other": other}, restarts=restarts,
                            generator=torch.Generator().manual_seed(seed))
    checks = res["checkpoints"]
    assert checks == list(range(steps + 1))
    robust = [res["robust"][k] for k in checks]
    assert all(a >= b for a, b in zip(robust, robust[1:]))  # a fooled example stays fooled
    for k in checks:  # fooled by either source counts: the intersection of the robust sets
        assert res["robust"][k] <= min(res["per_source"][s][k] for s in ("own", "other"))
    # never above the examples the model gets right (a perturbation cannot fix a wrong one for the count)
    clean_right = int((model(x).argmax(-1) == y).sum())
    if eps == 0:
        assert robust == [clean_right] * len(robust)
    assert robust[-1] <= x.shape[0]


def test_robust_counts_follow_the_exact_gradient_of_a_linear_model():
    """Against w^T x the L-inf optimum is x - eps sign(w) per margin: PGD with the true gradient finds it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.full((64, 1, 2, 2), 0.5) + 0.1 * torch.randn(64, 1, 2, 2)
    y = model(x).argmax(-1)
    w = model[1].weight
    margin = ((w[y] - w[1 - y]) * x.flatten(1)).sum(1) + model[1].bias[y] - model[1].bias[1 - y]
    eps = 0.05
    best_drop = eps * (w[0] - w[1]).abs().sum()  # the most an L-inf step of eps can lower a margin
    expected = int((margin.detach() > best_drop.detach()).sum())
    res = pgd_robust_counts(model, x, y, eps, 10, step_size=eps, generator=torch.Generator().manual_seed(0))
    assert res["robust"][10] == expected


def test_robust_counts_reject_bad_arguments():
    model = _linear(0)
    x, y = torch.rand(2, 1, 2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="restarts"):
        pgd_robust_counts(model, x, y, 0.1, 2, restarts=0)
    with pytest.raises(ValueError, match="checkpoints"):
        pgd_robust_counts(model, x, y, 0.1, 2, checkpoints=[3])
    with pytest.raises(ValueError, match="sources"):
        pgd_robust_counts(model, x, y, 0.1, 2, sources={})


def test_gradient_sources_keep_the_forward_and_swap_the_backward():
    torch.manual_seed(0)
    model = timm.create_model("vars_sd_digits", depth=1).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.arange(4)
    sources = table2._gradient_sources(model, x)
    assert set(sources) == {"unroll", "implicit"}
    layer = next(m for m in sources["unroll"].modules() if isinstance(m, vd.SparseReconstruction))
    assert (layer.backward.name, layer.max_steps, layer.tol) == ("unroll", 5, None)
    implicit = next(m for m in sources["implicit"].modules() if isinstance(m, vd.SparseReconstruction))
    assert implicit.backward.name == "implicit" and implicit.tol is not None  # the converged DEQ preset
    # damped as a layer's implicit backward by name: these layers have more atoms than tokens
    assert implicit.backward.ridge == LAYER_ADJOINT_RIDGE > 0

    def grad(m):
        xa = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xa), y), xa)
        return g

    # the unrolled source of a 5-step model is that model's own gradient
    torch.testing.assert_close(grad(sources["unroll"]), grad(model), rtol=1e-5, atol=1e-7)
    # the model itself is untouched
    own = next(m for m in model.modules() if isinstance(m, vd.SparseReconstruction))
    assert own.backward.name == "unroll"


def test_an_adaptive_forward_is_unrolled_for_the_steps_it_takes():
    torch.manual_seed(0)
    model = timm.create_model("vars_sd_digits", depth=1, backward="implicit").eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        model(x)
    taken = math.ceil(vd.layer_stats(model)[0]["steps"])
    layer = next(m for m in table2._gradient_sources(model, x)["unroll"].modules()
                 if isinstance(m, vd.SparseReconstruction))
    assert (layer.backward.name, layer.solver, layer.max_steps, layer.tol) == ("unroll", "fista", taken, None)


def test_study_config_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="rows"):
        table2.StudyConfig(rows=("vit",)).validate()
    with pytest.raises(ValueError, match="ablation"):
        table2.StudyConfig(rows=("deit",)).validate()
    with pytest.raises(ValueError, match="pgd_eps"):
        table2.StudyConfig(pgd_eps=(0.0,)).validate()
    with pytest.raises(ValueError, match="data_dir"):
        table2.StudyConfig(dataset="cifar10").validate()


def _check_results(results, stem, rows, seeds, ablation):
    data = json.loads((results / f"{stem}.json").read_text())
    assert "table2" in stem
    records = data["records"]
    table_records = [r for r in records if r["model"] in rows]
    assert sorted((r["model"], r["seed"]) for r in table_records) == sorted((m, s) for m in rows for s in seeds)
    for r in table_records:
        assert 0 <= r["clean_acc"] <= 1 and set(r["families"]) == {"noise", "blur", "digital"}
        assert -1 <= r["map_stability"] <= 1
        for attack in r["pgd"].values():
            accs = list(attack["acc_vs_steps"].values())
            assert accs == sorted(accs, reverse=True) and attack["acc"] == accs[-1]
            expected = {"unroll", "implicit"} if r["model"].startswith("vars") else {"autograd"}
            assert set(attack["per_source"]) == expected
            assert all(attack["acc"] <= src[str(attack["steps"])] for src in attack["per_source"].values())
    assert [row["model"] for row in data["table"]] == list(rows)
    if ablation:
        assert [a["value"] for a in data["ablation"]["steps"]] == ["1", "3", "5", "10", "converged"]
        assert [a["value"] for a in data["ablation"]["lam"]] == ["0.1", "0.3", "1.0"]
    pngs = ["table", "pgd", "maps"] + (["ablation"] if ablation else [])
    for name in pngs:
        assert (results / f"{stem}_{name}.png").read_bytes()[:8] == PNG_MAGIC
    return data


@pytest.mark.slow
def test_quick_study_on_digits_runs_end_to_end(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["study", "table2", "--quick", "--runs", str(tmp_path / "runs"), "--results", str(results),
                 "--no-progress"]) == 0
    data = _check_results(results, "table2_quick", tuple(table2.ROWS), [0], ablation=True)
    assert data["config"]["epochs"] == 1 and data["config"]["quick"]
    out = capsys.readouterr().out
    assert "| w/ VARS-SD (DEQ, implicit) |" in out and "| VARS-SD, T |" in out
    # a second run reuses every finished run instead of training again
    assert main(["study", "table2", "--quick", "--runs", str(tmp_path / "runs"), "--results", str(results),
                 "--no-progress", "--rows", "deit", "--no-ablation", "--jobs", "1"]) == 0
    again = json.loads((results / "table2_quick.json").read_text())
    assert [r["reused"] for r in again["records"]] == [True]


@pytest.mark.slow
def test_quick_study_on_a_cifar10_folder_given_by_path(tmp_path):
    data_dir = write_fake_cifar10(tmp_path / "cifar", per_batch=6)
    results = tmp_path / "results"
    assert main(["study", "table2", "--quick", "--data-dir", str(data_dir), "--runs", str(tmp_path / "runs"),
                 "--results", str(results), "--no-progress"]) == 0
    data = _check_results(results, "table2_cifar10_quick", tuple(table2.ROWS), [0], ablation=True)
    assert data["records"][0]["num_examples"] == 6  # the fake test batch
    run = json.loads((tmp_path / "runs" / "cifar10_quick" / "deit" / "seed0" / "summary.json").read_text())
    assert run["model_kwargs"] == table2.CIFAR_MODEL_KWARGS


def test_study_refuses_a_missing_cifar_folder(tmp_path, capsys):
    assert main(["study", "table2", "--data-dir", str(tmp_path / "nope"), "--runs", str(tmp_path),
                 "--results", str(tmp_path), "--no-progress", "--jobs", "1"]) == 2
    assert "nope" in capsys.readouterr().err

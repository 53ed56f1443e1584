"""Unrolled pretraining of equilibrium models: vd.original_forward() runs every layer as the original
VARS code does and writes no module state; the trainer's first pretrain_epochs run in it, then the
configured layers train; the preset and the bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vars_deq as vd
from vars_deq.train import TrainConfig, train
from vars_deq.train.trainer import PRETRAIN_FRACTION, resolve_pretrain_epochs

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("torch_single_thread")

#: configured layers that are not the original's: equilibrium backwards and a converged unroll
CONFIGURED = [
    {"backward": "implicit"},
    {"backward": "implicit", "solver": "fista", "max_steps": 5000, "tol": 1e-7},
    {"backward": "phantom", "phantom_steps": 3},
    {"backward": "unroll", "solver": "fista", "max_steps": 30, "tol": 1e-4},
]


class _Two(nn.Module):
    def __init__(self, weight, **layer):
        super().__init__()
        self.a = vd.SparseReconstruction(vd.DenseDictionary(weight.clone()), lam=0.2, **layer)
        self.b = vd.SparseReconstruction(vd.DenseDictionary(weight.clone()), lam=0.2, **layer)

    def forward(self, x):
        return self.b(self.a(x))


def _output_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), x.grad, grads


def _layer_state(model):
    return [(m.solver, m.max_steps, m.tol, repr(m.backward), m.init) for m in model.modules()
            if isinstance(m, vd.SparseReconstruction)]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.integers(0, len(CONFIGURED) - 1), B=st.integers(1, 3))
def test_original_forward_is_the_original_layer_and_leaves_the_configured_one(seed, which, B):
    gen = torch.Generator().manual_seed(seed)
    N, M, C = 6, 9, 3
    w = torch.randn(N, M, generator=gen, dtype=F64)
    x = torch.randn(B, N, C, generator=gen, dtype=F64)
    original = _Two(w).double()  # the layer's defaults: the original code (5 ISTA steps, unrolled)
    configured = _Two(w, **CONFIGURED[which]).double()
    before = _layer_state(configured)
    with vd.original_forward():
        inside = _output_and_grads(configured, x)
    want = _output_and_grads(original, x)
    for got, ref in zip([inside[0], inside[1], *inside[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # and after the block the configured layers are back, unchanged
    assert _layer_state(configured) == before
    fresh = _Two(w, **CONFIGURED[which]).double()
    after = _output_and_grads(configured, x)
    ref = _output_and_grads(fresh, x)
    torch.testing.assert_close(after[0], ref[0], rtol=0, atol=0)
    assert not torch.equal(after[0], want[0])  # the configured forward is another map


def test_original_forward_nests_and_resets_on_error():
    w = torch.randn(6, 9, dtype=F64)
    layer = vd.SparseReconstruction(vd.DenseDictionary(w), backward="implicit").double()
    x = torch.randn(2, 6, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="inside"):
        with vd.original_forward():
            with vd.original_forward():
                layer(x)
            layer(x)
            assert layer.last_solution.stats.max_steps == 5
            raise RuntimeError("inside")
    layer(x)
    assert layer.last_solution.stats.tol == 1e-2  # the DEQ preset again


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the DEQ loop's graph breaks
def test_a_compiled_model_follows_the_context_in_and_out():
    """torch.compile guards on the context (the trainer's --compile with pretraining)."""
    import torch._dynamo

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=gen, dtype=F64)
    x = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    configured = _Two(w, backward="implicit").double()
    compiled = torch.compile(configured, backend="eager")
    with torch.no_grad():
        outside = configured(x)
        with vd.original_forward():
            inside = configured(x)
        for _ in range(2):  # in, out, in, out: each call must see the context of its moment
            with vd.original_forward():
                torch.testing.assert_close(compiled(x), inside, rtol=0, atol=0)
            torch.testing.assert_close(compiled(x), outside, rtol=0, atol=0)
    assert not torch.equal(inside, outside)


# ---------------------------------------------------------------- the trainer

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)


def _config(out, **kw):
    base = dict(model="vars_sd_digits", model_kwargs={"depth": 1}, output=str(out), epochs=2, batch_size=256, lr=3e-3, warmup_epochs=0,
                weight_decay=0.0, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::vars_deq.ConvergenceWarning")
def test_pretraining_epochs_are_the_original_run_then_the_configured_layers_train(tmp_path):
    opts = {"backward": "implicit", "solver": "fista", "max_steps": 3}
    pre = train(_config(tmp_path / "pre", layer_options=opts, pretrain_epochs=1))
    unrolled = train(_config(tmp_path / "unrolled"))
    assert pre["pretrain_epochs"] == 1 and unrolled["pretrain_epochs"] == 0
    a, b = _lines(tmp_path / "pre" / "metrics.jsonl"), _lines(tmp_path / "unrolled" / "metrics.jsonl")
    assert [h["pretrain"] for h in a] == [True, False]
    assert [h["pretrain"] for h in b] == [False, False]
    for h, g in zip(a[:1], b[:1]):  # the same seed, data and schedule: the same epochs, to the bit
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "solver_steps", "solver_residual_per_layer"):
            assert h[key] == g[key], key
    # then the configured layers: 3 FISTA steps and another loss
    assert a[1]["solver_steps_per_layer"] == pytest.approx([3.0] * len(a[1]["solver_steps_per_layer"]))
    assert b[1]["solver_steps"] == 5.0 and a[1]["train_loss"] != b[1]["train_loss"]


def _layers(**layer_options):
    model = vd.SparseReconstruction(vd.DenseDictionary(torch.randn(4, 5)), **layer_options)
    return [model]


def test_the_preset_pretrains_equilibrium_backwards_only():
    cfg = _config("unused", epochs=45)
    assert resolve_pretrain_epochs(cfg, _layers(backward="implicit")) == int(45 * PRETRAIN_FRACTION) == 6
    assert resolve_pretrain_epochs(cfg, _layers(backward="phantom")) == 6
    assert resolve_pretrain_epochs(cfg, _layers()) == 0
    assert resolve_pretrain_epochs(cfg, _layers(backward="unroll", solver="fista", tol=1e-2)) == 0
    assert resolve_pretrain_epochs(cfg, []) == 0
    assert resolve_pretrain_epochs(_config("unused", epochs=6), _layers(backward="implicit")) == 0
    given = _config("unused", epochs=45, pretrain_epochs=4)
    assert resolve_pretrain_epochs(given, _layers(backward="implicit")) == 4
    assert resolve_pretrain_epochs(given, _layers()) == 4  # as given, also for unrolled layers


def test_bad_pretrain_epochs_are_refused_with_the_option_named(tmp_path):
    for value in (-1, 2, 7):
        with pytest.raises(ValueError, match=r"pretrain_epochs must be >= 0 and < epochs \(2"):
            _config("unused", pretrain_epochs=value).validate()
    with pytest.raises(ValueError, match="has no VARS .* --pretrain-epochs 1"):
        train(_config(tmp_path, model="vit_tiny_patch16_224", model_kwargs=dict(TINY), pretrain_epochs=1))
    assert not tmp_path.joinpath("checkpoint.pth").exists()

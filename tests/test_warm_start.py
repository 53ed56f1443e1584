"""Warm starts across epochs (vd.WarmStart): the equilibrium does not move, the solve gets shorter,
fixed-step layers are never touched, bad use is refused, and a trainer that keeps a cache resumes
exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vars_deq as vd

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class _Two(nn.Module):
    """Two sparse reconstructions in a row (so the cache keys layers by their module path)."""

    def __init__(self, weight, **layer):
        super().__init__()
        self.a = vd.SparseReconstruction(vd.DenseDictionary(weight.clone()), **layer)
        self.b = vd.SparseReconstruction(vd.DenseDictionary(weight.clone()), **layer)

    def forward(self, x):
        return self.b(self.a(x))


def _model(seed, N=6, M=9, tol=1e-9, backward="implicit"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, M, generator=gen, dtype=F64)
    w = w / w.norm(dim=0, keepdim=True)
    opts = {"backward": backward, "lam": 0.2, "init": "thresholded_encode"}
    if tol is not None or backward != "unroll":
        opts.update(solver="fista", max_steps=5000, tol=tol)
    return _Two(w, **opts).double(), gen


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4))
def test_warm_start_keeps_the_equilibrium_and_shortens_the_solve(seed, B):
    """A converged layer's output with a warm start equals the cold one to the tolerance's accuracy,
    and a repeat visit with unchanged weights starts at its equilibrium (one or two steps: the cache
    keeps float32 codes, within 1e-7 of the float64 equilibrium, below the tol of 1e-6)."""
    model, gen = _model(seed, tol=1e-6)
    x = torch.randn(B, 6, 3, generator=gen, dtype=F64)
    cold = model(x)
    cold_steps = model.a.last_solution.stats.steps.float().min()
    cache = vd.WarmStart(model, num_samples=10)
    ids = torch.randperm(10, generator=gen)[:B]
    with cache.use(ids):
        first = model(x)  # nothing cached yet: a cold start
        torch.testing.assert_close(first, cold, rtol=0, atol=1e-12)
        assert cache.warm == 0 and cache.total == 2 * B
        with torch.no_grad():
            x2 = x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=F64)
        again = model(x)
        warm_steps = model.a.last_solution.stats.steps
        model(x2)
    assert cache.warm == 4 * B and cache.total == 6 * B
    torch.testing.assert_close(again, cold, rtol=0, atol=1e-4)
    assert int(warm_steps.max()) <= 2 and float(cold_steps) > 2
    assert set(cache.codes) == {"a", "b"} and bool(cache.filled["a"][ids].all())
    assert int(cache.filled["a"].sum()) == B


def test_fixed_step_layers_are_never_warm_started():
    """tol=None (the original's fixed steps): the output depends on the start, so it stays cold."""
    model, gen = _model(0, tol=None, backward="unroll")
    x = torch.randn(3, 6, 3, generator=gen, dtype=F64)
    cold = model(x)
    cache = vd.WarmStart(model, num_samples=3)
    with cache.use([0, 1, 2]):
        model(x)
        inside = model(x)
    assert torch.equal(inside, cold)
    assert cache.codes == {} and cache.total == 0


def test_warm_start_gradients_are_the_implicit_gradients_at_the_same_equilibrium():
    model, gen = _model(1)
    x = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    cold_grad = torch.autograd.grad(model(x).sum(), model.a.dictionary.weight)[0]
    cache = vd.WarmStart(model, num_samples=2)
    with cache.use([0, 1]):
        model(x)
        warm_grad = torch.autograd.grad(model(x).sum(), model.a.dictionary.weight)[0]
    torch.testing.assert_close(warm_grad, cold_grad, rtol=1e-6, atol=1e-8)


def test_bad_use_is_refused_with_the_argument_named():
    model, gen = _model(2)
    x = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="num_samples"):
        vd.WarmStart(model, num_samples=0)
    with pytest.raises(ValueError, match="max_bytes"):
        vd.WarmStart(model, num_samples=2, max_bytes=-1)
    with pytest.raises(ValueError, match="no VARS"):
        vd.WarmStart(nn.Linear(2, 2), num_samples=2)
    cache = vd.WarmStart(model, num_samples=2)
    with pytest.raises(ValueError, match=r"sample ids must lie in \[0, 2\)"):
        with cache.use([0, 2]):
            pass
    with pytest.raises(ValueError, match="3 sample ids"):
        with cache.use([0, 1, 1]):
            model(x)
    other, _ = _model(3)
    with pytest.raises(ValueError, match="not one of the model's VARS layers"):
        with cache.use([0, 1]):
            other(x)


def test_memory_cap_skips_a_layer_with_a_warning_and_state_round_trips():
    model, gen = _model(4)
    x = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    per_layer = 4 * 2 * 9 * 3  # float32 codes of 2 samples, 9 atoms, 3 channels
    cache = vd.WarmStart(model, num_samples=2, max_bytes=per_layer)
    with pytest.warns(UserWarning, match="layer 'b'.*starts cold"):
        with cache.use([0, 1]):
            model(x)
    assert set(cache.codes) == {"a"} and cache.skipped == {"b"} and cache.nbytes == per_layer
    fresh = vd.WarmStart(model, num_samples=2, max_bytes=per_layer)
    fresh.load_state_dict(cache.state_dict())
    assert torch.equal(fresh.codes["a"], cache.codes["a"]) and fresh.skipped == {"b"}
    with pytest.raises(ValueError, match="holds 2 samples"):
        vd.WarmStart(model, num_samples=5).load_state_dict(cache.state_dict())


def test_trainer_with_a_warm_start_resumes_exactly(tmp_path, monkeypatch):
    """A DEQ run (implicit, FISTA to 1e-3) killed mid-epoch 2 and resumed from its checkpoint,
    cache included, ends with the weights, codes and test metrics of the uninterrupted run; epoch 1
    starts cold, epoch 2 warm."""
    import json

    from test_train import TINY  # noqa: F401  (registers tinyvars_testonly)

    from vars_deq.train import load_checkpoint, resolve_config, train
    from vars_deq.train import trainer as trainer_mod

    def config(out, **kw):
        return resolve_config(dict(model="tinyvars_testonly", output=str(out), epochs=2, batch_size=64, lr=3e-3,
                                   warmup_epochs=0, device="cpu", progress=False, checkpoint_every=5,
                                   layer_options={"backward": "implicit"}, warm_start=True, **kw))

    whole = train(config(tmp_path / "whole"))
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [m["warm_started"] for m in metrics] == [0.0, 1.0]

    class Killed(Exception):
        pass

    def die(code):
        raise Killed(code)

    monkeypatch.setenv(trainer_mod.FAULT_EXIT_ENV, "33")
    monkeypatch.setattr(trainer_mod.os, "_exit", die)
    with pytest.raises(Killed):
        train(config(tmp_path / "run"))
    monkeypatch.delenv(trainer_mod.FAULT_EXIT_ENV)
    resumed = train(resolve_config({"resume": "auto", "output": str(tmp_path / "run"), "progress": False}))
    assert resumed["global_step"] == whole["global_step"]
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    reference = load_checkpoint(tmp_path / "whole" / "checkpoint.pth")
    for k, v in reference["model"].items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for name, codes in reference["warm_start"]["codes"].items():
        torch.testing.assert_close(final["warm_start"]["codes"][name], codes, rtol=1e-4, atol=1e-5, msg=name)
    resumed_metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(resumed_metrics, metrics, strict=True):
        assert a["test_acc"] == b["test_acc"] and a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert 0 < a["eval_time_s"] < a["epoch_time_s"]
    cold = train(resolve_config(dict(model="tinyvars_testonly", output=str(tmp_path / "cold"), epochs=1,
                                     batch_size=64, device="cpu", progress=False,
                                     layer_options={"backward": "implicit"})))
    assert cold["final"]["warm_started"] is None

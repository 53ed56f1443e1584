"""CUDA checks (skipped without a GPU): device parity, no host sync in fixed-step mode, autocast."""

from __future__ import annotations

import pytest
import torch

import vars_deq as vd

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def performer_problem(device, seed=0, lam=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 3, 49, 16, generator=g, dtype=dtype)
    v = torch.randn(4, 3, 49, 16, generator=g, dtype=dtype)
    d = vd.PerformerDictionary(16, num_heads=3).to(device)
    return vd.SparseCoding(d(q.to(device)), v.to(device), lam)


@pytest.mark.parametrize("solver", ["ista", "fista", "mfista", "anderson", "anderson_residual"])
def test_cuda_solution_matches_cpu(solver):
    # Performer atoms are strongly correlated: a residual of tol bounds the code error only up to
    # the conditioning, so the parity check runs in float64 to a tight tol (float32 at 1e-5 left
    # differences of 4e-2 between devices with mfista and anderson on the H100)
    cpu = vd.solve(performer_problem("cpu", dtype=torch.float64), solver, max_steps=20000, tol=1e-11)
    gpu = vd.solve(performer_problem("cuda", dtype=torch.float64), solver, max_steps=20000, tol=1e-11)
    assert bool(gpu.converged.all())
    torch.testing.assert_close(gpu.z.cpu(), cpu.z, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("solver", ["ista", "fista", "mfista", "fista_restart", "anderson", "anderson_plain"])
def test_fixed_step_mode_never_synchronizes(solver):
    """tol=None must run without a host sync, so CUDA graphs and torch.compile can take it."""
    prob = performer_problem("cuda")
    prob.flat()  # binding the problem (Lipschitz bound) happens before the loop
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sol = vd.solve(prob, solver, max_steps=10, tol=None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sol.z.is_cuda and torch.isfinite(sol.z).all()


@pytest.mark.parametrize("backward", ["unroll", "implicit", "phantom"])
def test_vars_model_trains_a_step_on_cuda_under_bf16(backward):
    import timm

    import vars_deq.models  # noqa: F401

    model = timm.create_model("vars_sd_digits").cuda()
    vd.configure_layers(model, backward=backward, **({"on_unconverged": "ignore"} if backward == "implicit" else {}))
    x = torch.rand(16, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_implicit_gradient_matches_unroll_on_cuda():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(3, 20, 10, generator=g, dtype=torch.float64).cuda()
    x = torch.randn(3, 20, 4, generator=g, dtype=torch.float64).cuda()
    out = {}
    for backward in ("implicit", "unroll"):
        xr = x.clone().requires_grad_()
        z = vd.sparse_code(vd.SparseCoding(D, xr, 0.3), solver="fista_restart", backward=backward,
                           max_steps=20000, tol=1e-12)
        (out[backward],) = torch.autograd.grad(z.pow(2).sum(), xr)
    torch.testing.assert_close(out["implicit"], out["unroll"], atol=1e-7, rtol=1e-6)

"""Differentiable equilibria: implicit, unrolled and phantom gradients, fixed_point, TorchDEQ parity."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vars_deq as vd

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def lasso_data(seed, batch=2, n=12, m=6, c=2, lam=0.3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(batch, n, m, generator=g, dtype=dtype)
    x = torch.randn(batch, n, c, generator=g, dtype=dtype)
    return D, x, torch.tensor(lam, dtype=dtype)


def solve_kw(tol=1e-13):
    return dict(solver="fista_restart", max_steps=20000, tol=tol)


def grads(D, x, lam, backward, weight, **kw):
    D, x, lam = (t.detach().clone().requires_grad_() for t in (D, x, lam))
    z = vd.sparse_code(vd.SparseCoding(D, x, lam), backward=backward, **{**solve_kw(), **kw})
    return torch.autograd.grad((z * weight).sum(), (D, x, lam))


@pytest.mark.parametrize(
    "backward, kw, wrt_D",
    [
        ("implicit", solve_kw(), True),
        ("unroll", solve_kw(), True),
        # a finite unroll is differentiated with the step eta = 1/L(D) held fixed (as in the
        # original VARS code), so its derivative in D is not the finite-step map's: check x, lam
        ("unroll", dict(solver="ista", max_steps=30, tol=None), False),
        ("phantom", dict(phantom_steps=400, **solve_kw()), True),
    ],
)
def test_gradcheck_against_finite_differences(backward, kw, wrt_D):
    D, x, lam = lasso_data(0, batch=1, n=8, m=4, c=2)

    def f(*args):
        D_, x_, lam_ = args if wrt_D else (D, *args)
        return vd.sparse_code(vd.SparseCoding(D_, x_, lam_), backward=backward, **kw)

    inputs = tuple(t.clone().requires_grad_() for t in ((D, x, lam) if wrt_D else (x, lam)))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("adjoint", ["cg", "fixed_point", "anderson"])
def test_implicit_matches_unrolled_after_convergence(adjoint):
    D, x, lam = lasso_data(1, batch=3, n=16, m=8, c=3)
    w = torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    gi = grads(D, x, lam, "implicit", w, adjoint=adjoint, adjoint_tol=1e-12, adjoint_max_steps=20000)
    gu = grads(D, x, lam, "unroll", w)
    for a, b in zip(gi, gu):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.05, 1.0), nonneg=st.booleans())
def test_closed_form_derivative_in_lam(seed, lam, nonneg):
    """On the support, z_S = (D_S^T D_S)^{-1}(D_S^T x - lam s) with s = sign(z_S) (1 if nonneg),
    so dz_S/dlam = -(D_S^T D_S)^{-1} s; off the support it is 0."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(20, 8, generator=g, dtype=F64)
    x = torch.randn(20, 1, generator=g, dtype=F64)
    lam_t = torch.tensor(lam, dtype=F64, requires_grad=True)
    prob = vd.SparseCoding(D, x, lam_t, nonneg=nonneg)
    z = vd.sparse_code(prob, **solve_kw())
    support = (z.detach()[:, 0] != 0)
    jac = torch.stack([torch.autograd.grad(z[i, 0], lam_t, retain_graph=True)[0] for i in range(8)])
    s = torch.sign(z.detach()[support, 0])
    ds = D[:, support]
    expected = -torch.linalg.solve(ds.T @ ds, s)
    torch.testing.assert_close(jac[support], expected, atol=1e-7, rtol=1e-6)
    assert torch.all(jac[~support] == 0)


def test_phantom_approaches_implicit_with_more_steps():
    D, x, lam = lasso_data(2, batch=2, n=16, m=8, c=2)
    w = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    gi = grads(D, x, lam, "implicit", w)
    errors = []
    for k in (1, 5, 50, 500):
        gp = grads(D, x, lam, "phantom", w, phantom_steps=k, tau=1.0)
        errors.append(sum((a - b).norm() / b.norm() for a, b in zip(gp, gi)).item())
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[-1] < 1e-6


def test_torch_func_grad_through_sparse_code():
    D, x, lam = lasso_data(3)

    def loss(x):
        return vd.sparse_code(vd.SparseCoding(D, x, lam), **solve_kw()).pow(2).sum()

    g_func = torch.func.grad(loss)(x)
    xr = x.clone().requires_grad_()
    (g_auto,) = torch.autograd.grad(loss(xr), xr)
    torch.testing.assert_close(g_func, g_auto)
    assert g_func.abs().sum() > 0


def tanh_map(seed=0, n=6, batch=4):
    g = torch.Generator().manual_seed(seed)
    W = 0.4 * torch.randn(n, n, generator=g, dtype=F64) / n**0.5
    U = torch.randn(n, n, generator=g, dtype=F64)
    x = torch.randn(batch, n, generator=g, dtype=F64)
    return W, U, x


@pytest.mark.parametrize("adjoint", ["fixed_point", "anderson"])
def test_fixed_point_implicit_matches_unroll_and_func_grad(adjoint):
    W, U, x = tanh_map()

    def loss(W, backward):
        f = lambda z: torch.tanh(z @ W.T + x @ U.T)  # noqa: E731
        # the adjoint options configure the implicit backward only
        adjoint_kw = dict(adjoint=adjoint, adjoint_tol=1e-12, adjoint_max_steps=2000) if backward == "implicit" else {}
        z = vd.fixed_point(f, torch.zeros_like(x), backward=backward, max_steps=500, tol=1e-13, **adjoint_kw)
        return z.pow(3).sum()

    Wr = W.clone().requires_grad_()
    (g_imp,) = torch.autograd.grad(loss(Wr, "implicit"), Wr)
    Wr = W.clone().requires_grad_()
    (g_unr,) = torch.autograd.grad(loss(Wr, "unroll"), Wr)
    g_func = torch.func.grad(lambda W: loss(W, "implicit"))(W)
    torch.testing.assert_close(g_imp, g_unr, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(g_func, g_imp)


def test_parity_with_torchdeq_implicit_gradient():
    from torchdeq import get_deq

    W, U, x = tanh_map(seed=4)
    Wr = W.clone().requires_grad_()
    f = lambda z: torch.tanh(z @ Wr.T + x @ U.T)  # noqa: E731
    deq = get_deq(ift=True, f_solver="fixed_point_iter", b_solver="fixed_point_iter", f_max_iter=500,
                  b_max_iter=500, f_tol=1e-13, b_tol=1e-13)
    z_out, _ = deq(f, torch.zeros_like(x))
    (g_ref,) = torch.autograd.grad(z_out[-1].pow(3).sum(), Wr)
    z = vd.fixed_point(f, torch.zeros_like(x), backward="implicit", max_steps=500, tol=1e-13, adjoint_tol=1e-12)
    (g,) = torch.autograd.grad(z.pow(3).sum(), Wr)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


def test_cg_adjoint_needs_fewer_products_than_fixed_point_and_reports_stats():
    D, x, lam = lasso_data(6, batch=4, n=30, m=20, c=4, lam=0.1)
    steps = {}
    for adjoint in ("cg", "fixed_point"):
        xr = x.clone().requires_grad_()
        z, sol = vd.sparse_code(vd.SparseCoding(D, xr, lam), adjoint=adjoint, adjoint_tol=1e-6,
                                adjoint_max_steps=100_000, return_solution=True, **solve_kw())
        assert sol.stats.adjoint.calls == 0
        z.sum().backward()
        assert sol.stats.adjoint.calls == 1 and bool(sol.stats.adjoint.converged.all())
        assert sol.stats.adjoint.residual.max() < 1e-6
        steps[adjoint] = sol.stats.adjoint.steps
    assert torch.all(steps["cg"] < steps["fixed_point"])


def test_any_solver_with_any_backward():
    D, x, lam = lasso_data(7)
    w = torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = grads(D, x, lam, "unroll", w)
    for solver in ["ista", "fista", "mfista", "anderson", "anderson_residual", "torchdeq_anderson",
                   "torchdeq_fixed_point_iter"]:
        for backward in ["implicit", "phantom"]:
            kw = dict(solver=solver, max_steps=20000, tol=1e-12, **({"phantom_steps": 2000} if backward == "phantom" else {}))
            got = grads(D, x, lam, backward, w, **kw)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{solver}/{backward}")


def test_unconverged_implicit_warns_with_residual_or_raises():
    D, x, lam = lasso_data(8)
    xr = x.clone().requires_grad_()
    # the warning (or error) comes when a backward uses the equilibrium, attributed to the line that built it
    z = vd.sparse_code(vd.SparseCoding(D, xr, lam), solver="ista", max_steps=2, tol=None)
    with pytest.warns(vd.ConvergenceWarning, match="residual") as record:
        z.sum().backward()
    assert record[0].filename == __file__
    z = vd.sparse_code(vd.SparseCoding(D, xr, lam), solver="ista", max_steps=2, tol=1e-8, on_unconverged="error")
    with pytest.raises(vd.ConvergenceError, match="residual"):
        z.sum().backward()


def test_unconverged_implicit_is_quiet_without_a_backward_and_counted_after_the_first():
    D, x, lam = lasso_data(8)
    xr = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", vd.ConvergenceWarning)
        with torch.no_grad():
            vd.sparse_code(vd.SparseCoding(D, xr, lam), solver="ista", max_steps=2, tol=None)
        vd.sparse_code(vd.SparseCoding(D, xr, lam), solver="ista", max_steps=2, tol=None)  # no backward
    with pytest.warns(vd.ConvergenceWarning) as record:
        for _ in range(3):
            vd.sparse_code(vd.SparseCoding(D, xr, lam), solver="ista", max_steps=2, tol=None).sum().backward()
    assert len([r for r in record if "did not converge" in str(r.message)]) == 1
    from vars_deq.backward import UNCONVERGED_BACKWARDS

    assert sum(n for (f, _), n in UNCONVERGED_BACKWARDS.items() if f == __file__) == 3


def test_unconverged_adjoint_is_reported():
    D, x, lam = lasso_data(9, n=30, m=20, lam=0.05)
    xr = x.clone().requires_grad_()
    z, sol = vd.sparse_code(vd.SparseCoding(D, xr, lam), adjoint="fixed_point", adjoint_max_steps=1,
                            return_solution=True, **solve_kw())
    with pytest.warns(vd.ConvergenceWarning, match="adjoint"):
        z.sum().backward()
    assert not bool(sol.stats.adjoint.converged.all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backward="reverse"), "backward must be one of"),
        (dict(adjoint="gmres"), "adjoint must be one of"),
        (dict(phantom_steps=0), "phantom_steps"),
        (dict(tau=0.0), "tau"),
        (dict(on_unconverged="panic"), "on_unconverged"),
        (dict(solver="newton"), "valid names"),
        (dict(solver="torchdeq_anderson", backward="unroll"), "unroll"),
    ],
)
def test_bad_backward_options_raise(kwargs, match):
    D, x, lam = lasso_data(10)
    with pytest.raises(ValueError, match=match):
        vd.sparse_code(vd.SparseCoding(D, x, lam), **kwargs)


def make_dictionary(kind, heads, head_dim, tokens):
    if kind == "dense":
        return vd.DenseDictionary(torch.randn(heads, tokens, 2 * tokens, dtype=F64) / tokens**0.5)
    perf = vd.PerformerDictionary(head_dim, num_heads=heads)
    conv = vd.ConvDictionary(2, 3, num_heads=heads, num_prefix_tokens=1).double()
    return {"performer": perf, "conv": conv, "union": vd.UnionDictionary(perf, conv)}[kind]


@pytest.mark.parametrize("kind", ["dense", "performer", "conv", "union"])
@pytest.mark.parametrize("backward", ["unroll", "implicit", "phantom"])
def test_gradients_reach_every_parameter_of_sparse_reconstruction(kind, backward):
    torch.manual_seed(0)
    heads, head_dim, tokens = 2, 4, 10  # 1 prefix token + a 3 x 3 grid
    layer = vd.SparseReconstruction(make_dictionary(kind, heads, head_dim, tokens), lam=0.1, learn_lam=True,
                                    solver="fista", max_steps=300, tol=1e-9, backward=backward,
                                    **({"on_unconverged": "ignore"} if backward == "implicit" else {})).double()
    q = torch.randn(3, heads, tokens, head_dim, dtype=F64, requires_grad=True)
    v = torch.randn(3, heads, tokens, head_dim, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vd.ConvergenceWarning)
        out = layer(v, q)
        assert out.shape == v.shape and torch.isfinite(out).all()
        (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert v.grad.abs().sum() > 0
    if kind in ("performer", "union"):
        assert q.grad.abs().sum() > 0
    assert set(layer.last_stats) == {"steps", "residual", "converged"}


def test_sparse_reconstruction_rejects_bad_configuration():
    d = vd.PerformerDictionary(4, num_heads=2)
    for kwargs, match in [
        (dict(solver="sgd"), "valid names"),
        (dict(backward="adjoint"), "backward"),
        (dict(lipschitz="spectral"), "lipschitz"),
        (dict(lam=-1.0), "lam"),
        (dict(max_steps=-1), "max_steps"),
        (dict(init="random"), "init"),
        (dict(adjoint_tol=0), "adjoint_tol"),
    ]:
        with pytest.raises(ValueError, match=match):
            vd.SparseReconstruction(d, **kwargs)
    layer = vd.SparseReconstruction(d)
    with pytest.raises(ValueError, match="unknown option"):
        layer.configure(steps=3)
    assert vd.configure_layers(torch.nn.Sequential(layer), backward="implicit", max_steps=7) == 1
    assert layer.backward.name == "implicit" and layer.max_steps == 7
    with pytest.raises(ValueError, match="no VARS"):
        vd.configure_layers(torch.nn.Linear(2, 2), backward="implicit")


@pytest.mark.parametrize("adjoint", ["direct", "auto"])
def test_direct_and_auto_adjoints_match_cg_and_say_which_ran(adjoint):
    D, x, lam = lasso_data(12)
    w = torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    ref = grads(D, x, lam, "implicit", w, adjoint="cg", adjoint_tol=1e-13, adjoint_max_steps=1000)
    got = grads(D, x, lam, "implicit", w, adjoint=adjoint)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    xr = x.clone().requires_grad_()
    z, sol = vd.sparse_code(vd.SparseCoding(D, xr, lam), backward=vd.Implicit(adjoint=adjoint), return_solution=True,
                            **solve_kw())
    (z * w).sum().backward()
    assert sol.stats.adjoint.method in (("direct",) if adjoint == "direct" else ("cg", "cg+direct", "direct"))
    assert bool(sol.stats.adjoint.converged.all())


@pytest.mark.parametrize("budget, per_atom, method", [(1, 0.0, "cg+direct"), (10_000, None, "cg"), (1, None, "direct")])
def test_auto_adjoint_solves_directly_what_cg_leaves_within_its_budget(budget, per_atom, method, monkeypatch):
    """"auto" = CG for cg_budget iterations, then the direct solve for the problems not converged;
    the direct solve alone where the budget is below CG_ITERATIONS_PER_ATOM (2) iterations per atom
    of the largest support (a budget of 1 is; with 0 per atom CG is always tried)."""
    from vars_deq import backward, direct_adjoint

    monkeypatch.setattr(backward, "cg_budget", lambda *counts: budget)
    if per_atom is not None:
        monkeypatch.setattr(direct_adjoint, "CG_ITERATIONS_PER_ATOM", per_atom)
    D, x, lam = lasso_data(12)
    w = torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    ref = grads(D, x, lam, "implicit", w, adjoint="cg", adjoint_tol=1e-13, adjoint_max_steps=1000)
    got = grads(D, x, lam, "implicit", w, adjoint="auto")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    xr = x.clone().requires_grad_()
    z, sol = vd.sparse_code(vd.SparseCoding(D, xr, lam), backward=vd.Implicit(adjoint="auto"), return_solution=True,
                            **solve_kw())
    (z * w).sum().backward()
    assert sol.stats.adjoint.method == method and bool(sol.stats.adjoint.converged.all())
    assert int(sol.stats.adjoint.steps.max()) <= budget


def test_direct_adjoint_is_refused_for_generic_maps():
    with pytest.raises(ValueError, match="symmetric system"):
        vd.fixed_point(lambda z: 0.5 * z, torch.ones(2, 3), adjoint="direct")

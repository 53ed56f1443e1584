"""Fast paths against the plain ones, to rounding (float64): the union's structured Gram
(its products, bound, flatten/take/to and gradients) and the unrolled-ISTA autograd node (alone,
by gradcheck, and inside the layer behind ``vars_deq.unrolled.ENABLED``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vars_deq as vd
from vars_deq import unrolled
from vars_deq.backward import _gram
from vars_deq.devices import has_cxx_compiler
from vars_deq.dictionaries import DenseOperator, UnionOperator
from vars_deq.equilibrium import solve_quietly
from vars_deq.prox import threshold

pytestmark = pytest.mark.usefixtures("torch_single_thread")

F64 = torch.float64


def _normalized(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-2, keepdim=True)


@st.composite
def unions(draw):
    """A union of per-sample atoms (B, H, N, M_a) and atoms (H, N, M_b) or (B, H, N, M_b), as leaves."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    B, H = draw(st.integers(1, 3), label="B"), draw(st.integers(1, 3), label="H")
    N = draw(st.integers(1, 9), label="N")
    ma, mb = draw(st.integers(1, 8), label="M_a"), draw(st.integers(1, 8), label="M_b")
    shared = draw(st.booleans(), label="static atoms shared by the batch")
    gen = torch.Generator().manual_seed(seed)
    wa = torch.randn(B, H, N, ma, generator=gen, dtype=F64, requires_grad=True)
    wb = torch.randn(*(() if shared else (B,)), H, N, mb, generator=gen, dtype=F64, requires_grad=True)
    return wa, wb, gen


def _pair(wa, wb, batch=None):
    """The union with its Gram (where M < 2N) and the plain one (decode + encode), same leaves."""
    fast = UnionOperator(DenseOperator(_normalized(wa)), DenseOperator(_normalized(wb)))
    plain = UnionOperator(DenseOperator(_normalized(wa)), DenseOperator(_normalized(wb)), use_gram=False)
    if batch is not None:
        fast, plain = fast.flatten(batch), plain.flatten(batch)
    return fast, plain


@given(case=unions())
def test_union_gram_is_the_whole_gram_and_steps_like_decode_encode(case):
    wa, wb, gen = case
    fast, plain = _pair(wa, wb)
    assert (fast.gram is not None) == (fast.num_atoms < 2 * fast.num_tokens)
    assert plain.gram is None
    D = plain.materialize()
    whole = D.transpose(-1, -2) @ D
    # the Gershgorin bound is that of the whole union Gram, formed or not
    for op in (fast, plain):
        torch.testing.assert_close(op.lipschitz("gershgorin"), whole.abs().sum(-1).amax(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_gram(op.flatten(op.batch_shape)).reshape(whole.shape), whole, rtol=1e-12,
                                   atol=1e-12)
    if fast.gram is None:
        return
    torch.testing.assert_close(fast.gram, whole, rtol=1e-12, atol=1e-12)
    z = torch.randn(*fast.batch_shape, fast.num_atoms, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(fast.normal(z), plain.normal(z), rtol=1e-12, atol=1e-12)
    # the direct adjoint reads the operator's own Gram
    assert _gram(fast).data_ptr() == fast.gram.data_ptr()


@given(case=unions(), data=st.data())
def test_union_gram_survives_flatten_take_and_to(case, data):
    wa, wb, gen = case
    batch = wa.shape[:-2]
    fast, plain = _pair(wa, wb, batch)
    P = fast.gram.shape[0] if fast.gram is not None else 0
    z = torch.randn(wa.shape[0] * wa.shape[1], fast.num_atoms, 2, generator=gen, dtype=F64)
    torch.testing.assert_close(fast.normal(z), plain.normal(z), rtol=1e-12, atol=1e-12)
    if fast.gram is not None:
        assert P == z.shape[0]
        keep = torch.tensor(data.draw(st.lists(st.integers(0, P - 1), min_size=1, max_size=P), label="take"))
        sub_fast, sub_plain = fast.take(keep), plain.take(keep)
        assert sub_fast.gram is not None and sub_fast.gram.shape[0] == keep.numel()
        torch.testing.assert_close(sub_fast.normal(z[keep]), sub_plain.normal(z[keep]), rtol=1e-12, atol=1e-12)
    low = fast.to(torch.float32)
    assert low.dtype == torch.float32 and (low.gram is None) == (fast.gram is None)
    if low.gram is not None:
        assert low.gram.dtype == torch.float32
        torch.testing.assert_close(low.normal(z.float()), fast.normal(z).float(), rtol=1e-4, atol=1e-5)


@given(case=unions())
def test_union_gram_gradients_match_decode_encode(case):
    wa, wb, gen = case
    fast, plain = _pair(wa, wb)
    if fast.gram is None:
        return
    z = torch.randn(*fast.batch_shape, fast.num_atoms, 3, generator=gen, dtype=F64)
    w = torch.randn(*fast.batch_shape, fast.num_atoms, 3, generator=gen, dtype=F64)
    grads = [torch.autograd.grad((w * op.normal(z)).sum(), (wa, wb)) for op in (fast, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_union_without_dense_parts_keeps_decode_encode():
    conv = vd.ConvDictionary(1, 3, num_heads=2).double()
    perf = vd.PerformerDictionary(4, num_heads=2).double()
    op = vd.UnionDictionary(perf, conv)(torch.randn(1, 2, 16, 4, dtype=F64))
    assert op.gram is None and not op.use_gram


# -- the unrolled-ISTA node -----------------------------------------------------------------------


def _plain_unroll(z, gram, b, lam, eta, steps, nonneg):
    for _ in range(steps):
        z = threshold(z - eta * (gram @ z - b), eta * lam, nonneg)
    return z


@st.composite
def unroll_problems(draw):
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    P, M, C = draw(st.integers(1, 4), label="P"), draw(st.integers(1, 7), label="M"), draw(st.integers(1, 4), label="C")
    N = draw(st.integers(1, 8), label="N")
    steps = draw(st.integers(1, 6), label="steps")
    shared = draw(st.booleans(), label="one Gram for all problems")
    lam_shape = draw(st.sampled_from([(1, 1, 1), (P, 1, 1), (1, M, 1), (P, M, C)]), label="lam shape")
    nonneg = draw(st.booleans(), label="nonneg")
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(1 if shared else P, N, M, generator=gen, dtype=F64)
    gram = (D.transpose(-1, -2) @ D).requires_grad_()
    b = torch.randn(P, M, C, generator=gen, dtype=F64, requires_grad=True)
    z0 = torch.randn(P, M, C, generator=gen, dtype=F64, requires_grad=True)
    lam = (0.05 + torch.rand(lam_shape, generator=gen, dtype=F64)).requires_grad_()
    eta = 1.0 / (torch.linalg.eigvalsh(gram.detach())[..., -1:, None] + 0.5)
    return z0, gram, b, lam, eta, steps, nonneg, gen


@given(case=unroll_problems())
def test_unrolled_ista_matches_autograd_through_the_loop(case):
    z0, gram, b, lam, eta, steps, nonneg, gen = case
    z, residual = unrolled.unrolled_ista(z0, gram, b, lam, eta, steps, nonneg)
    ref = _plain_unroll(z0, gram, b, lam, eta, steps, nonneg)
    prev = _plain_unroll(z0, gram, b, lam, eta, steps - 1, nonneg)
    torch.testing.assert_close(z, ref, rtol=0, atol=0)  # the same arithmetic, in the same order
    torch.testing.assert_close(residual, vd.problems.relative_residual(prev, ref).detach())
    assert not residual.requires_grad
    w = torch.randn(z.shape, generator=gen, dtype=F64)
    inputs = (z0, gram, b, lam)
    got = torch.autograd.grad((w * z).sum(), inputs)
    want = torch.autograd.grad((w * ref).sum(), inputs)
    for name, a, e in zip(("z0", "gram", "b", "lam"), got, want):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@given(case=unroll_problems())
def test_unrolled_ista_without_gradient_is_the_same_forward(case):
    z0, gram, b, lam, eta, steps, nonneg, _ = case
    with torch.no_grad():
        z, residual = unrolled.unrolled_ista(z0, gram, b, lam, eta, steps, nonneg)
        ref = _plain_unroll(z0, gram, b, lam, eta, steps, nonneg)
        prev = _plain_unroll(z0, gram, b, lam, eta, steps - 1, nonneg)
    torch.testing.assert_close(z, ref, rtol=0, atol=0)
    torch.testing.assert_close(residual, vd.problems.relative_residual(prev, ref))


@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_unrolled_ista_gradcheck(nonneg, shared):
    gen = torch.Generator().manual_seed(3)
    D = torch.randn(1 if shared else 2, 4, 3, generator=gen, dtype=F64)
    gram = (D.transpose(-1, -2) @ D).requires_grad_()
    b = torch.randn(2, 3, 2, generator=gen, dtype=F64, requires_grad=True)
    z0 = torch.randn(2, 3, 2, generator=gen, dtype=F64, requires_grad=True)
    lam = torch.tensor([[[0.1]], [[0.2]]], dtype=F64, requires_grad=True)
    eta = torch.full((1, 1, 1), 0.05, dtype=F64)
    assert torch.autograd.gradcheck(lambda *a: unrolled.unrolled_ista(*a, eta, 3, nonneg)[0], (z0, gram, b, lam))


def test_unrolled_ista_rejects_zero_steps():
    z = torch.zeros(1, 2, 1)
    with pytest.raises(ValueError, match="steps"):
        unrolled.unrolled_ista(z, torch.eye(2)[None], z, torch.ones(1, 1, 1), torch.ones(1, 1, 1), 0)


# -- the layer ------------------------------------------------------------------------------------


LAYERS = {
    "d": {"dictionary": "d"},
    "sd_free": {"dictionary": "sd", "static_atoms": "free", "num_tokens": 16},
    "sd_conv": {"dictionary": "sd"},
}


def _run_layer(layer, x, w, enabled, monkeypatch):
    monkeypatch.setattr(unrolled, "ENABLED", enabled)
    calls = []
    original = unrolled.unrolled_ista
    monkeypatch.setattr(unrolled, "unrolled_ista", lambda *a: calls.append(1) or original(*a))
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (w * y).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), grads, dict(layer.last_stats), len(calls)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("options", [{}, {"learn_lam": True}, {"init": "encode", "nonneg": True, "learn_lam": True},
                                     {"init": "zeros", "lipschitz": "power", "max_steps": 2}])
def test_layer_fast_path_matches_the_plain_loop(kind, options, monkeypatch):
    torch.manual_seed(0)
    learn_lam = options.get("learn_lam", False)
    # 6 features: M = 6 + 16 < 2N, so the union keeps its Gram (with 2 * head_dim = 16 it would not)
    layer = vd.VARSAttention(24, 3, qkv_bias=True, num_features=6, **options, **LAYERS[kind]).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 24, generator=gen, dtype=F64)
    w = torch.randn(2, 16, 24, generator=gen, dtype=F64)
    y_fast, g_fast, s_fast, calls = _run_layer(layer, x, w, True, monkeypatch)
    assert calls == 1
    y_plain, g_plain, s_plain, calls = _run_layer(layer, x, w, False, monkeypatch)
    assert calls == 0
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-12, atol=1e-12)
    assert g_fast.keys() == g_plain.keys()
    if learn_lam:
        assert "vars.lam_raw" in g_fast
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_plain[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in s_fast:
        torch.testing.assert_close(s_fast[name], s_plain[name], rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("options", [{"solver": "fista"}, {"tol": 1e-3}, {"backward": "phantom"},
                                     {"backward": "implicit"}, {"max_steps": 0}])
def test_layer_fast_path_only_where_it_applies(options, monkeypatch):
    torch.manual_seed(0)
    layer = vd.VARSAttention(24, 3, qkv_bias=True, num_features=6, dictionary="d", **options).double()
    x = torch.randn(2, 16, 24, dtype=F64)
    *_, calls = _run_layer(layer, x, torch.ones_like(x), True, monkeypatch)
    assert calls == 0


def test_layer_without_a_gram_takes_the_plain_loop(monkeypatch):
    # 2 * head_dim features: M = 16 + 16 = 2N, the union keeps no Gram
    layer = vd.VARSAttention(24, 3, qkv_bias=True, dictionary="sd", static_atoms="free", num_tokens=16).double()
    x = torch.randn(2, 16, 24, dtype=F64)
    *_, calls = _run_layer(layer, x, torch.ones_like(x), True, monkeypatch)
    assert calls == 0


def test_direct_adjoint_with_the_union_gram_matches_the_plain_union():
    gen = torch.Generator().manual_seed(2)
    wa = torch.randn(2, 2, 9, 3, generator=gen, dtype=F64, requires_grad=True)
    wb = torch.randn(2, 9, 4, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(2, 2, 9, 3, generator=gen, dtype=F64)
    grads = []
    for op in _pair(wa, wb):
        prob = vd.SparseCoding(op, x, 0.1, lipschitz="gershgorin")
        z = vd.sparse_code(prob, solver="fista", backward=vd.Implicit(adjoint="direct", on_unconverged="ignore"),
                           max_steps=500, tol=1e-10)
        grads.append(torch.autograd.grad(z.pow(2).sum(), (wa, wb)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


NO_CXX = not has_cxx_compiler()


@pytest.mark.slow
@pytest.mark.skipif(NO_CXX, reason="inductor needs a C++ compiler for CPU code")
@pytest.mark.parametrize("name, dtype, rtol", [
    ("vars_sd_digits", torch.float32, 1e-4),  # its union holds VARS-D's features and free atoms
    # VARS-D's query gradients are 2e-3 sensitive to float32 rounding (exp features, coherent
    # support) in eager too, so exactness is checked where rounding is small
    ("vars_d_digits", torch.float64, 1e-10),
])
def test_torch_compile_traces_the_fixed_step_model_whole_and_matches_eager(name, dtype, rtol):
    """The fixed-step forward never synchronises: inductor takes the whole model, with no graph
    break, and its loss and gradients are eager's to rounding."""
    import copy

    import timm
    import torch._dynamo

    import vars_deq.models  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    eager = timm.create_model(name, depth=1).train().to(dtype)
    x, y = torch.rand(8, 1, 8, 8, dtype=dtype), torch.arange(8)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(copy.deepcopy(eager))

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]

    got, want = loss_and_grads(compiled), loss_and_grads(eager)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * 1e-2)


@given(seed=st.integers(0, 2**31 - 1), scalar=st.booleans(), dtype=st.sampled_from([torch.float32, F64]))
def test_soft_threshold_by_clamp_is_the_textbook_formula_bitwise_and_in_gradient(seed, scalar, dtype):
    """S_t(u) = u - clamp(u, -t, t) (two passes, the no-grad path) equals sign(u) max(|u| - t, 0)
    bit for bit, and its gradients in u and t agree away from the kinks |u| = t; soft_threshold
    takes the textbook form exactly where autograd records."""
    from vars_deq import prox

    gen = torch.Generator().manual_seed(seed)
    u = (3 * torch.randn(4, 6, 5, generator=gen, dtype=dtype)).requires_grad_()
    t = torch.tensor(0.7, dtype=dtype) if scalar else torch.rand(4, 1, 1, generator=gen, dtype=dtype) * 2
    t.requires_grad_()
    fast, plain = prox._soft_threshold_clamp(u, t), prox._soft_threshold_textbook(u, t)
    assert torch.equal(fast, plain)
    w = torch.randn(fast.shape, generator=gen, dtype=dtype)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), (u, t)), torch.autograd.grad((plain * w).sum(), (u, t))):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype is F64 else 1e-5, atol=1e-12 if dtype is F64 else 1e-5)
    assert prox.soft_threshold(u, t).grad_fn.name() == plain.grad_fn.name()
    with torch.no_grad():
        assert torch.equal(prox.soft_threshold(u, t), plain)


@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 12))
def test_plain_fista_steps_like_the_general_formula(seed, steps):
    """Plain FISTA keeps u = x, so y = x + c (x - x_prev), and takes G y itself: the iterates of
    the general step (with the a (u - x) term and G y combined from the stored products) to
    rounding, with no Gram product kept in the state."""
    from vars_deq.solvers.fista import FISTA

    gen = torch.Generator().manual_seed(seed)
    D = _normalized(torch.randn(3, 7, 5, generator=gen, dtype=F64))
    x = torch.randn(3, 7, 2, generator=gen, dtype=F64)
    problem = vd.SparseCoding(DenseOperator(D), x, lam=0.2).flat()
    plain = FISTA()
    sp = plain.init(problem, problem.b)
    gb = problem.normal(problem.b)
    sg = sp._replace(gx=gb, gxp=gb)
    assert sp.u is None and sp.gx is None and sp.gxp is None
    for _ in range(steps):
        sp, yp, tp = plain.step(problem, sp)
        # the general formula with u = x: a (u - x) vanishes exactly
        t_new = 0.5 * (1 + (1 + 4 * sg.t * sg.t) ** 0.5)  # plain FISTA's t is a float
        a, c = sg.t / t_new, (sg.t - 1) / t_new
        y = sg.x + a * (sg.x - sg.x) + c * (sg.x - sg.xp)
        gy = sg.gx + a * (sg.gx - sg.gx) + c * (sg.gx - sg.gxp)
        tz = problem.T_from(y, gy)
        torch.testing.assert_close(yp, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tp, tz, rtol=1e-12, atol=1e-12)
        assert sp.u is None and sp.gx is None
        sg = sg._replace(xp=sg.x, gxp=sg.gx, x=tz, gx=problem.normal(tz), t=t_new)


@st.composite
def step_map_problems(draw):
    """Dense or union problems with a shared or per-problem lam, signed or nonneg, in float64."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    P, N, C = draw(st.integers(1, 5), label="P"), draw(st.integers(1, 9), label="N"), draw(st.integers(1, 4), label="C")
    ma, mb = draw(st.integers(1, 10), label="M_a"), draw(st.integers(0, 8), label="M_b")
    nonneg = draw(st.booleans(), label="nonneg")
    lam_kind = draw(st.sampled_from(["scalar", "per problem", "per entry"]), label="lam")
    gen = torch.Generator().manual_seed(seed)
    wa = _normalized(torch.randn(P, N, ma, generator=gen, dtype=F64))
    D = wa if mb == 0 else UnionOperator(DenseOperator(wa), DenseOperator(_normalized(torch.randn(1, N, mb, generator=gen, dtype=F64))))
    M = ma + mb
    lam = {"scalar": 0.3, "per problem": torch.rand(P, 1, 1, generator=gen, dtype=F64),
           "per entry": torch.rand(P, M, C, generator=gen, dtype=F64)}[lam_kind]
    x = torch.randn(P, N, C, generator=gen, dtype=F64)
    z = torch.randn(P, M, C, generator=gen, dtype=F64)
    return vd.SparseCoding(D, x, lam, nonneg=nonneg, lipschitz="gershgorin"), z, gen


@given(case=step_map_problems(), data=st.data())
def test_fused_no_grad_step_is_the_plain_step_and_survives_take(case, data):
    """The fused no-grad T (S_t(A z + c), A = I - eta G, where the Gram is formed; S_t((z + c) -
    eta D^T (D z)) where not; c = eta b) equals S_t(z - eta (G z - b)) to rounding, on the whole
    batch and on problems taken from it (the loop's compaction)."""
    prob, z, gen = case
    with torch.no_grad():
        flat = prob.flat()
        assert flat.step_map() is not None
        fast = flat.T(z)
        plain = flat.T_from(z, flat.normal(z))
        assert torch.allclose(fast, plain, rtol=0, atol=1e-12 * (1 + plain.abs().max()))
        keep = torch.tensor(sorted(data.draw(st.sets(st.integers(0, z.shape[0] - 1), min_size=1), label="kept")))
        sub = flat.take(keep)
        assert sub.step_map() is not None and sub.step_map().left.shape[0] == keep.numel()
        assert (flat.step_map().atoms is None) == (getattr(flat.op, "gram", None) is not None)
        assert torch.allclose(sub.T(z[keep]), plain[keep], rtol=0, atol=1e-12 * (1 + plain.abs().max()))
    # where autograd records, T is the plain form (its gradient is autograd's of the textbook step)
    zg = z.clone().requires_grad_()
    assert torch.equal(prob.flat().T(zg), prob.flat().T_from(zg, prob.flat().normal(zg)))


@given(case=step_map_problems())
def test_no_grad_solve_with_the_fused_step_matches_the_plain_solve(case):
    """A no-grad FISTA solve to 1e-8 takes the same steps and reaches the same codes with and
    without the fused step (float64: the forms differ by rounding only)."""
    from vars_deq import problems
    prob, _, _ = case
    saved = problems.STEP_MAP
    try:
        with torch.no_grad():
            fast = solve_quietly(prob, "fista", max_steps=300, tol=1e-8)
            problems.STEP_MAP = False
            slow_prob = vd.SparseCoding(prob.D, prob.x, prob.lam, nonneg=prob.nonneg, lipschitz="gershgorin")
            assert slow_prob.flat().step_map() is None
            plain = solve_quietly(slow_prob, "fista", max_steps=300, tol=1e-8)
    finally:
        problems.STEP_MAP = saved
    assert torch.allclose(fast.z, plain.z, rtol=0, atol=1e-9 * (1 + plain.z.abs().max()))
    assert (fast.stats.steps - plain.stats.steps).abs().max() <= 1


def test_fused_step_takes_the_gram_form_where_the_gram_is_formed_and_none_for_fft_atoms():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, generator=gen, dtype=F64)
    conv = vd.ConvDictionary(num_kernels=2, kernel_size=3, grid_size=(4, 4)).double()
    with torch.no_grad():
        assert vd.SparseCoding(conv(x), x, 0.3).flat().step_map() is None
        for m, gram_form in ((31, True), (32, False), (64, False)):  # DenseOperator forms G where M < 2N
            w = _normalized(torch.randn(2, 16, m, generator=gen, dtype=F64))
            step_map = vd.SparseCoding(w, x, 0.3).flat().step_map()
            assert step_map is not None and (step_map.atoms is None) == gram_form
            assert step_map.left.shape == ((2, m, m) if gram_form else (2, m, 16))

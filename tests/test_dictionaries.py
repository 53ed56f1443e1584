"""Dictionaries: every bound operator against its dense materialization (adjointness, Gram,
Lipschitz bounds vs a dense SVD, flatten/take), plus independent references for the conv
(shifted templates) and Performer (random-feature formula) atoms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vars_deq as vd
from vars_deq.dictionaries.base import POWER_SAFETY

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KINDS = ("tensor", "dense_module", "conv", "performer", "union")


@dataclass
class Bound:
    kind: str
    op: vd.DictionaryOperator
    q: torch.Tensor  # the (B, H, N, d) input the module was bound to
    module: torch.nn.Module | None
    seed: int
    info: dict = field(default_factory=dict)

    @property
    def problem_batch(self):
        return self.q.shape[:-2]

    def __repr__(self):
        return f"Bound({self.kind}, seed={self.seed}, q={tuple(self.q.shape)}, N={self.op.num_tokens}, M={self.op.num_atoms}, {self.info})"

    @property
    def exact_is_exact(self) -> bool:
        """Where lipschitz("exact") is ||D||^2 itself, not just a bound."""
        if self.kind in ("tensor", "dense_module", "performer"):
            return True
        return self.kind == "conv" and self.info["padding"] == "circular"


def _conv_module(draw, gen, H, label=""):
    padding = draw(st.sampled_from(["circular", "zero"]), label=f"{label}padding")
    prefix = draw(st.integers(0, 2), label=f"{label}prefix")
    h = draw(st.integers(1, 4), label=f"{label}h")
    square = draw(st.booleans(), label=f"{label}square grid")
    w = h if square else draw(st.integers(1, 4), label=f"{label}w")
    k = draw(st.integers(1, 6), label=f"{label}kernel size")  # odd and even, and larger than the grid
    K = draw(st.integers(1, 3), label=f"{label}num kernels")
    heads = draw(st.sampled_from([H, 1]), label=f"{label}conv heads")
    mod = vd.ConvDictionary(
        K, k, num_heads=heads, padding=padding, num_prefix_tokens=prefix, grid_size=None if square else (h, w)
    ).double()
    with torch.no_grad():
        mod.kernels.copy_(torch.randn(mod.kernels.shape, generator=gen, dtype=torch.float64))
    info = {"padding": padding, "prefix": prefix, "grid": (h, w), "kernel": k, "K": K, "heads": heads}
    return mod, prefix + h * w, info


def _performer_module(draw, gen, H, d, seed, label=""):
    m = draw(st.sampled_from([None, 1, 3, 7]), label=f"{label}num features")
    orth = draw(st.booleans(), label=f"{label}orthogonal")
    mod = vd.PerformerDictionary(d, num_features=m, num_heads=H, orthogonal=orth, seed=seed % 10_000).double()
    return mod, {"num_features": m, "orthogonal": orth}


@st.composite
def bound_dictionaries(draw, kinds=KINDS):
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    kind = draw(st.sampled_from(kinds), label="kind")
    B = draw(st.integers(1, 2), label="B")
    H = draw(st.integers(1, 3), label="H")
    d = draw(st.integers(1, 4), label="head_dim")
    gen = torch.Generator().manual_seed(seed)
    module, info = None, {}
    if kind in ("tensor", "dense_module"):
        N = draw(st.integers(1, 9), label="N")
        M = draw(st.integers(1, 12), label="M")
        lead = draw(st.sampled_from([(), (H,), (1, H), (B, H)] if kind == "tensor" else [(), (H,)]), label="D dims")
        W = torch.randn(*lead, N, M, generator=gen, dtype=torch.float64)
        info = {"D": tuple(W.shape)}
        q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
        if kind == "tensor":
            x = torch.randn(B, H, N, 1, generator=gen, dtype=torch.float64)
            op = vd.SparseCoding(W, x, 0.1).D  # the plain-tensor path users take
        else:
            module = vd.DenseDictionary(W)
            op = module(q)
    elif kind == "conv":
        module, N, info = _conv_module(draw, gen, H)
        q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
        op = module(q)
    elif kind == "performer":
        N = draw(st.integers(1, 9), label="N")
        module, info = _performer_module(draw, gen, H, d, seed)
        q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 5.0]))
        op = module(q)
    else:
        conv, N, cinfo = _conv_module(draw, gen, H, "conv ")
        perf, pinfo = _performer_module(draw, gen, H, d, seed, "performer ")
        module = vd.UnionDictionary(perf, conv)
        q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
        op = module(q)
        info = {"padding": cinfo["padding"], "conv": cinfo, "performer": pinfo}
    return Bound(kind, op, q, module, seed, info)


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _dense_full(b: Bound) -> torch.Tensor:
    """The materialized atoms broadcast to the problems' batch (B, H, N, M)."""
    Dm = b.op.materialize()
    return Dm.expand(*b.problem_batch, *Dm.shape[-2:])


# ---------------------------------------------------------------------------------------------
# operator identities against the materialized atoms
# ---------------------------------------------------------------------------------------------


@given(b=bound_dictionaries(), zseed=st.integers(0, 2**31 - 1), C=st.integers(1, 3))
def test_adjointness_normal_and_materialize(b, zseed, C):
    gen = torch.Generator().manual_seed(zseed)
    op, pb = b.op, b.problem_batch
    N, M = op.num_tokens, op.num_atoms
    assert N == b.q.shape[-2]
    z, x = _rand(gen, *pb, M, C), _rand(gen, *pb, N, C)
    Dz, Dtx = op.decode(z), op.encode(x)
    assert Dz.shape == (*pb, N, C) and Dtx.shape == (*pb, M, C)

    # <D z, x> = <z, D^T x> per problem
    lhs, rhs = (Dz * x).sum((-2, -1)), (z * Dtx).sum((-2, -1))
    scale = Dz.flatten(-2).norm(dim=-1) * x.flatten(-2).norm(dim=-1) + z.flatten(-2).norm(dim=-1) * Dtx.flatten(-2).norm(dim=-1)
    assert bool(((lhs - rhs).abs() <= 1e-12 * scale + 1e-300).all()), (lhs, rhs)

    # materialize() is decode of the identity, and decode/encode/normal are products with it
    Dm = op.materialize()
    assert Dm.shape == (*op.batch_shape, N, M)
    D = _dense_full(b)
    atol = float(1e-12 * (D.abs().amax() + 1) * (z.abs().amax() + x.abs().amax()))
    torch.testing.assert_close(Dz, D @ z, rtol=0, atol=atol)
    torch.testing.assert_close(Dtx, D.transpose(-1, -2) @ x, rtol=0, atol=atol)
    G = D.transpose(-1, -2) @ D
    gscale = float(1e-12 * (G.abs().amax() + 1) * M * (z.abs().amax() + 1))
    torch.testing.assert_close(op.normal(z), G @ z, rtol=0, atol=gscale)
    torch.testing.assert_close(op.normal(z), op.encode(op.decode(z)), rtol=0, atol=gscale)


@given(b=bound_dictionaries())
def test_lipschitz_bounds_against_dense_svd(b):
    op = b.op
    sigma2 = torch.linalg.svdvals(op.materialize())[..., 0].pow(2)  # (*op.batch)
    for mode in ("exact", "gershgorin"):
        L = op.lipschitz(mode)
        assert L.shape == op.batch_shape, (mode, L.shape, op.batch_shape)
        assert not L.requires_grad
        assert bool((L >= sigma2 * (1 - 1e-12) - 1e-12).all()), (mode, L, sigma2)
    if b.exact_is_exact:
        torch.testing.assert_close(op.lipschitz("exact"), sigma2, rtol=1e-10, atol=1e-12)
    # power iteration is an estimate from below, inflated by POWER_SAFETY: never above that
    # (a union sums its parts' estimates, like its other bounds)
    Lp = op.lipschitz("power")
    assert Lp.shape == op.batch_shape
    if b.kind == "union":
        parts = [torch.linalg.svdvals(p(b.q).materialize())[..., 0].pow(2) for p in (b.module.a, b.module.b)]
        cap = POWER_SAFETY * (parts[0] + parts[1])
    else:
        cap = POWER_SAFETY * sigma2
    assert bool((Lp <= cap * (1 + 1e-10) + 1e-12).all()), (Lp, cap)
    with pytest.raises(ValueError, match=r"lipschitz.*exact.*power.*gershgorin"):
        op.lipschitz("frobenius")


def test_lipschitz_is_computed_without_gradient():
    q = torch.randn(2, 2, 9, 4, requires_grad=True)
    conv = vd.ConvDictionary(2, 3, num_heads=2)
    perf = vd.PerformerDictionary(4, num_heads=2)
    for mod in (conv, perf, vd.UnionDictionary(perf, conv), vd.DenseDictionary(torch.randn(2, 9, 5))):
        op = mod(q)
        assert any(t.requires_grad for t in op.tensors())
        for mode in ("exact", "power", "gershgorin"):
            assert not op.lipschitz(mode).requires_grad


@given(b=bound_dictionaries(), seed=st.integers(0, 2**31 - 1), C=st.integers(1, 2))
def test_flatten_and_take_match_the_per_problem_operator(b, seed, C):
    gen = torch.Generator().manual_seed(seed)
    pb = b.problem_batch
    P = math.prod(pb)
    N, M = b.op.num_tokens, b.op.num_atoms
    flat = b.op.flatten(pb)
    assert tuple(flat.batch_shape) in ((P,), (1,))
    D = _dense_full(b).reshape(P, N, M)
    torch.testing.assert_close(flat.materialize().expand(P, N, M), D, rtol=0, atol=1e-12)
    # a random selection of problems (any order, repeats allowed)
    k = int(torch.randint(1, P + 1, (1,), generator=gen))
    idx = torch.randint(P, (k,), generator=gen)
    sub = flat.take(idx)
    z, x = _rand(gen, k, M, C), _rand(gen, k, N, C)
    Di = D[idx]
    atol = float(1e-11 * (Di.abs().amax() + 1) * (z.abs().amax() + x.abs().amax() + 1) * M)
    torch.testing.assert_close(sub.decode(z), Di @ z, rtol=0, atol=atol)
    torch.testing.assert_close(sub.encode(x), Di.transpose(-1, -2) @ x, rtol=0, atol=atol)
    torch.testing.assert_close(sub.normal(z), Di.transpose(-1, -2) @ (Di @ z), rtol=0, atol=atol * float(Di.abs().amax() + 1) * N)
    for mode in ("exact", "gershgorin"):
        full = b.op.lipschitz(mode).expand(pb).reshape(P)
        got = sub.lipschitz(mode).expand(k)
        torch.testing.assert_close(got, full[idx], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# conv (VARS-S): independent reference, bad grids
# ---------------------------------------------------------------------------------------------


def _shift(t, di, dj, circular):
    """out[.., i, j] = t[.., i - di, j - dj] (wrapped, or zero outside the grid)."""
    if circular:
        return torch.roll(t, shifts=(di, dj), dims=(-2, -1))
    h, w = t.shape[-2:]
    out = torch.zeros_like(t)
    src_i, dst_i = slice(max(0, -di), min(h, h - di)), slice(max(0, di), min(h, h + di))
    src_j, dst_j = slice(max(0, -dj), min(w, w - dj)), slice(max(0, dj), min(w, w + dj))
    if src_i.start < src_i.stop and src_j.start < src_j.stop:
        out[..., dst_i, dst_j] = t[..., src_i, src_j]
    return out


def _conv_reference(kernels, grid, prefix, circular):
    """Atoms (heads, N, M) built directly: atom (k, i, j) is template k with its centre (index
    k//2) at grid position (i, j); prefix tokens get identity atoms."""
    Hh, K, ks, _ = kernels.shape
    h, w = grid
    c = ks // 2
    N, M = prefix + h * w, prefix + K * h * w
    D = torch.zeros(Hh, N, M, dtype=kernels.dtype)
    D[:, :prefix, :prefix] = torch.eye(prefix, dtype=kernels.dtype)
    for kk in range(K):
        for i in range(h):
            for j in range(w):
                delta = torch.zeros(h, w, dtype=kernels.dtype)
                delta[i, j] = 1.0
                atom = torch.zeros(Hh, h, w, dtype=kernels.dtype)
                for a in range(ks):
                    for bb in range(ks):
                        atom = atom + kernels[:, kk, a, bb, None, None] * _shift(delta, a - c, bb - c, circular)
                D[:, prefix:, prefix + kk * h * w + i * w + j] = atom.reshape(Hh, h * w)
    return D


@given(b=bound_dictionaries(kinds=("conv",)))
def test_conv_atoms_are_translated_templates(b):
    mod, info = b.module, b.info
    ref = _conv_reference(mod.templates().detach(), info["grid"], info["prefix"], info["padding"] == "circular")
    torch.testing.assert_close(b.op.materialize().detach(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("ksize", [1, 2, 3, 4, 5, 7])
def test_conv_every_configuration(padding, prefix, ksize):
    """Deterministic sweep (the property tests draw these at random): odd and even kernels,
    kernels larger than the 3 x 3 grid, both paddings, with and without a prefix token."""
    g = torch.Generator().manual_seed(ksize * 10 + prefix)
    mod = vd.ConvDictionary(2, ksize, num_heads=2, padding=padding, num_prefix_tokens=prefix).double()
    with torch.no_grad():
        mod.kernels.copy_(torch.randn(mod.kernels.shape, generator=g, dtype=torch.float64))
    q = torch.randn(2, 2, prefix + 9, 4, generator=g, dtype=torch.float64)
    op = mod(q)
    D = op.materialize().detach()
    ref = _conv_reference(mod.templates().detach(), (3, 3), prefix, padding == "circular")
    torch.testing.assert_close(D, ref, rtol=0, atol=1e-12)
    z = torch.randn(2, 2, op.num_atoms, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, op.num_tokens, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close((op.decode(z) * x).sum((-2, -1)), (z * op.encode(x)).sum((-2, -1)))
    torch.testing.assert_close(op.normal(z), D.transpose(-1, -2) @ (D @ z))
    sigma2 = torch.linalg.svdvals(D)[..., 0].pow(2)
    L = op.lipschitz("exact")
    assert bool((L >= sigma2 * (1 - 1e-12)).all()) and bool((op.lipschitz("gershgorin") >= sigma2 * (1 - 1e-12)).all())
    if padding == "circular":
        torch.testing.assert_close(L, sigma2, rtol=1e-10, atol=0)


def test_conv_templates_are_unit_norm_and_atoms_at_most_one():
    mod = vd.ConvDictionary(3, 4, num_heads=2).double()
    k = mod.templates()
    torch.testing.assert_close(k.flatten(-2).norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    D = mod(torch.zeros(1, 2, 25, 4, dtype=torch.float64)).materialize()
    assert bool((D.norm(dim=-2) <= 1 + 1e-12).all())


@pytest.mark.parametrize("n,prefix", [(2, 0), (10, 0), (8, 0), (15, 0), (10, 2), (17, 0), (5, 2)])
def test_conv_on_non_square_token_count_raises(n, prefix):
    mod = vd.ConvDictionary(2, 3, num_prefix_tokens=prefix)
    with pytest.raises(ValueError, match=r"square|grid"):
        mod(torch.randn(1, 1, n, 4))


def test_conv_grid_size_must_hold_the_tokens():
    mod = vd.ConvDictionary(2, 3, grid_size=(2, 5))
    mod(torch.randn(1, 1, 10, 4))
    with pytest.raises(ValueError, match=r"grid_size"):
        mod(torch.randn(1, 1, 12, 4))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_kernels": 0, "kernel_size": 3}, "num_kernels"),
        ({"num_kernels": 2, "kernel_size": 0}, "kernel_size"),
        ({"num_kernels": 2, "kernel_size": 3, "num_heads": 0}, "num_heads"),
        ({"num_kernels": 2, "kernel_size": 3, "padding": "reflect"}, "padding"),
        ({"num_kernels": 2, "kernel_size": 3, "num_prefix_tokens": -1}, "num_prefix_tokens"),
    ],
)
def test_conv_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        vd.ConvDictionary(**kwargs)


@pytest.mark.parametrize("side", [3, 5, 8])
def test_conv_is_resolution_agnostic(side):
    """One module binds to any grid; each atom keeps the template's values (if it fits)."""
    mod = vd.ConvDictionary(2, 3, padding="zero").double()
    op = mod(torch.zeros(1, 1, side * side, 4, dtype=torch.float64))
    assert op.num_tokens == side * side and op.num_atoms == 2 * side * side
    D = op.materialize()[0]
    centre = (side // 2) * side + side // 2
    atom = D[:, centre].reshape(side, side)  # kernel 0 centred mid-grid
    c = side // 2
    torch.testing.assert_close(atom[c - 1 : c + 2, c - 1 : c + 2], mod.templates()[0, 0].detach())


# ---------------------------------------------------------------------------------------------
# Performer (VARS-D)
# ---------------------------------------------------------------------------------------------


@given(b=bound_dictionaries(kinds=("performer",)))
def test_performer_atoms_follow_the_random_feature_formula(b):
    """phi(u) = exp(w^T u - |u|^2/2)/sqrt(m) on unit u; atoms then have unit norm over tokens."""
    mod = b.module
    D = b.op.materialize()
    assert D.shape == (*b.q.shape[:-2], b.q.shape[-2], mod.num_features)
    m = 2 * mod.head_dim if b.info["num_features"] is None else b.info["num_features"]
    assert mod.num_features == m and b.op.num_atoms == m
    torch.testing.assert_close(D.norm(dim=-2), torch.ones(*D.shape[:-2], m, dtype=D.dtype), rtol=1e-12, atol=1e-12)
    assert bool((D > 0).all())  # positive random features
    u = b.q / b.q.norm(dim=-1, keepdim=True)
    feats = torch.exp(torch.einsum("bhnd,hmd->bhnm", u, mod.projection.double()) - 0.5) / math.sqrt(m)
    ref = feats / feats.norm(dim=-2, keepdim=True)
    torch.testing.assert_close(D, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m,d", [(8, 4), (7, 4), (3, 4), (4, 4), (10, 3)])
def test_performer_orthogonal_projection(m, d):
    mod = vd.PerformerDictionary(d, num_features=m, num_heads=2, orthogonal=True, seed=3)
    W = mod.projection.double()
    assert W.shape == (2, m, d)
    for start in range(0, m, d):
        blk = W[:, start : start + d]
        unit = blk / blk.norm(dim=-1, keepdim=True)
        gram = unit @ unit.transpose(-1, -2)
        torch.testing.assert_close(gram, torch.eye(blk.shape[1], dtype=torch.float64).expand_as(gram), atol=1e-6, rtol=0)


def test_performer_projection_is_a_reproducible_buffer():
    a = vd.PerformerDictionary(4, num_heads=2, seed=7)
    b = vd.PerformerDictionary(4, num_heads=2, seed=7)
    c = vd.PerformerDictionary(4, num_heads=2, seed=8)
    assert "projection" in dict(a.named_buffers()) and "projection" not in dict(a.named_parameters())
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert a.projection.shape == (2, 8, 4)  # m = 2 * head_dim by default


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (1, 3, 5, 4), (5, 4)])
def test_performer_rejects_wrong_query_shape(shape):
    mod = vd.PerformerDictionary(4, num_heads=2)
    with pytest.raises(ValueError, match=r"head_dim|H="):
        mod(torch.randn(*shape))


# ---------------------------------------------------------------------------------------------
# union (VARS-SD) and dense
# ---------------------------------------------------------------------------------------------


@given(b=bound_dictionaries(kinds=("union",)))
def test_union_concatenates_atoms_and_bounds(b):
    a_op, c_op = b.module.a(b.q), b.module.b(b.q)
    Da, Dc = a_op.materialize(), c_op.materialize()
    full = b.q.shape[:-2]
    ref = torch.cat([Da.expand(*full, *Da.shape[-2:]), Dc.expand(*full, *Dc.shape[-2:])], dim=-1)
    torch.testing.assert_close(b.op.materialize().expand_as(ref), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        b.op.lipschitz("exact").expand(full), (a_op.lipschitz("exact") + c_op.lipschitz("exact")).expand(full)
    )
    # the Gershgorin bound of the union is that of its whole Gram (what the original VARS-SD code uses)
    gram = ref.transpose(-1, -2) @ ref
    torch.testing.assert_close(b.op.lipschitz("gershgorin").expand(full), gram.abs().sum(-1).amax(-1))


def test_union_of_different_token_counts_raises():
    from vars_deq.dictionaries import UnionOperator

    a = vd.DenseDictionary(torch.randn(9, 3))(None)
    b = vd.DenseDictionary(torch.randn(8, 3))(None)
    with pytest.raises(ValueError, match=r"token"):
        UnionOperator(a, b)


def test_dense_dictionary_binds_its_weight_and_checks_tokens():
    W = torch.randn(2, 6, 5, dtype=torch.float64)
    mod = vd.DenseDictionary(W)
    op = mod(torch.zeros(3, 2, 6, 4))
    torch.testing.assert_close(op.materialize(), W)
    assert isinstance(mod.weight, torch.nn.Parameter)
    with pytest.raises(ValueError, match=r"N=6"):
        mod(torch.zeros(3, 2, 7, 4))
    frozen = vd.DenseDictionary(W, learnable=False)
    assert "weight" in dict(frozen.named_buffers())


@pytest.mark.parametrize("kind", ["conv", "performer", "union"])
def test_dictionary_modules_solve_like_their_dense_atoms(kind):
    """A problem over a bound module evaluates like one over its materialized atoms, and (with
    the same exact step 1/L) a solver follows the same iterates: the solvers see nothing but
    the operator."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 16, 4, generator=g, dtype=torch.float64)
    conv = vd.ConvDictionary(2, 3, num_heads=2, padding="circular").double()
    perf = vd.PerformerDictionary(4, num_heads=2).double()
    mod = {"conv": conv, "performer": perf, "union": vd.UnionDictionary(perf, conv)}[kind]
    op = mod(q)
    x = torch.randn(2, 2, 16, 3, generator=g, dtype=torch.float64)
    D = op.materialize().detach().expand(2, 2, 16, op.num_atoms)
    p_op = vd.SparseCoding(op, x, 0.2)
    p_dense = vd.SparseCoding(D, x, 0.2)
    z = torch.randn(p_op.code_shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(p_op.energy(z), p_dense.energy(z))
    torch.testing.assert_close(p_op.gradient(z), p_dense.gradient(z))
    torch.testing.assert_close(p_op.kkt_violation(z), p_dense.kkt_violation(z))
    if kind == "union":
        return  # (its "exact" L is the sum of its parts' bounds: a different step than the dense one)
    eta_op, eta_dense = p_op.flat().eta.reshape(-1), p_dense.flat().eta.reshape(-1)
    torch.testing.assert_close(eta_op.expand(4), eta_dense.expand(4), rtol=1e-10, atol=0)
    torch.testing.assert_close(p_op.prox_grad(z), p_dense.prox_grad(z))
    for solver in ("ista", "fista"):
        a = vd.solve(p_op, solver, max_steps=30, tol=None)
        b = vd.solve(p_dense, solver, max_steps=30, tol=None)
        torch.testing.assert_close(a.z, b.z, rtol=0, atol=1e-9)

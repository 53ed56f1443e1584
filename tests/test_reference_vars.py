"""Self-consistency of the float64 reference of the original VARS updates (tests/reference_vars.py).

Each property is one the reference must have if it computes what its docstrings say the original
computes: split and merge orders, the thresholded start point, the lasso the steps minimize, the
energy guarantee of the step bounds, the detached L, the FFT conventions of VARS-S.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from reference_vars import (
    gershgorin_lipschitz,
    original_ista,
    original_kernel,
    original_spectrum,
    original_vars_d,
    original_vars_s,
    original_vars_sd,
    performer_features,
    soft_threshold,
    spectral_decode,
    spectral_encode,
    spectral_filter,
    spectral_normal,
    vars_d_problem,
    vars_s_lipschitz,
    vars_s_problem,
)

DT = torch.float64
FAST = settings(max_examples=15, deadline=None)


def dense_weights(seed: int, b: int = 2, n: int = 6, c: int = 4, h: int = 2, m: int | None = None, gain: float = 1.0):
    """x (B, N, C) and VARS-D/SD weights in the original's layouts; m defaults to 2 d as in the original."""
    g = torch.Generator().manual_seed(seed)
    d = c // h
    m = 2 * d if m is None else m

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=DT) * scale

    return dict(
        x=r(b, n, c),
        W_qv=r(2 * c, c, scale=gain / math.sqrt(c)),
        b_qv=r(2 * c, scale=0.1),
        w_feat=r(h, d, m),
        static=r(1, h, n, m),
        W_proj=r(c, c, scale=1 / math.sqrt(c)),
        b_proj=r(c, scale=0.1),
        num_heads=h,
    )


def run_d(w, **kw):
    return original_vars_d(w["x"], w["W_qv"], w["b_qv"], w["w_feat"], w["W_proj"], w["b_proj"], w["num_heads"], **kw)


def run_sd(w, **kw):
    return original_vars_sd(
        w["x"], w["W_qv"], w["b_qv"], w["w_feat"], w["static"], w["W_proj"], w["b_proj"], w["num_heads"], **kw
    )


def s_weights(seed: int, b: int = 2, s: int = 4, c: int = 3, k: int = 5, gain: float = 4.0):
    """x (B, S*S, C) and VARS-S weights; the kernels are spectra of real kernels (module note 2)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=DT) * scale

    return dict(
        x=r(b, s * s, c),
        W_v=r(c, c, scale=gain / math.sqrt(c)),
        b_v=r(c, scale=0.1),
        kernel=original_kernel(r(c, k, s, s, scale=1 / s)),
        kernel2=original_spectrum(r(c, s, s, scale=1 / s))[:, None, None],
        bn_weight=1 + r(c, scale=0.2),
        bn_bias=r(c, scale=0.1),
        bn_mean=r(c, scale=0.1),
        bn_var=0.5 + torch.rand(c, generator=g, dtype=DT),
        W_proj=r(c, c, scale=1 / math.sqrt(c)),
        b_proj=r(c, scale=0.1),
    )


S_ARGS = ("x", "W_v", "b_v", "kernel", "kernel2", "bn_weight", "bn_bias", "bn_mean", "bn_var", "W_proj", "b_proj")


def run_s(w, **kw):
    return original_vars_s(*(w[a] for a in S_ARGS), **kw)


def complex_kernel(w) -> torch.Tensor:
    return torch.view_as_complex(w["kernel"].squeeze(2))


def lasso_energy(atoms, v, z, lam):
    """1/2 ||V - D Z||_F^2 + lam ||Z||_1 per (sample, head): atoms (B, H, N, M), v (B, H, N, d), z (B, H, M, d)."""
    return 0.5 * (v - atoms @ z).pow(2).sum((-2, -1)) + lam * z.abs().sum((-2, -1))


def merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


# ---------------------------------------------------------------------------------------------- features


def test_performer_features_layout_and_formula():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 5, 4, generator=g, dtype=DT)
    w = torch.randn(3, 4, 7, generator=g, dtype=DT)
    phi = performer_features(u, w)
    assert phi.shape == (2, 3, 5, 7)
    u_hat = u / u.norm(dim=-1, keepdim=True)
    expected = torch.exp(torch.einsum("bhnd,hdm->bhnm", u_hat, w) - 0.5) / math.sqrt(7)
    torch.testing.assert_close(phi, expected, rtol=1e-13, atol=0)
    raw = torch.exp(torch.einsum("bhnd,hdm->bhnm", u, w) - 0.5 * u.pow(2).sum(-1, keepdim=True)) / math.sqrt(7)
    torch.testing.assert_close(performer_features(u, w, normalize=False), raw, rtol=1e-13, atol=0)


def test_performer_kernel_is_unbiased_for_exp_of_inner_product():
    # E_w[phi(u)^T phi(k)] = exp(u_hat^T k_hat) for Gaussian w: a wrong sign or scale in phi breaks it
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 1, 2, 3, generator=g, dtype=DT)
    w = torch.randn(1, 3, 400_000, generator=g, dtype=DT)
    phi = performer_features(u, w)[0, 0]
    u_hat = F.normalize(u[0, 0], dim=-1)
    estimate = phi[0] @ phi[1]
    assert abs(estimate / torch.exp(u_hat[0] @ u_hat[1]) - 1) < 0.02


@FAST
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.05, 20.0))
def test_normalized_queries_ignore_their_scale(seed, scale):
    w = dense_weights(seed)
    c = w["x"].shape[-1]
    scaled = dict(w, W_qv=w["W_qv"].clone(), b_qv=w["b_qv"].clone())
    scaled["W_qv"][:c] *= scale
    scaled["b_qv"][:c] *= scale
    torch.testing.assert_close(run_d(scaled), run_d(w), rtol=1e-10, atol=1e-12)


def test_cf10635_features_see_the_query_scale():
    w = dense_weights(3)
    c = w["x"].shape[-1]
    scaled = dict(w, W_qv=w["W_qv"].clone(), b_qv=w["b_qv"].clone())
    scaled["W_qv"][:c] *= 2
    scaled["b_qv"][:c] *= 2
    assert (run_d(scaled, normalize_queries=False) - run_d(w, normalize_queries=False)).abs().max() > 1e-3


def test_cf10635_features_take_queries_times_d_to_the_minus_quarter():
    w = dense_weights(4, c=8, h=2)
    atoms, _ = vars_d_problem(w["x"], w["W_qv"], w["b_qv"], w["w_feat"], 2, normalize_queries=False)
    q = (w["x"] @ w["W_qv"][:8].T + w["b_qv"][:8]).reshape(2, 6, 2, 4).transpose(1, 2) * 4**-0.25
    phi = torch.exp(q @ w["w_feat"] - 0.5 * q.pow(2).sum(-1, keepdim=True)) / math.sqrt(8)
    torch.testing.assert_close(atoms, phi / phi.norm(dim=-2, keepdim=True), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------- VARS-D / SD


@FAST
@given(seed=st.integers(0, 2**31 - 1), lam=st.sampled_from([0.0, 0.05, 0.3, 1.0]), sd=st.booleans())
def test_zero_steps_is_the_thresholded_encode(seed, lam, sd):
    # built from scratch: q is the FIRST half of the qkv output, v the second, head h owns channels h*d..h*d+d-1
    w = dense_weights(seed)
    b, n, c = w["x"].shape
    h, d = w["num_heads"], c // w["num_heads"]
    qv = w["x"] @ w["W_qv"].T + w["b_qv"]
    q = qv[..., :c].reshape(b, n, h, d).permute(0, 2, 1, 3)
    v = qv[..., c:].reshape(b, n, h, d).permute(0, 2, 1, 3)
    q_hat = q / q.norm(dim=-1, keepdim=True)
    phi = torch.exp(torch.einsum("bhnd,hdm->bhnm", q_hat, w["w_feat"]) - 0.5) / math.sqrt(w["w_feat"].shape[-1])
    if sd:
        phi = torch.cat([phi, w["static"].expand(b, -1, -1, -1)], dim=-1)
    atoms = phi / phi.norm(dim=-2, keepdim=True)
    rhs = torch.einsum("bhnm,bhnd->bhmd", atoms, v)
    z0 = rhs.sign() * (rhs.abs() - lam).clamp_min(0)
    expected = merge(atoms @ z0) @ w["W_proj"].T + w["b_proj"]
    out = (run_sd if sd else run_d)(w, lam=lam, steps=0)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-13)


def test_zero_values_give_the_projection_bias():
    # zeroing the second half of qkv (the values) zeroes every code; were the halves swapped it would not
    w = dense_weights(5)
    c = w["x"].shape[-1]
    w["W_qv"][c:] = 0
    w["b_qv"][c:] = 0
    out = run_d(w)
    torch.testing.assert_close(out, w["b_proj"].expand_as(out), rtol=0, atol=1e-15)


@FAST
@given(seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 100))
def test_heads_are_independent_problems(seed, perm_seed):
    # relabelling the heads consistently in qkv, w, static atoms and proj changes nothing
    w = dense_weights(seed, c=6, h=3)
    c, h, d = 6, 3, 2
    perm = torch.randperm(h, generator=torch.Generator().manual_seed(perm_seed))
    chan = (perm[:, None] * d + torch.arange(d)).reshape(-1)
    rows = torch.cat([chan, chan + c])
    moved = dict(
        w,
        W_qv=w["W_qv"][rows],
        b_qv=w["b_qv"][rows],
        w_feat=w["w_feat"][perm],
        static=w["static"][:, perm],
        W_proj=w["W_proj"][:, chan],
    )
    torch.testing.assert_close(run_d(moved), run_d(w), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(run_sd(moved), run_sd(w), rtol=1e-11, atol=1e-13)


@FAST
@given(seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 100))
def test_token_permutation_equivariance(seed, perm_seed):
    w = dense_weights(seed)
    perm = torch.randperm(w["x"].shape[1], generator=torch.Generator().manual_seed(perm_seed))
    moved = dict(w, x=w["x"][:, perm], static=w["static"][:, :, perm])
    torch.testing.assert_close(run_d(moved), run_d(w)[:, perm], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(run_sd(moved), run_sd(w)[:, perm], rtol=1e-11, atol=1e-13)


@FAST
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(0, 6))
def test_sd_with_zero_static_atoms_is_d(seed, steps):
    # zero static atoms stay zero after normalization, leave the Gershgorin bound and every code unchanged
    w = dense_weights(seed)
    w["static"] = torch.zeros_like(w["static"])
    torch.testing.assert_close(run_sd(w, steps=steps), run_d(w, steps=steps), rtol=1e-12, atol=1e-14)


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_sd_static_atoms_are_normalized_over_tokens(seed):
    # a positive scale per static atom (column over the N tokens) is undone by the normalization
    w = dense_weights(seed)
    scale = torch.rand(1, 1, 1, w["static"].shape[-1], generator=torch.Generator().manual_seed(seed), dtype=DT)
    moved = dict(w, static=w["static"] * (0.1 + 10 * scale))
    torch.testing.assert_close(run_sd(moved), run_sd(w), rtol=1e-11, atol=1e-13)
    atoms, _ = vars_d_problem(w["x"], w["W_qv"], w["b_qv"], w["w_feat"], 2, w["static"])
    torch.testing.assert_close(atoms.norm(dim=-2), torch.ones(atoms.shape[:2] + atoms.shape[-1:], dtype=DT))


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    lam=st.floats(0.0, 1.0),
    steps=st.integers(1, 8),
    sd=st.booleans(),
    n=st.integers(2, 9),
    gain=st.floats(0.5, 4.0),
)
def test_energy_never_increases_over_the_steps(seed, lam, steps, sd, n, gain):
    w = dense_weights(seed, n=n, gain=gain)
    atoms, v = vars_d_problem(w["x"], w["W_qv"], w["b_qv"], w["w_feat"], 2, w["static"] if sd else None)
    L = gershgorin_lipschitz(atoms)
    gram = atoms.transpose(-2, -1) @ atoms
    assert (L[..., 0, 0] >= torch.linalg.eigvalsh(gram)[..., -1] + 1 - 1e-12).all()
    iterates = original_ista(lambda t: gram @ t, atoms.transpose(-2, -1) @ v, lam, L, steps)
    energies = torch.stack([lasso_energy(atoms, v, z, lam) for z in iterates])
    assert (energies[1:] <= energies[:-1] + 1e-12 * (1 + energies[:-1].abs())).all()


def test_the_steps_minimize_the_lasso_with_the_full_lam():
    # threshold lam / L with step 1 / L: the fixed point satisfies the lasso KKT conditions for lam itself
    g = torch.Generator().manual_seed(7)
    atoms = torch.randn(3, 10, 4, generator=g, dtype=DT)
    v = torch.randn(3, 10, 2, generator=g, dtype=DT)
    lam = 0.7
    gram = atoms.transpose(-2, -1) @ atoms
    z = original_ista(lambda t: gram @ t, atoms.transpose(-2, -1) @ v, lam, gershgorin_lipschitz(atoms), 3000)[-1]
    corr = atoms.transpose(-2, -1) @ (v - atoms @ z)
    support = z != 0
    assert support.any() and (~support).any()
    assert (corr.abs() <= lam + 1e-9).all()
    torch.testing.assert_close(corr[support], lam * z[support].sign(), rtol=0, atol=1e-9)


def test_start_point_thresholds_with_the_full_lam():
    rhs = torch.tensor([[-2.0, -0.2, 0.1, 0.5]], dtype=DT)
    z0 = original_ista(lambda t: t, rhs, 0.3, torch.tensor(10.0, dtype=DT), 0)
    assert len(z0) == 1
    torch.testing.assert_close(z0[0], torch.tensor([[-1.7, 0.0, 0.0, 0.2]], dtype=DT), rtol=0, atol=1e-15)
    torch.testing.assert_close(soft_threshold(rhs, 0.3), z0[0], rtol=0, atol=0)


def test_gershgorin_step_of_orthonormal_atoms_is_two():
    # D^T D = I: the Gershgorin bound is 1 and the original adds 1
    q, _ = torch.linalg.qr(torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(6), dtype=DT))
    torch.testing.assert_close(gershgorin_lipschitz(q), torch.full((2, 3, 1, 1), 2.0, dtype=DT), rtol=1e-13, atol=0)


def test_large_lam_gives_zero_codes_and_the_projection_bias():
    w = dense_weights(8)
    out = run_sd(w, lam=1e3)
    torch.testing.assert_close(out, w["b_proj"].expand_as(out), rtol=0, atol=1e-15)


def test_codes_are_sparse_but_not_empty_at_the_defaults():
    # the fixtures exercise the threshold: some codes are cut, some survive
    w = dense_weights(9)
    atoms, v = vars_d_problem(w["x"], w["W_qv"], w["b_qv"], w["w_feat"], 2)
    gram = atoms.transpose(-2, -1) @ atoms
    z = original_ista(lambda t: gram @ t, atoms.transpose(-2, -1) @ v, 0.3, gershgorin_lipschitz(atoms), 5)[-1]
    assert 0 < (z != 0).double().mean() < 1


@pytest.mark.parametrize("kind", ["d", "sd"])
def test_lipschitz_is_detached(kind):
    # the gradient with L computed inside equals the gradient with L held at its value
    w = dense_weights(10)
    params = ["x", "W_qv", "b_qv", "W_proj", "b_proj"] + (["static"] if kind == "sd" else [])
    for p in params:
        w[p] = w[p].clone().requires_grad_()
    run = run_sd if kind == "sd" else run_d
    atoms, _ = vars_d_problem(
        w["x"], w["W_qv"], w["b_qv"], w["w_feat"], 2, w["static"] if kind == "sd" else None
    )
    L = gershgorin_lipschitz(atoms)
    assert not L.requires_grad
    out_free, out_fixed = run(w), run(w, lipschitz=L.clone())
    torch.testing.assert_close(out_free, out_fixed, rtol=0, atol=0)
    cot = torch.randn_like(out_free)
    g_free = torch.autograd.grad(out_free, [w[p] for p in params], cot)
    g_fixed = torch.autograd.grad(out_fixed, [w[p] for p in params], cot)
    for a, b in zip(g_free, g_fixed):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["d", "sd"])
def test_gradcheck_dense(kind):
    w = dense_weights(11, b=1, n=4, c=4, h=2)
    names = ["x", "W_qv", "b_qv", "w_feat", "W_proj", "b_proj"] + (["static"] if kind == "sd" else [])
    atoms, _ = vars_d_problem(w["x"], w["W_qv"], w["b_qv"], w["w_feat"], 2, w["static"] if kind == "sd" else None)
    L = gershgorin_lipschitz(atoms)  # held fixed: finite differences would otherwise move it

    def f(*tensors):
        return (run_sd if kind == "sd" else run_d)(dict(w, **dict(zip(names, tensors))), lipschitz=L)

    inputs = tuple(w[p].clone().requires_grad_() for p in names)
    assert torch.autograd.gradcheck(f, inputs)
    grads = torch.autograd.grad(f(*inputs).pow(2).sum(), inputs)
    assert all(g.abs().max() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------- VARS-S


def circular_conv(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """out[p] = sum_o k[o] y[p - o] on the S x S torus, k centered (entry (a, b) is offset (a - S//2, b - S//2))."""
    s = k.shape[-1]
    out = torch.zeros_like(y)
    for a in range(s):
        for b in range(s):
            out = out + k[..., a, b, None, None] * torch.roll(y, (a - s // 2, b - s // 2), (-2, -1))
    return out


@pytest.mark.parametrize("s", [3, 4])
def test_spectral_products_are_circular_convolutions(s):
    g = torch.Generator().manual_seed(12)
    y = torch.randn(2, 3, s, s, generator=g, dtype=DT)
    k = torch.randn(3, s, s, generator=g, dtype=DT)
    spec = torch.view_as_complex(original_spectrum(k))
    torch.testing.assert_close(spectral_filter(y, spec), circular_conv(y, k), rtol=1e-12, atol=1e-13)
    atoms = torch.randn(3, 2, s, s, generator=g, dtype=DT)
    z = torch.randn(2, 3, 2, s, s, generator=g, dtype=DT)
    dspec = torch.view_as_complex(original_kernel(atoms).squeeze(2))
    expected = circular_conv(z[:, :, 0], atoms[:, 0]) + circular_conv(z[:, :, 1], atoms[:, 1])
    torch.testing.assert_close(spectral_decode(z, dspec), expected, rtol=1e-12, atol=1e-13)
    # the encoder correlates with the atoms: its kernels are the atoms flipped
    flipped = torch.roll(atoms.flip(-2, -1), (1 - s % 2, 1 - s % 2), (-2, -1))
    encoded = spectral_encode(y, dspec)[:, :, 1]
    torch.testing.assert_close(encoded, circular_conv(y, flipped[:, 1]), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("s", [3, 4])
def test_encoder_is_the_adjoint_and_the_gram_is_their_product(s):
    w = s_weights(13, s=s, k=2)
    spec = complex_kernel(w)
    g = torch.Generator().manual_seed(14)
    z = torch.randn(2, 3, 2, s, s, generator=g, dtype=DT)
    y = torch.randn(2, 3, s, s, generator=g, dtype=DT)
    decoded = spectral_decode(z, spec)
    torch.testing.assert_close((decoded * y).sum(), (z * spectral_encode(y, spec)).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(spectral_normal(z, spec), spectral_encode(decoded, spec), rtol=1e-11, atol=1e-13)


def test_original_gram_differs_from_its_encoder_decoder_product_for_a_free_spectrum():
    # module note 2: a random half spectrum (the original's init) is not Hermitian on column 0
    g = torch.Generator().manual_seed(15)
    spec = torch.randn(2, 3, 4, 3, generator=g, dtype=torch.complex128)
    z = torch.randn(1, 2, 3, 4, 4, generator=g, dtype=DT)
    gap = (spectral_normal(z, spec) - spectral_encode(spectral_decode(z, spec), spec)).abs().max()
    assert gap > 1e-3


@pytest.mark.parametrize("s,k", [(3, 1), (4, 2), (4, 5)])
def test_vars_s_lipschitz_is_the_exact_norm(s, k):
    w = s_weights(16, s=s, k=k)
    spec = complex_kernel(w)
    c = spec.shape[0]
    basis = torch.eye(k * s * s, dtype=DT).reshape(k * s * s, 1, k, s, s).expand(-1, c, -1, -1, -1)
    dense = spectral_decode(basis, spec).reshape(k * s * s, c, s * s).permute(1, 2, 0)  # (C, N, K N)
    top = torch.linalg.matrix_norm(dense, ord=2) ** 2
    L = vars_s_lipschitz(spec)
    torch.testing.assert_close(L, top, rtol=1e-11, atol=0)
    torch.testing.assert_close(L, spec.abs().pow(2).sum(1).flatten(1).amax(-1), rtol=1e-12, atol=0)
    # the original's SVD of kk.float() (real part only) is between half the exact bound and the bound
    gram = torch.einsum("cisf,cjsf->csfij", spec, spec.conj())
    cast = torch.linalg.svdvals(gram.real).flatten(1).amax(-1)
    assert (cast <= L * (1 + 1e-12)).all() and (cast >= L / 2 * (1 - 1e-12)).all()
    if k > 1:
        assert (cast < L * (1 - 1e-6)).any()


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    s=st.integers(2, 5),
    k=st.sampled_from([1, 2, 5]),
    lam=st.floats(0.0, 5.0),
    steps=st.integers(1, 6),
)
def test_vars_s_energy_never_increases(seed, s, k, lam, steps):
    w = s_weights(seed, s=s, k=k)
    spec = complex_kernel(w)
    v = vars_s_problem(w["x"], w["W_v"], w["b_v"])
    L = vars_s_lipschitz(spec)[:, None, None, None]
    iterates = original_ista(lambda t: spectral_normal(t, spec), spectral_encode(v, spec), lam, L, steps)

    def energy(z):  # per (sample, channel)
        return 0.5 * (v - spectral_decode(z, spec)).pow(2).sum((-2, -1)) + lam * z.abs().sum((-3, -2, -1))

    energies = torch.stack([energy(z) for z in iterates])
    assert (energies[1:] <= energies[:-1] + 1e-11 * (1 + energies[:-1].abs())).all()


def test_vars_s_zero_steps_and_its_decoding():
    w = s_weights(17)
    spec, spec2 = complex_kernel(w), torch.view_as_complex(w["kernel2"][:, 0, 0])
    v = vars_s_problem(w["x"], w["W_v"], w["b_v"])
    z0 = soft_threshold(spectral_encode(v, spec), 3.5)
    assert 0 < (z0 != 0).double().mean() < 1
    y = spectral_filter(spectral_decode(z0, spec), spec2).flatten(-2).transpose(-2, -1)  # (B, N, C)
    y = (y - w["bn_mean"]) / torch.sqrt(w["bn_var"] + 1e-5) * w["bn_weight"] + w["bn_bias"]
    torch.testing.assert_close(run_s(w, steps=0), y @ w["W_proj"].T + w["b_proj"], rtol=1e-12, atol=1e-13)


def test_vars_s_tokens_are_row_major_on_the_grid():
    # v's token r * S + c sits at grid (r, c): the value of token 1 is the grid's (0, 1)
    w = s_weights(18, s=3)
    v = vars_s_problem(w["x"], w["W_v"], w["b_v"])
    torch.testing.assert_close(v[:, :, 0, 1], w["x"][:, 1] @ w["W_v"].T + w["b_v"], rtol=0, atol=0)


@FAST
@given(seed=st.integers(0, 2**31 - 1), dr=st.integers(0, 3), dc=st.integers(0, 3))
def test_vars_s_is_translation_equivariant(seed, dr, dc):
    w = s_weights(seed, s=4)
    b, n, c = w["x"].shape

    def shift(t):
        return torch.roll(t.reshape(b, 4, 4, c), (dr, dc), (1, 2)).reshape(b, n, c)

    torch.testing.assert_close(run_s(dict(w, x=shift(w["x"]))), shift(run_s(w)), rtol=1e-10, atol=1e-12)


def test_vars_s_large_lam_gives_the_normalized_zero():
    w = s_weights(19)
    out = run_s(w, lam=1e4)
    bn_zero = (0 - w["bn_mean"]) / torch.sqrt(w["bn_var"] + 1e-5) * w["bn_weight"] + w["bn_bias"]
    torch.testing.assert_close(out, (bn_zero @ w["W_proj"].T + w["b_proj"]).expand_as(out), rtol=1e-13, atol=1e-14)


def test_vars_s_batchnorm_in_training_mode_uses_batch_and_token_statistics():
    w = s_weights(20)
    c = w["x"].shape[-1]
    w.update(bn_weight=torch.ones(c, dtype=DT), bn_bias=torch.zeros(c, dtype=DT))
    w.update(W_proj=torch.eye(c, dtype=DT), b_proj=torch.zeros(c, dtype=DT))
    out = run_s(w, bn_training=True)  # (B, N, C): normalized per channel over B and N together
    torch.testing.assert_close(out.mean((0, 1)), torch.zeros(c, dtype=DT), rtol=0, atol=1e-12)
    var = out.var((0, 1), unbiased=False)
    assert ((var - 1).abs() < 1e-3).all()


def test_vars_s_lipschitz_is_detached():
    w = s_weights(21)
    names = ["x", "W_v", "kernel", "kernel2", "W_proj"]
    for p in names:
        w[p] = w[p].clone().requires_grad_()
    L = vars_s_lipschitz(complex_kernel(w))
    assert not L.requires_grad
    out_free, out_fixed = run_s(w), run_s(w, lipschitz=L.clone())
    torch.testing.assert_close(out_free, out_fixed, rtol=0, atol=0)
    cot = torch.randn_like(out_free)
    g_free = torch.autograd.grad(out_free, [w[p] for p in names], cot)
    g_fixed = torch.autograd.grad(out_fixed, [w[p] for p in names], cot)
    for a, b in zip(g_free, g_fixed):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_gradcheck_vars_s():
    w = s_weights(22, b=2, s=3, c=2, k=2)
    names = ["x", "W_v", "b_v", "kernel", "kernel2", "bn_weight", "bn_bias", "W_proj", "b_proj"]
    L = vars_s_lipschitz(complex_kernel(w))  # held fixed: finite differences would otherwise move it

    def f(*tensors):
        return run_s(dict(w, **dict(zip(names, tensors))), lipschitz=L)

    inputs = tuple(w[p].clone().requires_grad_() for p in names)
    z = original_ista(
        lambda t: spectral_normal(t, complex_kernel(w)),
        spectral_encode(vars_s_problem(w["x"], w["W_v"], w["b_v"]), complex_kernel(w)),
        3.5,
        L[:, None, None, None],
        3,
    )[-1]
    assert (z != 0).any()
    assert torch.autograd.gradcheck(f, inputs)
    grads = torch.autograd.grad(f(*inputs).pow(2).sum(), inputs)
    assert all(g.abs().max() > 0 for g in grads)

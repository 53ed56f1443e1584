"""The layer's defaults reproduce the original VARS code: outputs and gradients against the
independent float64 reference of tests/reference_vars.py, to 1e-10."""

from __future__ import annotations

import pytest
import torch
from reference_vars import (
    original_ista,
    original_spectrum,
    original_vars_d,
    original_vars_sd,
    spectral_decode,
    spectral_encode,
    spectral_normal,
    vars_s_lipschitz,
    vars_s_problem,
)

import vars_deq as vd

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _dense_weights(layer: vd.VARSAttention):
    """The original's parameters, laid out as it stores them, built from the layer's."""
    W_qv = torch.cat([layer.q.weight, layer.v.weight])
    b_qv = torch.cat([layer.q.bias, layer.v.bias])
    w_feat = layer.dynamic_atoms.projection.transpose(-1, -2)  # ours (H, m, d), the original's (H, d, m)
    return W_qv, b_qv, w_feat


def _params(layer):
    return [p for p in layer.parameters() if p.requires_grad]


def _compare(layer, x, reference):
    xr = x.clone().requires_grad_()
    out = layer(xr)
    x2 = x.clone().requires_grad_()
    ref = reference(x2)
    torch.testing.assert_close(out, ref, **TOL)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), [xr, *_params(layer)], allow_unused=True)
    want = torch.autograd.grad((ref * w).sum(), [x2, *_params(layer)], allow_unused=True)
    for g, r in zip(got, want):
        assert g is not None and r is not None
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_vars_d_defaults_reproduce_the_original(seed):
    torch.manual_seed(seed)
    dim, heads, n = 24, 3, 16
    layer = vd.VARSAttention(dim, heads, qkv_bias=True, dictionary="d", feature_seed=seed).double()
    x = torch.randn(2, n, dim, dtype=F64)

    def reference(x):
        W_qv, b_qv, w_feat = _dense_weights(layer)
        return original_vars_d(x, W_qv, b_qv, w_feat, layer.proj.weight, layer.proj.bias, heads)

    _compare(layer, x, reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_vars_sd_free_reproduces_the_original(seed):
    torch.manual_seed(seed)
    dim, heads, n = 24, 3, 16
    layer = vd.VARSAttention(dim, heads, qkv_bias=True, dictionary="sd", static_atoms="free", num_tokens=n).double()
    assert layer.static_atoms.weight.shape == (heads, n, 2 * dim // heads)
    x = torch.randn(2, n, dim, dtype=F64)

    def reference(x):
        W_qv, b_qv, w_feat = _dense_weights(layer)
        return original_vars_sd(x, W_qv, b_qv, w_feat, layer.static_atoms.weight, layer.proj.weight,
                                layer.proj.bias, heads)

    _compare(layer, x, reference)


def test_vars_s_reproduces_the_original_sparse_reconstruction():
    """VARS-S: one lasso per channel with 5 full-size circular kernels, lam 3.5, 3 steps, exact L;
    the decoded reconstruction (before the block's second kernel, BatchNorm and proj) matches."""
    torch.manual_seed(0)
    dim, side = 6, 4
    layer = vd.VARSAttention(dim, num_heads=dim, qkv_bias=True, dictionary="s", num_kernels=5, kernel_size=side,
                             lam=3.5, max_steps=3, lipschitz="exact", static_impl="fft").double()
    with torch.no_grad():  # kernels of the original's scale, so that lam = 3.5 leaves a nonzero code
        layer.static_atoms.kernels.mul_(3.0)
    x = torch.randn(2, side * side, dim, dtype=F64)
    xr = x.clone().requires_grad_()
    ours = layer.reconstruct(xr).squeeze(-1)  # (B, C, N)
    x2 = x.clone().requires_grad_()
    spec = original_spectrum(layer.static_atoms.kernels)
    spec = torch.view_as_complex(spec).conj()  # the original's encoder spectrum of our synthesis atoms
    v = vars_s_problem(x2, layer.v.weight, layer.v.bias)
    z = original_ista(lambda t: spectral_normal(t, spec), spectral_encode(v, spec), 3.5,
                      vars_s_lipschitz(spec)[:, None, None, None], 3)[-1]
    ref = spectral_decode(z, spec).flatten(-2)
    assert ref.abs().max() > 0.1, "a code that is all zero would make the comparison vacuous"
    torch.testing.assert_close(ours, ref, **TOL)
    w = torch.randn_like(ours)
    params = [xr, layer.v.weight, layer.v.bias, layer.static_atoms.kernels]
    got = torch.autograd.grad((ours * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), [x2, layer.v.weight, layer.v.bias, layer.static_atoms.kernels])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL)


def test_start_point_and_margin_are_named_options():
    layer = vd.VARSAttention(16, 2, dictionary="d")
    assert layer.vars.init == "thresholded_encode" and layer.vars.lipschitz == "gershgorin" and layer.vars.margin == 1.0
    paper = vd.VARSAttention(16, 2, dictionary="d", init="encode", lipschitz_margin=0.0)
    assert paper.vars.init == "encode" and paper.vars.margin == 0.0
    with pytest.raises(ValueError, match="lipschitz_margin"):
        vd.VARSAttention(16, 2, dictionary="d", lipschitz_margin=-1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        vd.VARSAttention(16, 2, dictionary="sd", static_atoms="free")
    with pytest.raises(ValueError, match="static_atoms must be one of"):
        vd.VARSAttention(16, 2, dictionary="sd", static_atoms="learned")

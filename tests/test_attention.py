"""VARSAttention: the timm drop-in, its dictionaries and gradients, the self-attention special case."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import vars_deq as vd
from vars_deq.dictionaries.conv import StaticAtoms
from vars_deq.layers.vars_attention import DICTIONARY_KINDS

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DIM, HEADS = 16, 2
GRID = 9  # a 3 x 3 token grid


def _tokens(n: int, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layer(**kw) -> vd.VARSAttention:
    torch.manual_seed(0)
    return vd.VARSAttention(DIM, num_heads=HEADS, **kw)


def test_accepts_every_timm_attention_keyword():
    timm_params = set(inspect.signature(Attention.__init__).parameters) - {"self"}
    ours = inspect.signature(vd.VARSAttention.__init__).parameters
    assert timm_params <= set(ours)
    for name in timm_params - {"dim"}:
        assert ours[name].default == inspect.signature(Attention.__init__).parameters[name].default, name
    fwd = inspect.signature(vd.VARSAttention.forward).parameters
    assert list(fwd)[:4] == ["self", "x", "attn_mask", "is_causal"]


def test_defaults_follow_the_original_code():
    layer = _layer()
    sr = layer.vars
    assert (layer.dictionary_kind, sr.solver, sr.max_steps, sr.tol, sr.backward.name) == ("sd", "ista", 5, None, "unroll")
    assert float(sr.lam) == pytest.approx(0.3)
    assert layer.q is not None and not hasattr(layer, "k") and not hasattr(layer, "qkv")


@pytest.mark.filterwarnings("error::vars_deq.ConvergenceWarning")
@pytest.mark.parametrize("backward", ["unroll", "implicit", "phantom"])
@pytest.mark.parametrize("kind", DICTIONARY_KINDS)
def test_forward_backward_every_parameter_gets_gradient(kind, backward):
    # the implicit gradient needs a (near) equilibrium: an early iterate's support can exceed the
    # token count, which makes the active-set adjoint system singular
    extra = {"on_unconverged": "ignore", "max_steps": 300} if backward == "implicit" else {}
    layer = _layer(dictionary=kind, backward=backward, learn_lam=True, qkv_bias=True, num_prefix_tokens=1, **extra)
    x = _tokens(1 + GRID).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    params = dict(layer.named_parameters())
    expected = {"v.weight", "v.bias", "proj.weight", "proj.bias", "vars.lam_raw"}
    if "d" in kind:
        expected |= {"q.weight", "q.bias"}
    if "s" in kind:
        expected.add("vars.dictionary.kernels" if kind == "s" else "vars.dictionary.b.kernels")
    assert set(params) == expected
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    stats = layer.last_stats
    assert set(stats) == {"steps", "residual", "converged"}
    # a fixed-step forward (unroll's preset) runs max_steps; a forward with a tol (the DEQ preset) stops early
    steps = float(stats["steps"])
    assert (steps == layer.vars.max_steps) if layer.vars.tol is None else (1 <= steps <= layer.vars.max_steps)
    assert 0.0 <= float(stats["converged"]) <= 1.0


@pytest.mark.parametrize("kind", ["s", "sd"])
def test_static_atoms_fft_and_dense_agree(kind):
    x = _tokens(1 + 16, dtype=torch.float64)
    out = {}
    for impl in ("fft", "dense"):
        layer = _layer(dictionary=kind, static_impl=impl, num_prefix_tokens=1, kernel_size=3).double()
        out[impl] = layer(x)
    torch.testing.assert_close(out["fft"], out["dense"], rtol=1e-9, atol=1e-10)


def test_timm_block_options_are_honoured():
    layer = _layer(qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm, dim_out=12, attn_head_dim=5)
    x = _tokens(1 + GRID)
    y = layer(x)
    assert y.shape == (2, 1 + GRID, 12) and layer.q.out_features == 2 * 5
    assert isinstance(layer.q_norm, nn.LayerNorm) and isinstance(layer.norm, nn.LayerNorm)
    y.sum().backward()
    for name in ("q_norm.weight", "norm.weight", "gate.weight"):
        assert dict(layer.named_parameters())[name].grad.abs().sum() > 0, name


def test_self_attention_special_case_is_unnormalized_linear_attention():
    """Dynamic atoms, zero steps, lam 0, encode init: D z = phi(Q) phi(Q)^T V (atoms normalized over tokens)."""
    layer = _layer(dictionary="d", max_steps=0, lam=0.0, num_features=24).double()
    x = _tokens(7, dtype=torch.float64)
    B, N, _ = x.shape
    d = DIM // HEADS
    # the reference, from the Performer formula and the layer's weights only
    q = (x @ layer.q.weight.T).reshape(B, N, HEADS, d).transpose(1, 2)
    v = (x @ layer.v.weight.T).reshape(B, N, HEADS, d).transpose(1, 2)
    u = q / q.norm(dim=-1, keepdim=True)
    w = layer.vars.dictionary.projection.double()  # (H, m, d), the fixed Gaussian
    m = w.shape[1]
    phi = torch.exp(torch.einsum("bhnd,hmd->bhnm", u, w) - 0.5 * (u * u).sum(-1, keepdim=True)) / math.sqrt(m)
    phi = phi / phi.norm(dim=-2, keepdim=True)
    expected = phi @ (phi.transpose(-1, -2) @ v)
    torch.testing.assert_close(layer.reconstruct(x), expected, rtol=1e-10, atol=1e-12)
    merged = expected.transpose(1, 2).reshape(B, N, DIM)
    torch.testing.assert_close(layer(x), merged @ layer.proj.weight.T + layer.proj.bias, rtol=1e-10, atol=1e-12)


def test_self_attention_special_case_without_atom_normalization():
    """The literal identity: unnormalized features, so D D^T V = phi(Q) (phi(Q)^T V)."""
    layer = _layer(dictionary="d", max_steps=0, lam=0.0).double()
    atoms = vd.PerformerDictionary(DIM // HEADS, num_heads=HEADS, normalize_atoms=False, seed=3)
    layer.vars.dictionary = atoms.double()
    x = _tokens(5, dtype=torch.float64)
    q = layer.q(x).reshape(2, 5, HEADS, -1).transpose(1, 2)
    v = layer.v(x).reshape(2, 5, HEADS, -1).transpose(1, 2)
    u = torch.nn.functional.normalize(q, dim=-1)
    w = layer.vars.dictionary.projection
    phi = torch.exp(u @ w.transpose(-1, -2) - 0.5) / math.sqrt(w.shape[1])  # |u| = 1
    torch.testing.assert_close(layer.reconstruct(x), phi @ phi.transpose(-1, -2) @ v, rtol=1e-10, atol=1e-12)


def _vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=12, patch_size=4, in_chans=1, num_classes=3, embed_dim=DIM, depth=1, num_heads=HEADS,
                attn_layer=vd.VARSAttention)
    return VisionTransformer(**{**args, **kw})


def test_drop_in_with_dynamic_image_size():
    model = _vit(dynamic_img_size=True)
    attn = model.blocks[0].attn
    for side in (12, 20):
        out = model(torch.randn(2, 1, side, side))
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        # the grid follows the image: (side/4)^2 grid tokens plus the class token
        assert attn.grid_prefix(1 + (side // 4) ** 2) == 1
        # the inferred count is passed to the static atoms per call, never written into the module
        assert attn.static_atoms.num_prefix_tokens == 0


@pytest.mark.parametrize("class_token,reg_tokens", [(True, 0), (True, 3), (False, 2), (False, 0)])
def test_prefix_tokens_inferred_equal_given(class_token, reg_tokens):
    """A plain VisionTransformer(attn_layer=VARSAttention) infers the prefix tokens; the result equals
    the layer told the count explicitly (what the registered models and convert_vit do)."""
    kw = dict(class_token=class_token, reg_tokens=reg_tokens, global_pool="token" if class_token else "avg")
    model = _vit(**kw)
    x = torch.randn(2, 1, 12, 12)
    inferred = model(x)
    attn = model.blocks[0].attn
    assert attn.grid_prefix(x.shape[-1] ** 2 // 16 + model.num_prefix_tokens) == model.num_prefix_tokens
    assert model.num_prefix_tokens == int(class_token) + reg_tokens
    attn.num_prefix_tokens = model.num_prefix_tokens
    torch.testing.assert_close(model(x), inferred)
    assert torch.isfinite(inferred).all()


def test_prefix_tokens_get_identity_atoms_in_the_static_dictionary():
    """With lam = 0 and enough steps, a static-only layer reconstructs the prefix tokens exactly."""
    layer = _layer(dictionary="s", lam=0.0, max_steps=200, num_prefix_tokens=2).double()
    x = _tokens(2 + GRID, dtype=torch.float64)
    v = layer.v(x).reshape(2, 2 + GRID, HEADS, -1).transpose(1, 2)
    rec = layer.reconstruct(x)
    torch.testing.assert_close(rec[:, :, :2], v[:, :, :2], rtol=1e-6, atol=1e-8)


def test_configure_reaches_the_solver():
    layer = _layer()
    layer.configure(solver="fista", max_steps=3, backward="phantom", lam=0.1)
    assert (layer.vars.solver, layer.vars.max_steps, layer.vars.backward.name) == ("fista", 3, "phantom")
    layer(_tokens(1 + GRID))
    assert float(layer.last_stats["steps"]) == 3


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 10), (2, 10, DIM + 1), (1, 2, 10, DIM)])
def test_wrong_input_shape(shape):
    with pytest.raises(ValueError, match=r"\(B, N, dim=16\)"):
        _layer()(torch.randn(*shape))


def test_unknown_dictionary_kind():
    with pytest.raises(ValueError, match="dictionary must be one of"):
        _layer(dictionary="dense")


def test_static_dictionary_on_non_grid_token_count():
    layer = _layer(dictionary="s", num_prefix_tokens=1)
    with pytest.raises(ValueError, match="not a square grid"):
        layer(_tokens(1 + 10))
    with pytest.raises(ValueError, match="not a square grid"):
        _layer(dictionary="sd", num_prefix_tokens=0)(_tokens(7))
    # the dynamic atoms need no grid
    assert _layer(dictionary="d", num_prefix_tokens=1)(_tokens(11)).shape == (2, 11, DIM)


def test_attn_mask_and_causal_are_refused():
    layer = _layer()
    x = _tokens(1 + GRID)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=torch.zeros(1 + GRID, 1 + GRID, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, is_causal=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(attn_drop=0.1), "attn_drop"),
        (dict(qk_norm=True), "norm_layer"),
        (dict(dictionary="s", qk_norm=True, norm_layer=nn.LayerNorm), "qk_norm"),
        (dict(dictionary="d", num_kernels=2), "num_kernels"),
        (dict(dictionary="s", num_features=8), "num_features"),
        (dict(static_impl="sparse"), "static_impl"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens"),
        (dict(solver="newton"), "solver"),
        (dict(backward="adjoint"), "backward"),
        (dict(lipschitz="guess"), "lipschitz"),
        (dict(adjoint_tol=0), "adjoint_tol"),
        (dict(warm_start=True), "warm_start"),
    ],
)
def test_bad_keywords(kw, match):
    with pytest.raises(ValueError, match=match):
        _layer(**kw)


def test_static_atoms_keep_the_conv_dictionary_state():
    """StaticAtoms is a ConvDictionary: same parameters and state_dict keys, only the product differs."""
    a = StaticAtoms(2, 3, num_heads=HEADS, impl="dense")
    b = vd.ConvDictionary(2, 3, num_heads=HEADS)
    assert set(a.state_dict()) == set(b.state_dict())


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_materialized_static_atoms_keep_a_valid_lipschitz_bound(padding):
    """The dense static operator reuses the convolution's bound: exact for circular padding, an
    upper bound for zero padding, per problem after flattening to the batch."""
    atoms = StaticAtoms(2, 3, num_heads=HEADS, padding=padding, num_prefix_tokens=1, impl="dense").double()
    op = atoms(torch.zeros(3, HEADS, 1 + 16, 4, dtype=torch.float64)).flatten((3, HEADS))
    assert isinstance(op, vd.DictionaryOperator)
    true = torch.linalg.matrix_norm(op.materialize(), ord=2) ** 2  # (3 * HEADS,)
    bound = op.lipschitz("exact")
    assert bound.shape == true.shape and bool((bound >= true * (1 - 1e-9)).all())
    if padding == "circular":
        torch.testing.assert_close(bound, true)
    assert bool((op.lipschitz("gershgorin") >= true * (1 - 1e-9)).all())
    picked = op.take(torch.tensor([1, 4]))
    torch.testing.assert_close(picked.lipschitz("exact"), bound[[1, 4]])

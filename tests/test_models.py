"""Registered VARS models, convert_vit and attention_maps."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import Attention
from torch import nn

import vars_deq as vd
import vars_deq.models  # noqa: F401  (registers the models)
from vars_deq.models import ConvStemPatchEmbed, PerformerAttention

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KINDS = ("s", "d", "sd")
DEIT_NAMES = [f"vars_{k}_deit_{s}_patch16_224" for k in KINDS for s in ("tiny", "small")] + [
    f"performer_deit_{s}_patch16_224" for s in ("tiny", "small")
]
DIGITS_NAMES = ["vars_sd_digits", "vars_s_digits", "vars_d_digits", "deit_digits", "performer_digits"]
TINY_DEIT = dict(img_size=32, depth=1)  # a 2 x 2 grid, one block: the skeleton, cheaply


def _create(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw)


def _digits(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _attn_kind(model) -> set[type]:
    return {type(b.attn) for b in model.blocks}


def test_every_name_is_registered():
    names = set(timm.list_models())
    assert set(DEIT_NAMES + DIGITS_NAMES) <= names


@pytest.mark.parametrize("name", DEIT_NAMES)
def test_deit_skeletons_build_and_run(name):
    model = _create(name, **TINY_DEIT)
    ref = timm.create_model("deit_small_patch16_224" if "small" in name else "deit_tiny_patch16_224", **TINY_DEIT)
    kind = name.split("_")[1]
    # VARS-S codes each channel on its own, as the original (groups = dim): one head per channel
    heads = ref.embed_dim if kind == "s" else ref.blocks[0].attn.num_heads
    assert model.embed_dim == ref.embed_dim and model.blocks[0].attn.num_heads == heads
    expected = PerformerAttention if name.startswith("performer") else vd.VARSAttention
    assert _attn_kind(model) == {expected}
    # every starred model has the convolutional stem the paper used
    assert isinstance(model.patch_embed, ConvStemPatchEmbed)
    if expected is vd.VARSAttention:
        attn = model.blocks[0].attn
        assert attn.dictionary_kind == kind and attn.num_prefix_tokens == model.num_prefix_tokens
        # the original VARS models (RVT skeletons) have no class token and pool the average
        assert model.num_prefix_tokens == 0 and model.global_pool == "avg"
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_digits_models(name):
    model = _create(name)
    assert model.pretrained_cfg["input_size"] == (1, 8, 8) and model.num_classes == 10
    assert model.patch_embed.grid_size == (4, 4)
    expected = {"deit": Attention, "perf": PerformerAttention}.get(name[:4], vd.VARSAttention)
    assert _attn_kind(model) == {expected}
    x = _digits(3).requires_grad_()
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_layer_options_reach_every_vars_layer():
    model = _create("vars_sd_digits", solver="fista", max_steps=3, lam=0.1, backward="phantom", num_kernels=2,
                    lipschitz="gershgorin", learn_lam=True, static_atoms="conv")
    layers = [b.attn for b in model.blocks]
    assert len(layers) == 4
    for attn in layers:
        sr = attn.vars
        assert (sr.solver, sr.max_steps, sr.backward, sr.lipschitz, sr.learn_lam) == ("fista", 3, vd.Phantom(),
                                                                                      "gershgorin", True)
        assert float(sr.lam.detach()) == pytest.approx(0.1, rel=1e-5)
        assert attn.static_atoms.num_kernels == 2 and attn.static_atoms.kernel_size == 3
    model(_digits())
    assert [s["steps"] for s in vd.layer_stats(model)] == [3.0] * 4


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("deit_digits", dict(solver="fista"), "no VARS layers"),
        ("performer_digits", dict(lam=0.1), "no VARS layers"),
        ("vars_sd_digits", dict(dictionary="s"), "fixes the dictionary"),
        ("vars_d_digits", dict(num_kernels=2), "num_kernels"),
        ("vars_sd_digits", dict(solver="newton"), "solver"),
        ("vars_sd_digits", dict(pretrained=True), "no published weights"),
    ],
)
def test_bad_model_keywords(name, kw, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model(name, **kw)


@pytest.mark.parametrize("name", ["vars_sd_digits", "vars_s_digits", "performer_digits", "deit_digits"])
def test_timm_model_api(name, tmp_path):
    model = _create(name).eval()
    x = _digits()
    feats = model.forward_features(x)
    assert feats.shape == (2, 16 + model.num_prefix_tokens, 64)
    final, inter = model.forward_intermediates(x, indices=2)
    assert len(inter) == 2 and inter[0].shape == (2, 64, 4, 4)
    torch.testing.assert_close(final, feats)
    logits = model(x)
    # state_dict round trip into a differently initialized model
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    other = timm.create_model(name)
    other.load_state_dict(torch.load(path))
    torch.testing.assert_close(other.eval()(x), logits)
    # and back through timm's pretrained loading from a local file
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(loaded(x), logits)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_conv_stem():
    model = _create("vars_sd_deit_tiny_patch16_224", conv_stem=True, **TINY_DEIT)
    assert isinstance(model.patch_embed, ConvStemPatchEmbed)
    strides = [m.stride[0] for m in model.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert strides == [2, 2, 2, 2, 1] and math.prod(strides) == 16
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    digits = _create("vars_sd_digits", conv_stem=True)
    assert digits.forward_features(_digits()).shape == (2, 16, 64)  # no class token, as the original
    with pytest.raises(ValueError, match="power-of-two"):
        _create("deit_digits", conv_stem=True, patch_size=3, img_size=9)


# -- convert_vit -----------------------------------------------------------------------------


def _check_copied(old_attn: Attention, new: vd.VARSAttention) -> None:
    A = old_attn.attn_dim
    w, b = old_attn.qkv.weight, old_attn.qkv.bias
    if new.q is not None:
        assert torch.equal(new.q.weight, w[:A]) and torch.equal(new.q.bias, b[:A])
    assert torch.equal(new.v.weight, w[2 * A:]) and torch.equal(new.v.bias, b[2 * A:])
    assert torch.equal(new.proj.weight, old_attn.proj.weight) and torch.equal(new.proj.bias, old_attn.proj.bias)


CONVERT_CASES = [
    ("deit_tiny_patch16_224", dict(img_size=32, depth=2)),
    ("vit_tiny_patch16_224", dict(img_size=48, depth=2, reg_tokens=4)),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=1, reg_tokens=2, global_pool="avg")),
    ("vit_small_patch16_224", dict(img_size=32, depth=1, class_token=False, global_pool="avg")),
]


@pytest.mark.parametrize(
    "name,kw,kind",
    [(n, kw, k) for n, kw in CONVERT_CASES for k in KINDS if k != "s" or kw.get("global_pool") == "avg"],
)
def test_convert_vit(name, kw, kind):
    model = _create(name, **kw)
    originals = [b.attn for b in model.blocks]
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    out = vd.convert_vit(model, dictionary=kind, max_steps=2, lam=0.2)
    assert out is model
    for old, block in zip(originals, model.blocks):
        new = block.attn
        assert isinstance(new, vd.VARSAttention) and new.dictionary_kind == kind
        assert new.num_prefix_tokens == model.num_prefix_tokens and new.vars.max_steps == 2
        _check_copied(old, new)
    y = model(x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_convert_vit_keeps_norms_and_mode():
    model = _create("vit_tiny_patch16_224", img_size=32, depth=1, qk_norm=True)
    model.eval()
    old = model.blocks[0].attn
    with torch.no_grad():
        old.q_norm.weight.uniform_()
    vd.convert_vit(model, "sd")
    new = model.blocks[0].attn
    assert not new.training and torch.equal(new.q_norm.weight, old.q_norm.weight)


@pytest.mark.parametrize("name,kw", [c for c in CONVERT_CASES if c[1].get("global_pool") != "avg"])
def test_convert_vit_refuses_static_only_with_class_token_pooling(name, kw):
    with pytest.raises(ValueError, match="class-token classifier would never see the image"):
        vd.convert_vit(_create(name, **kw), dictionary="s")


def test_convert_vit_errors():
    with pytest.raises(ValueError, match="blocks"):
        vd.convert_vit(nn.Linear(2, 2))
    model = _create("deit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match="dictionary must be one of"):
        vd.convert_vit(model, dictionary="x")
    vd.convert_vit(model)
    with pytest.raises(ValueError, match="already has VARSAttention"):
        vd.convert_vit(model)
    with pytest.raises(ValueError, match="reads num_prefix_tokens"):
        vd.convert_vit(_create("deit_tiny_patch16_224", img_size=32, depth=1), num_prefix_tokens=0)


def test_converted_self_attention_case_matches_linear_attention_model():
    """After conversion with dynamic atoms, zero steps and lam 0, a layer is linear attention with
    K = Q: its reconstruction equals phi(Q) phi(Q)^T V from the original qkv weights."""
    model = _create("deit_tiny_patch16_224", img_size=32, depth=1).double()
    old = model.blocks[0].attn
    vd.convert_vit(model, "d", max_steps=0, lam=0.0)
    new = model.blocks[0].attn
    x = torch.randn(2, 5, 192, dtype=torch.float64)
    qkv = old.qkv(x).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    phi = new.vars.dictionary.atoms(qkv[0])
    torch.testing.assert_close(new.reconstruct(x), phi @ (phi.transpose(-1, -2) @ qkv[2]))


# -- Performer baseline ----------------------------------------------------------------------


def test_performer_attention_approximates_softmax_attention():
    """FAVOR+ is an unbiased estimate of the softmax kernel: with many features it nears exact attention."""
    torch.manual_seed(0)
    perf = PerformerAttention(16, num_heads=2, num_features=8192).double()
    exact = Attention(16, num_heads=2).double()
    exact.load_state_dict(perf.state_dict(), strict=False)
    x = 0.5 * torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(perf(x), exact(x), rtol=0.05, atol=0.02)
    weights = perf.attention_weights(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))


# -- attention maps --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_attention_maps_shape_range_and_model_unchanged(name):
    # at init, VARS-S's lam 0.3 can leave an image's code in a layer all zero, whose map is then
    # constant: a smaller lam keeps every map informative for the range check
    model = _create(name, **({"lam": 0.1} if name == "vars_s_digits" else {}))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    maps = vd.attention_maps(model, _digits(3))
    assert maps.shape == (3, 4, 4, 4)
    assert maps.min() >= 0 and maps.max() <= 1
    flat = maps.flatten(2)
    assert torch.allclose(flat.amin(-1), torch.zeros(3, 4)) and torch.allclose(flat.amax(-1), torch.ones(3, 4))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_self_attention_map_is_the_class_token_attention():
    model = _create("deit_digits").eval()
    x = _digits(2)
    maps = vd.attention_maps(model, x)
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        attn = model.blocks[0].attn
        h = model.blocks[0].norm1(tokens)
        q, k, _ = attn.qkv(h).reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        cls = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1)[:, :, 0, 1:].mean(1)  # (B, 16)
    ref = (cls - cls.amin(-1, keepdim=True)) / (cls.amax(-1, keepdim=True) - cls.amin(-1, keepdim=True))
    torch.testing.assert_close(maps[:, 0].reshape(2, 16), ref, rtol=1e-5, atol=1e-6)


def test_vars_map_is_the_reconstruction_norm():
    model = _create("vars_sd_digits").eval()
    x = _digits(2)
    maps = vd.attention_maps(model, x)
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        rec = model.blocks[0].attn.reconstruct(model.blocks[0].norm1(tokens))  # (B, H, N, d)
    norm = rec.pow(2).sum((1, 3)).sqrt()[:, model.num_prefix_tokens:]
    ref = (norm - norm.amin(-1, keepdim=True)) / (norm.amax(-1, keepdim=True) - norm.amin(-1, keepdim=True))
    torch.testing.assert_close(maps[:, 0].reshape(2, 16), ref, rtol=1e-5, atol=1e-6)


def test_attention_maps_dynamic_size_and_no_class_token():
    # free static atoms hold one token count (as the original's); conv templates follow the image size
    model = _create("vars_sd_deit_tiny_patch16_224", img_size=32, depth=2, dynamic_img_size=True,
                    class_token=False, reg_tokens=1, global_pool="avg", static_atoms="conv")
    maps = vd.attention_maps(model, torch.randn(1, 3, 48, 48))
    assert maps.shape == (1, 2, 3, 3)
    d_model = _create("vars_d_deit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_size=True)
    assert vd.attention_maps(d_model, torch.randn(1, 3, 48, 64)).shape == (1, 1, 3, 4)  # no grid needed
    sa = _create("deit_tiny_patch16_224", img_size=32, depth=1, class_token=False, global_pool="avg")
    assert vd.attention_maps(sa, torch.randn(1, 3, 32, 32)).shape == (1, 1, 2, 2)


def test_attention_maps_bad_input():
    model = _create("deit_digits")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vd.attention_maps(model, torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="blocks"):
        vd.attention_maps(nn.Linear(2, 2), torch.rand(1, 1, 8, 8))

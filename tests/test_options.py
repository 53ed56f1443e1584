"""One declaration of the VARS layer options: every option reaches every layer from each entry point."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vars_deq as vd
from vars_deq.backward import FLAT_BACKWARD_KEYS
from vars_deq.dictionaries import PerformerDictionary
from vars_deq.models import VARS_LAYER_KEYS
from vars_deq.train.factory import LAYER_OPTIONS

# option -> (a non-default value, what the layer reports for it)
CHECKS = {
    "lam": (0.2, lambda a: round(float(a.vars.lam), 6)),
    "solver": ("fista", lambda a: a.vars.solver),
    "max_steps": (3, lambda a: a.vars.max_steps),
    "tol": (1e-3, lambda a: a.vars.tol),
    "backward": (vd.Phantom(steps=2), lambda a: a.vars.backward),
    "lipschitz": ("power", lambda a: a.vars.lipschitz),
    "nonneg": (True, lambda a: a.vars.nonneg),
    "learn_lam": (True, lambda a: a.vars.learn_lam),
    "init": ("zeros", lambda a: a.vars.init),
    "lipschitz_margin": (0.5, lambda a: a.vars.margin),
    "static_atoms": ("free", lambda a: type(a.static_atoms).__name__),
    "num_tokens": (16, lambda a: a.static_atoms.num_tokens),
    "num_kernels": (2, lambda a: a.static_atoms.num_kernels),
    "kernel_size": (1, lambda a: a.static_atoms.kernel_size),
    "padding": ("zero", lambda a: a.static_atoms.padding),
    "static_impl": ("fft", lambda a: a.static_atoms.impl),
    "num_features": (6, lambda a: a.dynamic_atoms.num_features),
    "orthogonal": (True, lambda a: a.dynamic_atoms.orthogonal),
    "feature_seed": (3, lambda a: bool(torch.equal(
        a.dynamic_atoms.projection, PerformerDictionary(a.head_dim, num_heads=a.num_heads, seed=3).projection))),
    "adjoint": ("fixed_point", lambda a: a.vars.backward.adjoint),
    "adjoint_tol": (1e-5, lambda a: a.vars.backward.tol),
    "adjoint_max_steps": (17, lambda a: a.vars.backward.max_steps),
    "adjoint_ridge": (0.25, lambda a: a.vars.backward.ridge),
    "on_unconverged": ("ignore", lambda a: a.vars.backward.on_unconverged),
    "phantom_steps": (4, lambda a: a.vars.backward.steps),
    "tau": (0.5, lambda a: a.vars.backward.tau),
}
EXPECTED = {"feature_seed": True, "lam": 0.2, "static_atoms": "FreeAtoms"}
#: options that need another to mean anything
COMPANIONS = {"num_tokens": {"static_atoms": "free"}, "static_atoms": {"num_tokens": 16}}
#: the registered VARS-SD models have free static atoms: the conv template options need "conv"
CONV_OPTIONS = ("num_kernels", "kernel_size", "padding", "static_impl")


def _kwargs(name):
    value = CHECKS[name][0]
    kw = {name: value, **COMPANIONS.get(name, {})}
    if name in FLAT_BACKWARD_KEYS:  # flat backward keywords refine the backward they belong to
        kw["backward"] = FLAT_BACKWARD_KEYS[name]
    return kw


def _check(layers, name):
    value, read = CHECKS[name]
    assert layers, "no VARS layers"
    for attn in layers:
        assert read(attn) == EXPECTED.get(name, value), name


def test_the_checks_cover_every_declared_option():
    assert set(CHECKS) == set(VARS_LAYER_KEYS)
    assert set(LAYER_OPTIONS) <= set(VARS_LAYER_KEYS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_option_reaches_the_layers_from_create_model(name):
    kw = _kwargs(name)
    if name in CONV_OPTIONS:
        kw["static_atoms"] = "conv"
    model = timm.create_model("vars_sd_digits", **kw)
    _check([b.attn for b in model.blocks], name)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_option_reaches_the_layers_from_convert_vit(name):
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    vd.convert_vit(model, "sd", **_kwargs(name))
    _check([b.attn for b in model.blocks], name)


@pytest.mark.parametrize("name", sorted(LAYER_OPTIONS))
def test_every_runtime_option_reaches_the_layers_from_configure_layers(name):
    model = timm.create_model("vars_sd_digits")
    vd.configure_layers(model, **_kwargs(name))
    _check([b.attn for b in model.blocks], name)


def test_create_model_takes_a_backward_object_and_flat_adjoint_ridge():
    model = timm.create_model("vars_sd_digits", backward=vd.Implicit(ridge=1e-3, adjoint="cg"))
    assert all(b.attn.vars.backward == vd.Implicit(ridge=1e-3, adjoint="cg") for b in model.blocks)
    model = timm.create_model("vars_sd_digits", backward="implicit", adjoint_ridge=1e-2)
    assert all(b.attn.vars.backward.ridge == 1e-2 for b in model.blocks)


def test_a_flat_option_of_another_backward_is_refused():
    with pytest.raises(ValueError, match="configure backward 'phantom', but backward is 'implicit'"):
        timm.create_model("vars_sd_digits", backward="implicit", phantom_steps=3)


@pytest.mark.parametrize("name", sorted(LAYER_OPTIONS))
def test_every_runtime_option_reaches_the_layers_from_the_command_line(name):
    from vars_deq.cli import build_parser
    from vars_deq.cli.layer_options import layer_options

    kw = _kwargs(name)
    if name == "backward":
        kw, expected = {"backward": "phantom"}, vd.Phantom()
    else:
        expected = EXPECTED.get(name, CHECKS[name][0])
    argv = ["train"]
    for k, v in kw.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    options = layer_options(build_parser().parse_args(argv))
    assert set(options) == set(kw)
    model = timm.create_model("vars_sd_digits")
    vd.configure_layers(model, **options)
    for attn in (b.attn for b in model.blocks):
        assert CHECKS[name][1](attn) == expected, name


def test_an_undamped_implicit_backward_on_more_atoms_than_tokens_warns_at_construction():
    """VARS-SD digits: 64 atoms (32 Performer + 32 free) over 16 tokens. Undamped (ridge 0) the
    support Gram of a support larger than 16 is singular: the layer says so when built; damped, by
    name or with a ridge, or where the token count is not fixed (VARS-S's convolutional templates), it does not."""
    import warnings

    from vars_deq.layers.sparse_reconstruction import fixed_counts

    model = timm.create_model("vars_sd_digits")
    assert fixed_counts(model.blocks[0].attn.vars.dictionary) == (16, 64)
    with pytest.warns(UserWarning, match=r"undamped implicit backward \(adjoint_ridge=0\) on a layer of 64 atoms "
                                         r"over 16 tokens.*adjoint_ridge > 0"):
        timm.create_model("vars_sd_digits", backward=vd.Implicit())
    with pytest.warns(UserWarning, match="undamped"):
        vd.configure_layers(model, backward="implicit", adjoint_ridge=0.0)
    conv = vd.VARSAttention(16, 2, dictionary="s")
    assert fixed_counts(conv.vars.dictionary) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timm.create_model("vars_sd_digits", backward="implicit")
        timm.create_model("vars_sd_digits", backward=vd.Implicit(ridge=1e-3))
        vd.VARSAttention(16, 2, dictionary="s", backward=vd.Implicit())
        vd.configure_layers(model, tol=1e-3)  # the backward is kept: nothing new to warn about

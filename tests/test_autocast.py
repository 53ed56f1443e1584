"""bf16 autocast: every registered model gives finite outputs and gradients."""

from __future__ import annotations

import pytest
import timm
import torch

import vars_deq  # noqa: F401  (registers the models)

DIGITS = ["vars_s_digits", "vars_d_digits", "vars_sd_digits", "deit_digits", "performer_digits"]
DEIT = [f"vars_{k}_deit_{s}_patch16_224" for k in ("s", "d", "sd") for s in ("tiny", "small")] + [
    f"performer_deit_{s}_patch16_224" for s in ("tiny", "small")]


@pytest.mark.parametrize("name", DIGITS + DEIT)
@pytest.mark.parametrize("backward", ["unroll", "implicit"])
def test_bf16_autocast_outputs_and_gradients_are_finite(name, backward):
    torch.manual_seed(0)
    small = {} if name in DIGITS else dict(img_size=32, depth=1)
    vars_kw = {"backward": backward} if name.startswith("vars_") else {}
    if not vars_kw and backward == "implicit":
        pytest.skip("no VARS layers: one run is enough")
    model = timm.create_model(name, **small, **vars_kw)
    x = torch.rand(2, *model.pretrained_cfg["input_size"][:1], *(8, 8) if name in DIGITS else (32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > len(grads) // 2
    assert all(torch.isfinite(g).all() for g in grads if g is not None)

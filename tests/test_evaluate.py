"""Corruptions, PGD and the robustness evaluation loop."""

import json

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import vars_deq as vd
from vars_deq.data import load_digits_split
from vars_deq.eval import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt, evaluate_model, format_table, pgd_attack

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)




@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def images(digits):
    return digits[1].tensors[0][:64]


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    """A tiny ViT trained for two epochs on digits (well above chance)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x, y = digits[0].tensors
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_range_shape_determinism_and_effect(name, images):
    for s in SEVERITIES:
        a = corrupt(images, name, s, seed=3)
        assert a.shape == images.shape and a.dtype == images.dtype
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, corrupt(images, name, s, seed=3))
        # impulse noise at 3% of 64 pixels misses the ink of some 8x8 images at severity 1
        changed = float((a != images).flatten(1).any(dim=1).float().mean())
        assert changed >= (1.0 if s == 5 else 0.5), f"{name} sev {s} changed only {changed:.0%} of the images"


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_severity_is_monotone(name, images):
    d = [float((corrupt(images, name, s, seed=1) - images).flatten(1).norm(dim=1).mean()) for s in SEVERITIES]
    assert all(b > a for a, b in zip(d, d[1:])), f"{name}: distances {d}"


def test_corruption_seed_matters_for_noise_only(images):
    for name in FAMILIES["noise"]:
        assert not torch.equal(corrupt(images, name, 3, seed=0), corrupt(images, name, 3, seed=1))
    for name in FAMILIES["blur"] + FAMILIES["digital"]:
        assert torch.equal(corrupt(images, name, 3, seed=0), corrupt(images, name, 3, seed=1))


def test_corruption_rgb_and_large_images():
    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        y = corrupt(x, name, 5, seed=0)
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1 and not torch.equal(x, y)


def test_brightness_keeps_hue_and_contrast_keeps_mean():
    x = torch.tensor([0.2, 0.4, 0.1]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    y = corrupt(x, "brightness", 2)
    assert torch.allclose(y / y.amax(1, keepdim=True), x / x.amax(1, keepdim=True))  # chromaticity kept
    assert torch.allclose(y.amax(1), x.amax(1) + 0.2)
    z = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    c = corrupt(z, "contrast", 4)
    assert torch.allclose(c.mean(dim=(1, 2, 3)), z.mean(dim=(1, 2, 3)), atol=1e-6)


def test_corrupt_rejects_bad_arguments(images):
    with pytest.raises(ValueError, match="corruption must be one of"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        corrupt(images[0], "contrast", 1)


def test_pgd_stays_in_ball_and_range_and_hurts(trained, digits):
    x, y = digits[1].tensors[0][:200], digits[1].tensors[1][:200]
    eps = 0.1
    x_adv = pgd_attack(trained, x, y, eps=eps, steps=5, generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    with torch.no_grad():
        clean = float((trained(x).argmax(-1) == y).float().mean())
        adv = float((trained(x_adv).argmax(-1) == y).float().mean())
    assert clean > 0.5
    assert adv < clean
    # the attack leaves parameter gradients alone
    assert all(p.grad is None for p in trained.parameters())


def test_pgd_zero_eps_is_identity_and_bad_args(trained, images):
    y = torch.zeros(len(images), dtype=torch.long)
    assert torch.equal(pgd_attack(trained, images, y, eps=0.0, steps=3), images)
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(trained, images, y, eps=-1.0)
    with pytest.raises(ValueError, match="steps"):
        pgd_attack(trained, images, y, eps=0.1, steps=-1)


def test_evaluate_model_results(trained, digits):
    r = evaluate_model(trained, digits[1], corruptions=["gaussian_noise", "contrast", "pixelate"],
                       severities=[1, 5], pgd_eps=0.1, pgd_steps=3, limit=100, batch_size=40, seed=0)
    assert r["num_examples"] == 100
    assert set(r["corruptions"]) == {"gaussian_noise", "contrast", "pixelate"}
    assert set(r["families"]) == {"noise", "digital"}
    for c in r["corruptions"].values():
        assert set(c["severity"]) == {"1", "5"}
        assert c["mean"] == pytest.approx(sum(c["severity"].values()) / 2)
    assert r["families"]["digital"] == pytest.approx((r["corruptions"]["contrast"]["mean"]
                                                      + r["corruptions"]["pixelate"]["mean"]) / 2)
    assert r["corruption_mean"] == pytest.approx(sum(r["families"].values()) / 2)
    # severity 5 of these corruptions hurts a digits classifier
    for name in ("gaussian_noise", "contrast", "pixelate"):
        assert r["corruptions"][name]["severity"]["5"] < r["clean_acc"]
    assert r["pgd"]["acc"] <= r["clean_acc"]
    assert r["pgd"]["step_size"] == pytest.approx(2.5 * 0.1 / 3)
    json.dumps(r)
    # batching and order do not change anything: corruption noise is seeded per batch index,
    # and the same batches give the same numbers
    again = evaluate_model(trained, digits[1], corruptions=["gaussian_noise", "contrast", "pixelate"],
                           severities=[1, 5], pgd_eps=0.1, pgd_steps=3, limit=100, batch_size=40, seed=0)
    assert again == r
    table = format_table(r)
    assert "clean accuracy" in table and "gaussian_noise" in table and "mean over families" in table


def test_evaluate_progress_ticks_per_evaluation(trained, digits, capsys):
    # 3 batches x (clean + 2 corruptions x 2 severities + PGD) = 18 ticks, not one per batch
    evaluate_model(trained, digits[1], corruptions=["contrast", "pixelate"], severities=[1, 5], pgd_eps=0.1,
                   pgd_steps=1, limit=100, batch_size=40, progress=True)
    err = capsys.readouterr().err
    assert "/18 " in err and "/3 " not in err
    evaluate_model(trained, digits[1], corruptions=[], pgd_eps=None, limit=100, batch_size=40, progress=True)
    assert "/3 " in capsys.readouterr().err


def test_evaluate_model_rejects_bad_arguments(trained, digits):
    with pytest.raises(ValueError, match="unknown corruption"):
        evaluate_model(trained, digits[1], corruptions=["fog"])
    with pytest.raises(ValueError, match="severities"):
        evaluate_model(trained, digits[1], severities=[0])


class _PerformerVARSAttention(nn.Module):
    """Minimal VARS-D attention for tests: q, v projections; output D(q) z*(v)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, **_):
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.recon = vd.SparseReconstruction(vd.PerformerDictionary(self.d, num_heads=num_heads), lam=0.1,
                                             max_steps=4)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.h, self.d).transpose(1, 2)
        return self.proj(self.recon(v, source=q).transpose(1, 2).reshape(b, n, c))


def test_pgd_differentiates_through_configured_backward(images):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(attn_layer=_PerformerVARSAttention, **TINY).double().eval()
    x, y = images[:16].double(), torch.arange(16) % 10
    grads = {}
    for backward in ("implicit", "unroll", "phantom"):
        vd.configure_layers(model, backward=backward, **({"on_unconverged": "ignore"} if backward == "implicit" else {}))
        x_adv = pgd_attack(model, x, y, eps=0.05, steps=2)
        assert float((x_adv - x).abs().max()) <= 0.05 + 1e-9 and not torch.equal(x_adv, x)
        xg = x.clone().requires_grad_(True)
        (grads[backward],) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
        assert torch.isfinite(grads[backward]).all() and float(grads[backward].abs().max()) > 0
    # 5 ISTA steps are far from the equilibrium, so the three backward rules give different
    # input gradients: the attack really uses the configured one
    assert not torch.allclose(grads["implicit"], grads["unroll"])
    assert not torch.allclose(grads["phantom"], grads["unroll"])

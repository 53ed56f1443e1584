"""Common image corruptions at severities 1-5, in the spirit of ImageNet-C / CIFAR-10-C.

Every corruption maps a batch (B, C, H, W) in [0, 1] to a batch of the same shape in [0, 1], is
deterministic given its ``torch.Generator`` (the noise is drawn on the CPU, so results do not
depend on the device), and gets stronger with the severity. Parameters follow CIFAR-10-C, in
pixels for images up to 32 pixels and scaled with the image side above that, so 8x8 digits and
224x224 images see comparable damage. Families:

    noise    gaussian_noise, shot_noise, impulse_noise
    blur     gaussian_blur, defocus_blur (anti-aliased disk kernel)
    digital  contrast, brightness, pixelate, jpeg
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["CORRUPTIONS", "FAMILIES", "SEVERITIES", "corrupt", "corruption_generator"]

SEVERITIES = (1, 2, 3, 4, 5)

_GAUSSIAN_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
_IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
_BLUR_SIGMA = (0.4, 0.6, 0.8, 1.0, 1.3)
_DEFOCUS_RADIUS = (0.6, 0.8, 1.0, 1.5, 2.0)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_PIXELATE_BLOCKS = ((1, 2), (2, 2), (2, 4), (4, 4), (4, 8))
_JPEG_QUALITY = (25, 18, 15, 10, 7)


def _scale(x: torch.Tensor) -> float:
    """Spatial parameters are in pixels of a 32-pixel image; larger images scale them up."""
    return max(1.0, min(x.shape[-2:]) / 32.0)


def _noise_like(x: torch.Tensor, generator: torch.Generator, kind: str) -> torch.Tensor:
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """x + sigma * n, n ~ N(0, 1)."""
    return (x + _GAUSSIAN_STD[severity - 1] * _noise_like(x, generator, "normal")).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon noise: Poisson(lam * x) / lam, fewer photons at higher severity."""
    lam = _SHOT_PHOTONS[severity - 1]
    counts = torch.poisson(x.detach().float().cpu() * lam, generator=generator)
    return (counts / lam).to(device=x.device, dtype=x.dtype).clamp(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper: a fraction of the values set to 0 or 1 (half each)."""
    amount = _IMPULSE_AMOUNT[severity - 1]
    u = _noise_like(x, generator, "uniform")
    out = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones_like(x), out)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel with a normalized 2-D kernel, reflecting at the border."""
    k = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    r = k.shape[-1] // 2
    c = x.shape[1]
    # reflect padding needs pad < side; replicate keeps tiny images valid when the kernel is large
    mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
    padded = F.pad(x, (r, r, r, r), mode=mode)
    return F.conv2d(padded, k.expand(c, 1, *k.shape), groups=c)


def _grid(radius: int) -> torch.Tensor:
    ax = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return (ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2).sqrt()


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Convolution with a Gaussian of standard deviation sigma (pixels)."""
    sigma = _BLUR_SIGMA[severity - 1] * _scale(x)
    d = _grid(max(1, math.ceil(3 * sigma)))
    return _depthwise(x, torch.exp(-0.5 * (d / sigma) ** 2)).clamp(0, 1)


def defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Convolution with a disk of radius r, anti-aliased: weight clamp(r + 1/2 - |offset|, 0, 1)."""
    radius = _DEFOCUS_RADIUS[severity - 1] * _scale(x)
    d = _grid(max(1, math.ceil(radius + 0.5)))
    return _depthwise(x, (radius + 0.5 - d).clamp(0, 1)).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull every pixel towards the image mean: (x - m) * c + m."""
    c = _CONTRAST[severity - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Raise the HSV value V = max over channels by c, hue and saturation kept.

    With hue and saturation fixed the RGB values are proportional to V, so the image is scaled by
    min(V + c, 1) / V per pixel; black pixels (undefined hue) become the gray c. For one channel
    this is min(x + c, 1).
    """
    c = _BRIGHTNESS[severity - 1]
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    gray = torch.full_like(x, c)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), gray).clamp(0, 1)


def pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each block of a grid anchored at the top-left corner by its mean.

    Block averaging is the orthogonal projection onto images constant on the blocks. The block
    shapes (1x2, 2x2, 2x4, 4x4, 4x8 pixels, times the image side / 224 when larger) each divide
    the next, so every grid refines the next one, the projections' ranges are nested, and the
    distance to the clean image can only grow with the severity, for every image. (Resizing down
    and up by fractional factors, as ImageNet-C does, aliases and is not monotone on 8x8 digits.)
    """
    h, w = x.shape[-2:]
    unit = max(1, round(min(h, w) / 224))
    bh, bw = (unit * b for b in _PIXELATE_BLOCKS[severity - 1])
    # ceil_mode keeps the partial blocks at the border, averaged over their valid pixels only
    means = F.avg_pool2d(x, (bh, bw), stride=(bh, bw), ceil_mode=True)
    return means.repeat_interleave(bh, dim=-2).repeat_interleave(bw, dim=-1)[..., :h, :w].clamp(0, 1)


def jpeg(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Round trip through PIL's JPEG encoder at a low quality."""
    from PIL import Image

    quality = _JPEG_QUALITY[severity - 1]
    arrays = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arrays:
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(buf).convert(img.mode), dtype=np.float32) / 255.0
        out.append(dec.reshape(a.shape))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return y.to(device=x.device, dtype=x.dtype)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg": jpeg,
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("gaussian_blur", "defocus_blur"),
    "digital": ("contrast", "brightness", "pixelate", "jpeg"),
}


def corruption_generator(seed: int, name: str, severity: int, index: int = 0) -> torch.Generator:
    """A CPU generator for one (corruption, severity, batch index), independent of evaluation order."""
    digest = hashlib.sha256(f"{seed}/{name}/{severity}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, index: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to images (B, C, H, W) in [0, 1].

    Deterministic in (seed, name, severity, index); the output stays in [0, 1].
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {sorted(CORRUPTIONS)}, got {name!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if x.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    return CORRUPTIONS[name](x, severity, corruption_generator(seed, name, severity, index))

"""VARS-S: a static dictionary of learned k x k templates translated over the token grid.

Each of the K kernels is placed at every grid position, so a head has M = K * h * w atoms (plus
one identity atom per prefix token, see below). D z = sum_k kernel_k * z_k, applied to each
of the C channels alike. Products run through the FFT on a grid of size S: S = (h, w) for
circular padding, S = (h + k//2, w + k//2) for zero padding, which is large enough that the
circular product on S restricted to the h x w grid is exactly the zero-padded one.

The exact Lipschitz constant of a circular convolution dictionary is max over frequencies of
sum_k |K_k(omega)|^2; for zero padding that maximum on the padded grid is an upper bound.

Unlike the original VARS-S (full-size kernels tied to one resolution) the kernels here are small
and the grid is read from the token count at run time, so any image size works.

Prefix tokens (class, register) are not on the grid; each gets one identity atom, so the
dictionary can reconstruct them and the operator stays block diagonal (L = max(L_conv, 1)).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .base import DictionaryOperator, check_lipschitz_mode, flat_size
from .dense import DenseOperator

__all__ = ["ConvDictionary", "ConvOperator", "StaticAtoms", "MaterializedConvOperator", "PADDINGS", "STATIC_IMPLS",
           "grid_shape"]

PADDINGS = ("circular", "zero")
STATIC_IMPLS = ("auto", "fft", "dense")
#: "auto" materializes the static atoms up to this many (K * h * w): on small grids the per-transform
#: cost of many tiny FFTs exceeds a dense product (measured 2-3x slower on CPU for an 8 x 8 grid).
DENSE_STATIC_MAX_ATOMS = 256


def grid_shape(num_grid_tokens: int, grid_size: tuple[int, int] | None = None) -> tuple[int, int]:
    if grid_size is not None:
        if grid_size[0] * grid_size[1] != num_grid_tokens:
            raise ValueError(f"grid_size {grid_size} does not hold {num_grid_tokens} tokens")
        return tuple(grid_size)
    side = math.isqrt(num_grid_tokens)
    if side * side != num_grid_tokens:
        raise ValueError(
            f"a static (conv) dictionary needs the tokens on a grid: {num_grid_tokens} tokens is not a "
            "square; pass grid_size=(h, w) or num_prefix_tokens"
        )
    return side, side


class ConvOperator(DictionaryOperator):
    """D for kernels (*batch, K, k, k) on an (h, w) grid with ``num_prefix`` identity atoms."""

    def __init__(self, kernels, grid, padding="circular", num_prefix=0, spectrum=None, fft_size=None):
        self.kernels = kernels
        self.grid = tuple(grid)
        self.padding = padding
        self.num_prefix = num_prefix
        self.num_kernels, ksize = kernels.shape[-3], kernels.shape[-1]
        h, w = self.grid
        self.num_tokens = num_prefix + h * w
        self.num_atoms = num_prefix + self.num_kernels * h * w
        self.batch_shape = kernels.shape[:-3]
        if fft_size is None:
            r = ksize // 2
            fft_size = (h, w) if padding == "circular" else (h + r, w + r)
        self.fft_size = fft_size
        self.spectrum = self._spectrum(kernels) if spectrum is None else spectrum  # (*, K, S1, S2//2+1)

    def _spectrum(self, kernels: torch.Tensor) -> torch.Tensor:
        s1, s2 = self.fft_size
        k = kernels.shape[-1]
        c = k // 2
        offs = torch.arange(k, device=kernels.device) - c
        flat = ((offs[:, None] % s1) * s2 + (offs[None, :] % s2)).reshape(-1)
        embedded = kernels.new_zeros(*kernels.shape[:-2], s1 * s2)
        embedded = embedded.index_add(-1, flat, kernels.reshape(*kernels.shape[:-2], k * k))
        embedded = embedded.reshape(*kernels.shape[:-2], s1, s2)
        if embedded.dtype in (torch.float16, torch.bfloat16):  # FFTs of half types need power-of-2 sizes
            embedded = embedded.float()
        return torch.fft.rfft2(embedded)

    # z (*, M, C) <-> grid codes (*, C, K, h, w)
    def _split_codes(self, z):
        h, w = self.grid
        p = self.num_prefix
        zg = z[..., p:, :]
        zg = zg.reshape(*z.shape[:-2], self.num_kernels, h, w, z.shape[-1]).movedim(-1, -4)
        return z[..., :p, :], zg

    def _pad(self, t):
        h, w = self.grid
        s1, s2 = self.fft_size
        if (s1, s2) == (h, w):
            return t
        return nn.functional.pad(t, (0, s2 - w, 0, s1 - h))

    def _spec(self):
        # spectrum (*, K, S1, F) -> (*, 1, K, S1, F) to broadcast over channels
        return self.spectrum.unsqueeze(-4)

    def decode(self, z):
        zp, zg = self._split_codes(z)  # zg (*, C, K, h, w)
        h, w = self.grid
        zf = torch.fft.rfft2(self._pad(zg.to(self.spectrum.real.dtype)))
        y = torch.fft.irfft2((zf * self._spec()).sum(-3), s=self.fft_size)[..., :h, :w]  # (*, C, h, w)
        y = y.to(z.dtype).flatten(-2).transpose(-1, -2)  # (*, hw, C)
        if self.num_prefix:
            y = torch.cat([zp.expand(*y.shape[:-2], *zp.shape[-2:]), y], dim=-2)
        return y

    def encode(self, x):
        p = self.num_prefix
        h, w = self.grid
        xg = x[..., p:, :].transpose(-1, -2).reshape(*x.shape[:-2], x.shape[-1], 1, h, w)  # (*, C, 1, h, w)
        xf = torch.fft.rfft2(self._pad(xg.to(self.spectrum.real.dtype)))
        zg = torch.fft.irfft2(xf * self._spec().conj(), s=self.fft_size)[..., :h, :w]  # (*, C, K, h, w)
        zg = zg.to(x.dtype).movedim(-4, -1).reshape(*zg.shape[:-4], self.num_kernels * h * w, x.shape[-1])
        if p:
            zg = torch.cat([x[..., :p, :].expand(*zg.shape[:-2], p, x.shape[-1]), zg], dim=-2)
        return zg

    def normal(self, z):
        if self.padding != "circular":
            return self.encode(self.decode(z))
        # circular: D^T D is diagonal in frequency, one FFT pair per product
        zp, zg = self._split_codes(z)
        h, w = self.grid
        spec = self._spec()
        zf = torch.fft.rfft2(zg.to(self.spectrum.real.dtype))
        out = torch.fft.irfft2(spec.conj() * (zf * spec).sum(-3, keepdim=True), s=self.fft_size)
        out = out.to(z.dtype).movedim(-4, -1).reshape(*out.shape[:-4], self.num_kernels * h * w, z.shape[-1])
        if self.num_prefix:
            out = torch.cat([zp.expand(*out.shape[:-2], *zp.shape[-2:]), out], dim=-2)
        return out

    def flatten(self, batch_shape: Sequence[int]) -> "ConvOperator":
        k = self.kernels
        spec = self.spectrum
        if flat_size(self.batch_shape) == 1:
            k = k.reshape(1, *k.shape[-3:])
            spec = spec.reshape(1, *spec.shape[-3:])
        else:
            k = k.expand(*batch_shape, *k.shape[-3:]).reshape(-1, *k.shape[-3:])
            spec = spec.expand(*batch_shape, *spec.shape[-3:]).reshape(-1, *spec.shape[-3:])
        return ConvOperator(k, self.grid, self.padding, self.num_prefix, spec, self.fft_size)

    def take(self, index):
        if self.kernels.shape[0] == 1:
            return self
        return ConvOperator(
            self.kernels[index], self.grid, self.padding, self.num_prefix, self.spectrum[index], self.fft_size
        )

    def tensors(self):
        return [self.kernels]

    def to(self, dtype):
        return ConvOperator(self.kernels.to(dtype), self.grid, self.padding, self.num_prefix, fft_size=self.fft_size)

    @property
    def dtype(self):
        return self.kernels.dtype

    def lipschitz(self, mode: str = "exact") -> torch.Tensor:
        check_lipschitz_mode(mode)
        with torch.no_grad():
            if mode == "power":
                bound = super().lipschitz("power")
            elif mode == "exact":
                bound = self.spectrum.abs().pow(2).sum(-3).flatten(-2).amax(-1).to(self.kernels.dtype)
            else:  # Young's inequality: ||sum_k K_k * z_k||^2 <= (sum_k ||K_k||_1^2) ||z||^2
                bound = self.kernels.abs().sum((-2, -1)).pow(2).sum(-1)
            return bound.clamp_min(1.0) if self.num_prefix else bound


class ConvDictionary(nn.Module):
    """VARS-S dictionary: ``num_kernels`` learned templates of size ``kernel_size`` per head.

    Args:
        num_kernels: K templates per head.
        kernel_size: spatial size k of each template (any k; resolution-agnostic).
        num_heads: one set of templates per head (the problems' last batch dim is the head).
        padding: "circular" (exact FFT Lipschitz) or "zero".
        num_prefix_tokens: leading non-grid tokens (class/register), each given an identity atom.
        grid_size: (h, w) of the token grid; default: the square grid of the grid token count.
        normalize: templates are used with unit Frobenius norm, so every atom has norm <= 1.
    """

    def __init__(
        self,
        num_kernels: int,
        kernel_size: int,
        num_heads: int = 1,
        padding: str = "circular",
        num_prefix_tokens: int = 0,
        grid_size: tuple[int, int] | None = None,
        normalize: bool = True,
    ):
        super().__init__()
        if num_kernels < 1:
            raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.num_kernels, self.kernel_size, self.num_heads = num_kernels, kernel_size, num_heads
        self.padding, self.num_prefix_tokens, self.grid_size = padding, num_prefix_tokens, grid_size
        self.normalize = normalize
        self.kernels = nn.Parameter(torch.randn(num_heads, num_kernels, kernel_size, kernel_size) / kernel_size)

    def templates(self) -> torch.Tensor:
        k = self.kernels
        if self.normalize:
            k = k / k.flatten(-2).norm(dim=-1)[..., None, None].clamp_min(1e-6)
        return k

    def forward(self, source: torch.Tensor, num_prefix_tokens: int | None = None) -> ConvOperator:
        """Bind to an input (..., H, N, d): only its token count N (the grid) is read.

        ``num_prefix_tokens`` overrides the module's count for this call (an attention layer that
        infers it from the input size passes it; the module is not changed)."""
        prefix = self.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
        grid = grid_shape(source.shape[-2] - prefix, self.grid_size)
        return ConvOperator(self.templates(), grid, self.padding, prefix)

    def num_atoms(self, num_tokens: int) -> int:
        return self.num_prefix_tokens + self.num_kernels * (num_tokens - self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return (
            f"num_kernels={self.num_kernels}, kernel_size={self.kernel_size}, num_heads={self.num_heads}, "
            f"padding={self.padding!r}, num_prefix_tokens={self.num_prefix_tokens}"
        )


class MaterializedConvOperator(DenseOperator):
    """Static atoms as an explicit matrix that keeps the convolution's Lipschitz bound.

    The dense products are faster than many tiny FFTs on small grids, but the generic dense bound
    would run an eigenvalue solve per problem on atoms every problem shares; the convolution's
    bound (from its spectrum, per head) is the same number at no cost.
    """

    def __init__(self, weight, bounds, gram=None, use_gram=None):
        super().__init__(weight, gram, use_gram)
        self.bounds = bounds  # mode -> (*batch,) bound, computed lazily from ``conv`` at bind time

    @classmethod
    def from_conv(cls, conv) -> "MaterializedConvOperator":
        bounds = {mode: (lambda m=mode: conv.lipschitz(m)) for mode in ("exact", "power", "gershgorin")}
        return cls(conv.materialize(), bounds)

    def _rebind(self, dense: DenseOperator, reshape) -> "MaterializedConvOperator":
        bounds = {mode: (lambda f=f: reshape(f())) for mode, f in self.bounds.items()}
        return MaterializedConvOperator(dense.weight, bounds, dense.gram, dense.use_gram)

    def flatten(self, batch_shape):
        dense = super().flatten(batch_shape)
        shared = dense.weight.shape[0] == 1
        return self._rebind(dense, lambda b: b.reshape(1) if shared else b.expand(*batch_shape).reshape(-1))

    def take(self, index):
        dense = super().take(index)
        return self if dense is self else self._rebind(dense, lambda b: b[index])

    def lipschitz(self, mode: str = "exact") -> torch.Tensor:
        check_lipschitz_mode(mode)
        return self.bounds[mode]()


class StaticAtoms(ConvDictionary):
    """The VARS-S dictionary of :class:`ConvDictionary`, applied by FFT or as materialized atoms.

    Same parameters (and state_dict) as ConvDictionary; ``impl`` only picks how D z and D^T x are
    computed: "fft", "dense" (D = the decode of the identity, once per forward, then matrix
    products) or "auto".
    """

    def __init__(self, *args: Any, impl: str = "auto", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if impl not in STATIC_IMPLS:
            raise ValueError(f"static_impl must be one of {STATIC_IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(self, source: torch.Tensor, num_prefix_tokens: int | None = None) -> DictionaryOperator:
        op = super().forward(source, num_prefix_tokens)
        grid_atoms = op.num_atoms - op.num_prefix
        if self.impl == "dense" or (self.impl == "auto" and grid_atoms <= DENSE_STATIC_MAX_ATOMS):
            return MaterializedConvOperator.from_conv(op)
        return op

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}"

"""VARSAttention: recurrent sparse reconstruction as a drop-in for timm's ``Attention``.

Per sample and head, with queries Q = x W_q and values V = x W_v (the key is tied to the query,
as in the original VARS-D: there is no key projection), the layer solves the lasso

    z* = argmin_z 1/2 ||V - D z||_F^2 + lam ||z||_1,        D in R^{N x M}

and returns proj(D z*) (the block's residual connection adds x outside). The dictionary D is

- ``"d"`` (VARS-D): dynamic atoms phi(Q), positive random features of the queries;
- ``"s"`` (VARS-S): static atoms, learned k x k templates translated over the token grid;
- ``"sd"`` (VARS-SD, default): their union [phi(Q), D_s].

Self-attention is the special case "d", lam = 0, zero steps, encode init: D D^T V = phi(Q) phi(Q)^T V,
unnormalized linear attention.

Prefix tokens (class, register) are not on the grid. The dynamic atoms span them like any other
token; the static dictionary gives each one an identity atom, so with "s" alone a prefix token is
reconstructed from itself and never mixes with the grid (the registered VARS-S models therefore
pool the grid tokens, and :func:`vars_deq.convert_vit` refuses "s" for class-token pooling). The
token grid is read from the token
count at run time, so any square grid (dynamic image size) works: with ``num_prefix_tokens`` given
(the registered models and :func:`vars_deq.convert_vit` pass the model's count) the grid is the
remaining N - p tokens and must be square; left at None (plain ``VisionTransformer(attn_layer=
VARSAttention)``, which does not tell the attention its prefix count) the grid is the largest
square that fits, floor(sqrt(N))^2, and the rest are prefix tokens, which is exact whenever there
are fewer than 2 * side + 1 prefix tokens (every timm ViT/DeiT with a class token and a handful of
register tokens). A token count alone cannot tell a non-square h x w grid from a square one, so
static atoms need square grids; the dynamic atoms ("d") take any token count.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..dictionaries import FreeAtoms, PerformerDictionary, UnionDictionary
from ..dictionaries.conv import STATIC_IMPLS, StaticAtoms
from ..backward import Backward
from ..solvers import Solver
from .sparse_reconstruction import PRESET, SparseReconstruction, layer_options_of

__all__ = ["VARSAttention", "DICTIONARY_KINDS", "STATIC_ATOMS", "LAYER_OPTIONS"]

DICTIONARY_KINDS = ("sd", "s", "d")
#: "conv": learned k x k templates translated over the token grid (the paper's text); "free": a free
#: learned (N x M_s) matrix per head over a fixed token count (the original VARS-SD code)
STATIC_ATOMS = ("conv", "free")
#: Static dictionary defaults: one 5 x 5 template per head, as the original VARS-S had one (full-size) kernel
#: per head; here small, so resolution-agnostic (the original full-size FFT kernels tie a model to one size).
DEFAULT_NUM_KERNELS = 1
DEFAULT_KERNEL_SIZE = 5


class VARSAttention(nn.Module):
    """Sparse-reconstruction attention with the constructor keywords of timm's ``Attention``.

    timm keywords (as in ``timm.layers.Attention``): ``dim``, ``num_heads``, ``attn_head_dim``,
    ``dim_out``, ``qkv_bias`` (bias of the q and v projections), ``qk_norm`` (normalize the
    queries), ``scale_norm`` (normalize D z* before the projection), ``proj_bias``, ``gated``
    (sigmoid gate on D z*), ``attn_drop`` (must be 0: there is no attention matrix to drop),
    ``proj_drop``, ``norm_layer``, ``device``, ``dtype``.

    VARS keywords:
        dictionary: "sd" (default), "s" or "d" (see the module docstring).
        lam, solver, max_steps, tol, backward, lipschitz, lipschitz_margin, nonneg, learn_lam, init:
            the sparse coding and its gradient (:class:`SparseReconstruction`); the defaults are the
            original code's: lam 0.3, 5 ISTA steps from the thresholded encode S_lam(D^T v),
            backprop through the unroll, and the step 1/L with L = Gershgorin bound + 1, detached.
            With ``backward="implicit"`` (or phantom) and solver, max_steps, tol not given, the
            forward is the DEQ preset (FISTA to residual 1e-2, at most 100 steps) instead.
        static_atoms: "conv" (default; translated templates, any square grid) or "free" (a learned
            (N x M_s) matrix per head, M_s = the number of dynamic features, as in the original
            VARS-SD code; needs ``num_tokens``, the fixed token count N).
        num_kernels, kernel_size, padding: the static templates ("conv"; default 1, 5, circular).
            Templates are normalized over the tokens with the dynamic atoms in "sd" (as the original
            normalizes its union); VARS-S ("s") uses its kernels as learned (as the original does).
        static_impl: how the static atoms are applied: "fft" (convolution through the FFT), "dense"
            (materialized once per forward, then dense products) or "auto" (dense up to
            ``DENSE_STATIC_MAX_ATOMS`` atoms per head). The math is the same.
        num_prefix_tokens: leading non-grid tokens; None infers them from the token count.
        num_features, orthogonal, feature_seed: the dynamic random features ("d", "sd"; default
            2 * head_dim Gaussian features).
        backward_options: flat sugar for the backward's fields (adjoint, adjoint_tol,
            adjoint_max_steps, adjoint_ridge, on_unconverged, phantom_steps, tau; see
            :class:`vars_deq.Implicit` and :class:`vars_deq.Phantom`).

    After a forward, ``last_stats`` holds the solver statistics (steps, residual, converged).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dictionary: str = "sd",
        lam: float | torch.Tensor = 0.3,
        solver: str | Solver = PRESET,
        max_steps: int = PRESET,
        tol: float | None = PRESET,
        backward: "str | Backward" = "unroll",
        lipschitz: str = "gershgorin",
        nonneg: bool = False,
        learn_lam: bool = False,
        init: str = "thresholded_encode",
        lipschitz_margin: float | None = None,
        static_atoms: str = "conv",
        num_tokens: int | None = None,
        num_kernels: int | None = None,
        kernel_size: int | None = None,
        padding: str | None = None,
        static_impl: str | None = None,
        num_prefix_tokens: int | None = None,
        num_features: int | None = None,
        orthogonal: bool | None = None,
        feature_seed: int | None = None,
        **backward_options: Any,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dictionary not in DICTIONARY_KINDS:
            raise ValueError(f"dictionary must be one of {DICTIONARY_KINDS}, got {dictionary!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or give attn_head_dim")
            attn_head_dim = dim // num_heads
        elif not isinstance(attn_head_dim, int) or attn_head_dim < 1:
            raise ValueError(f"attn_head_dim must be None or an int >= 1, got {attn_head_dim!r}")
        if attn_drop:
            raise ValueError(
                f"attn_drop must be 0 for VARSAttention (got {attn_drop}): sparse reconstruction has no "
                "attention matrix to drop; use proj_drop"
            )
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        static, dynamic = "s" in dictionary, "d" in dictionary
        if qk_norm and not dynamic:
            raise ValueError("qk_norm normalizes the queries, but dictionary 's' uses none; use 'd' or 'sd'")
        if num_prefix_tokens is not None and (
            isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0
        ):
            raise ValueError(f"num_prefix_tokens must be None (inferred) or an int >= 0, got {num_prefix_tokens!r}")
        if static_impl is not None and static_impl not in STATIC_IMPLS:
            raise ValueError(f"static_impl must be one of {STATIC_IMPLS}, got {static_impl!r}")
        if static_atoms not in STATIC_ATOMS:
            raise ValueError(f"static_atoms must be one of {STATIC_ATOMS}, got {static_atoms!r}")
        free = static and static_atoms == "free"
        if free and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1):
            raise ValueError(f"static_atoms='free' needs num_tokens, the token count (an int >= 1), got {num_tokens!r}")
        if num_tokens is not None and not free:
            raise ValueError("num_tokens sets the free static atoms; it needs static_atoms='free' and a static dictionary")
        for name, value in (("num_kernels", num_kernels), ("kernel_size", kernel_size), ("padding", padding),
                            ("static_impl", static_impl)):
            if value is not None and (not static or free):
                raise ValueError(f"{name} sets the static conv templates, but dictionary {dictionary!r} with "
                                 f"static_atoms={static_atoms!r} has none")
        for name, value in (("num_features", num_features), ("orthogonal", orthogonal), ("feature_seed", feature_seed)):
            if value is not None and not dynamic:
                raise ValueError(f"{name} sets the dynamic features, but dictionary {dictionary!r} has none")

        self.dim, self.num_heads, self.head_dim = dim, num_heads, attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.dictionary_kind = dictionary
        self.num_prefix_tokens = num_prefix_tokens
        dim_out = dim_out or dim

        self.q = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if dynamic else None
        self.v = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        parts = []
        if dynamic:
            parts.append(PerformerDictionary(
                attn_head_dim, num_features=num_features, num_heads=num_heads, orthogonal=bool(orthogonal),
                seed=0 if feature_seed is None else feature_seed,
            ))
        if free:
            parts.append(FreeAtoms(num_heads, num_tokens, 2 * attn_head_dim if num_features is None else num_features))
        elif static:
            parts.append(StaticAtoms(
                DEFAULT_NUM_KERNELS if num_kernels is None else num_kernels,
                DEFAULT_KERNEL_SIZE if kernel_size is None else kernel_size,
                num_heads=num_heads, padding="circular" if padding is None else padding,
                num_prefix_tokens=num_prefix_tokens or 0, impl="auto" if static_impl is None else static_impl,
                normalize=dynamic,
            ))
        atoms = parts[0] if len(parts) == 1 else UnionDictionary(*parts)
        self.vars = SparseReconstruction(
            atoms.to(**dd), lam=lam, solver=solver, max_steps=max_steps, tol=tol, backward=backward,
            nonneg=nonneg, lipschitz=lipschitz, learn_lam=learn_lam, init=init, lipschitz_margin=lipschitz_margin,
            **backward_options,
        ).to(**dd)

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """Solver statistics of the latest forward: steps (mean), residual (max), converged (fraction)."""
        return self.vars.last_stats

    def configure(self, **options: Any) -> None:
        """Change solver, max_steps, tol, backward, lipschitz, init, lam or backward options."""
        self.vars.configure(**options)

    def grid_prefix(self, num_tokens: int) -> int:
        """The number of prefix tokens for an input of ``num_tokens``; the rest must be a square grid."""
        if self.num_prefix_tokens is None:
            side = math.isqrt(num_tokens)
            return num_tokens - side * side
        grid = num_tokens - self.num_prefix_tokens
        side = math.isqrt(max(grid, 0))
        if grid < 1 or side * side != grid:
            raise ValueError(
                f"dictionary {self.dictionary_kind!r} has static atoms on a square token grid, but {num_tokens} "
                f"tokens minus num_prefix_tokens={self.num_prefix_tokens} leaves {grid}, not a square grid"
            )
        return self.num_prefix_tokens

    @property
    def static_atoms(self) -> StaticAtoms | FreeAtoms | None:
        """The static part of the dictionary (conv: ``.kernels`` (H, K, k, k); free: ``.weight``
        (H, N, M_s)), or None for "d"."""
        atoms = self.vars.dictionary
        if isinstance(atoms, UnionDictionary):
            atoms = atoms.b
        return atoms if isinstance(atoms, (StaticAtoms, FreeAtoms)) else None

    @property
    def dynamic_atoms(self) -> PerformerDictionary | None:
        """The dynamic (Performer) part of the dictionary (``.projection`` (H, m, head_dim)), or None for "s"."""
        atoms = self.vars.dictionary
        if isinstance(atoms, UnionDictionary):
            atoms = atoms.a
        return atoms if isinstance(atoms, PerformerDictionary) else None

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """D z* per head, (B, H, N, head_dim): the layer before its output projection."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"VARSAttention expects x of shape (B, N, dim={self.dim}), got {tuple(x.shape)}")
        B, N, _ = x.shape
        # the prefix count follows the input size when inferred; it is passed, never stored
        prefix = self.grid_prefix(N) if isinstance(self.static_atoms, StaticAtoms) else None
        # the solver makes many passes over v and q: contiguous (B, H, N, d) halves their cost
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2).contiguous()
        if self.q is None:
            return self.vars(v, source=v, num_prefix_tokens=prefix)  # the static atoms read only the token count
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2).contiguous()
        return self.vars(v, source=self.q_norm(q), num_prefix_tokens=prefix)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("VARSAttention does not support attn_mask: every token is reconstructed from all atoms")
        if is_causal:
            raise ValueError("VARSAttention does not support is_causal=True: the sparse code couples all tokens")
        out = self.reconstruct(x)
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dictionary={self.dictionary_kind!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )


#: every VARS option of the layer (its keyword-only constructor parameters and the flat backward
#: keywords), derived from the signature so that create_model, convert_vit and the CLI never drift
LAYER_OPTIONS: tuple[str, ...] = layer_options_of(VARSAttention.__init__)

"""An independent float64 reference of the original VARS attention updates (github bfshi/VARS).

Written from issue 10's facts and from reading ``vars_block.py`` of bfshi/VARS at two commits:

- cf10635 ("220530"), the ISTA-era file (identical to ``rvt/vars_block.py`` at 8e0c9de), with the
  hyper-parameters from that commit's ``main.py`` argparse defaults (``--lam 0.3``,
  ``--rand_feat_dim_ratio 2``, ``--num_step 5``) and its ``robust_models.py`` (``Transformer`` builds
  every block with ``qkv_bias=True`` and ``image_size`` = the stage's feature-map side);
- 651eb51 (HEAD, "add normalization in random feature generation").

Nothing here is copied from that code; each function states its math and where each fact comes from.
Plain functions, torch only, any floating dtype (the tests use float64); no module state.

Shapes: B batch, N tokens, C channels (dim), H heads, d = C / H channels per head, M atoms per head.

Where the original and issue 10 disagree, or where the issue leaves something out (each function's
docstring repeats the facts that concern it):

1. No commit runs ISTA on L2-normalized queries. At cf10635 ``to_random_feature`` has its
   ``F.normalize`` line commented out, so phi is taken of q * d^(-1/4) (``VARS_D.forward`` scales q by
   ``self.scale ** 0.5`` with ``scale = d ** -0.5``) and |u|^2 is that vector's squared norm. The
   normalization is switched on only at 651eb51, whose ``VARS_D.att_func`` / ``VARS_SD.att_func`` are no
   longer ISTA: commit 6aacabb ("add LISTA") brought learned ``learned_k`` (M x M, init I),
   ``learned_lam`` and ``learned_L`` (init 1), the step matrix ``learned_k @ kk @ learned_k``, the step
   L / learned_L (L still the Gershgorin bound of kk), the threshold lam * learned_lam, and a GELU
   threshold sign(x) GELU(|x| - t) for the start point and every step. At the initial values that update
   differs from ISTA only by GELU in place of ReLU. Issue 10's VARS-D (normalized features + ISTA) thus
   combines the two commits; it is the default here, and ``normalize_queries=False`` gives cf10635 exactly.
2. VARS-S's kernels are not spatial kernels: the parameter ``kernel`` is a complex half spectrum
   (``rfft2`` layout) drawn with ``randn`` and trained freely, ``(C, K, 1, S, S//2+1, 2)`` as real pairs.
   Its products are ``irfft2(rfft2(x, norm="ortho") * W, norm="ortho")``, which is the circular
   convolution with the real kernel ``irfft2(W)`` (default norm); ``irfft2`` silently makes W
   Hermitian on the self-conjugate columns (column 0, and column S/2 for even S). The ISTA step,
   however, uses the Gram ``W_i conj(W_j)`` formed from the raw half spectrum, and that projection does
   not commute with the product: unless W is Hermitian-consistent on those columns (it is whenever W is
   the spectrum of a real kernel, not in general for the original's free parameter), the original's
   step operator is not the Gram of its own encoder and decoder, and the iteration is not exactly ISTA
   on its lasso. This reference computes what the original computes for any W; the energy guarantee
   (and agreement with a library that stores real kernels) holds for spectra of real kernels, see
   :func:`original_spectrum`.
3. VARS-S's ``fft_conv_grouped`` casts its input to float32 before the FFT; here every product runs in
   the input's dtype.
4. VARS-S's step L is a buffer, set by ``update_L(lam=1)`` at construction and then moved as an
   exponential average L <- 0.9 L + 0.1 L_new by ``update_L(lam=0.1)`` every 100 training iterations
   (cf10635 ``engine.train_one_epoch``), not recomputed; and L_new is the SVD of ``kk.float()``, which for
   a complex tensor keeps only the real part, so it is the top singular value of Re(W W^H), between half
   and all of the exact ||W||^2. Here L is the exact bound of the current kernels (what the original
   holds right after its first ``update_L`` were its SVD taken on the complex Gram).
5. The VARS-SD atom order (dynamic first) and the order "concatenate, then normalize over tokens"
   change no output: column normalization commutes with concatenation, and ISTA with a Gershgorin step is
   equivariant under any permutation of the atoms. They only fix which code index is which.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "soft_threshold",
    "performer_features",
    "gershgorin_lipschitz",
    "original_ista",
    "vars_d_problem",
    "original_vars_d",
    "original_vars_sd",
    "original_spectrum",
    "original_kernel",
    "spectral_encode",
    "spectral_decode",
    "spectral_normal",
    "spectral_filter",
    "vars_s_lipschitz",
    "vars_s_problem",
    "original_vars_s",
]


def soft_threshold(u: Tensor, t: Tensor | float) -> Tensor:
    """S_t(u) = sign(u) max(|u| - t, 0), with t a scalar or a tensor broadcasting against u.

    ``F.softshrink`` takes only a Python float; the original's thresholds lam / L are per problem.
    Source: cf10635 ``VARS_D.att_func`` (``torch.sign(x) * self.relu(x.abs() - t)``).
    """
    return torch.sign(u) * torch.relu(u.abs() - t)


def performer_features(u: Tensor, w: Tensor, normalize: bool = True) -> Tensor:
    """Positive random features phi(u) = exp(w^T u_hat - |u_hat|^2 / 2) / sqrt(M).

    u: (B, H, N, d) queries; w: (H, d, M) the fixed Gaussian projection in the ORIGINAL layout
    (``rand_matrix``, ``torch.randn(num_heads, head_dim, rand_feat_dim)``); returns (B, H, N, M).
    The library's ``PerformerDictionary.projection`` is (H, M, d): pass ``projection.transpose(-1, -2)``.

    u_hat = u / max(|u|, 1e-12) (``F.normalize`` over the d channels of each token) when ``normalize``,
    else u itself; |u_hat|^2 is recomputed from u_hat, as the original does (``x.norm(dim=-1)**2``
    after the normalization). M is read from w.
    Source: ``to_random_feature`` — 651eb51 normalizes, cf10635 does not (its line is commented out).
    """
    if w.dim() != 3 or w.shape[-2] != u.shape[-1]:
        raise ValueError(f"w must be (H, d={u.shape[-1]}, M), got {tuple(w.shape)}")
    u_hat = F.normalize(u, dim=-1) if normalize else u
    m = w.shape[-1]
    return torch.exp(u_hat @ w.to(u_hat.dtype) - u_hat.norm(dim=-1, keepdim=True) ** 2 / 2) / math.sqrt(m)


def gershgorin_lipschitz(atoms: Tensor) -> Tensor:
    """L = max_i sum_j |(D^T D)_ij| + 1, detached: atoms D (B, H, N, M) -> (B, H, 1, 1).

    The Gershgorin bound of D^T D is >= its largest eigenvalue ||D||_2^2, so the step 1/L is a valid
    ISTA step; the +1 makes it strictly shorter than 1 / ||D||_2^2.
    Source: cf10635 and 651eb51 ``VARS_D.att_func`` / ``VARS_SD.att_func``
    (``kk.norm(p=1, dim=-1).max(dim=-1)[0].detach() + 1``, kk = D^T D).
    """
    gram = atoms.transpose(-2, -1) @ atoms
    return (gram.abs().sum(-1).amax(-1).detach() + 1)[..., None, None]


def original_ista(
    normal: Callable[[Tensor], Tensor], rhs: Tensor, lam: float, lipschitz: Tensor, steps: int
) -> list[Tensor]:
    """The original's unrolled ISTA; returns the iterates [z_0, ..., z_steps].

    With b = D^T v (``rhs``) and G z = D^T D z (``normal``):

        z_0     = S_lam(b)                                  (the FULL lam: one prox step of size 1 from 0)
        z_{k+1} = S_{lam/L}(z_k - (G z_k - b) / L)          (prox-gradient with step 1/L)

    so the steps minimize E(z) = 1/2 ||v - D z||^2 + lam ||z||_1 (threshold lam/L = step * lam), and
    E never increases over them when L >= ||D||_2^2. ``lipschitz`` broadcasts against the codes.
    Source: cf10635 ``VARS_D.att_func`` (same loop in ``VARS_SD.att_func`` and ``VARS_S_Block.att_func``).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    z = soft_threshold(rhs, lam)
    iterates = [z]
    for _ in range(steps):
        z = soft_threshold(z - (normal(z) - rhs) / lipschitz, lam / lipschitz)
        iterates.append(z)
    return iterates


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, H, N, d): channel h * d + j of the token is channel j of head h."""
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H * d), the inverse of :func:`_split_heads`."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def vars_d_problem(
    x: Tensor,
    W_qv: Tensor,
    b_qv: Tensor | None,
    w_feat: Tensor,
    num_heads: int,
    static_atoms: Tensor | None = None,
    normalize_queries: bool = True,
) -> tuple[Tensor, Tensor]:
    """The per-(sample, head) lasso data of VARS-D / VARS-SD: returns atoms D (B, H, N, M) and values V (B, H, N, d).

    [q | v] = x W_qv^T + b_qv with W_qv (2C, C), b_qv (2C,) or None: the FIRST C outputs are the
    queries, the last C the values (the output is reshaped (B, N, 2, H, d): index 0 is q, 1 is v),
    and within each half channel h * d + j belongs to head h. The key is tied to the query.
    D = phi(q d^(-1/4)) (the original scales q by ``scale ** 0.5`` with scale = d^(-1/2); a no-op under
    the query normalization), then, for VARS-SD, the static atoms appended AFTER the M_d dynamic ones,
    and the whole union L2-normalized over the N tokens, column by column (``F.normalize(., dim=-2)``).

    static_atoms: (1, H, N, M_s) as the original's ``VARS_SD.kernel`` (``torch.randn(1, num_heads,
    image_size**2, rand_feat_dim)``, so M_s = M_d there), or (H, N, M_s); N is the token grid, no class token.
    Sources: cf10635 ``VARS_D.forward``, ``VARS_SD.forward``; 651eb51 ``to_random_feature``.
    """
    b, n, c = x.shape
    if num_heads < 1 or c % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of C={c}, got {num_heads}")
    if W_qv.shape != (2 * c, c):
        raise ValueError(f"W_qv must be (2C, C) = {(2 * c, c)}, got {tuple(W_qv.shape)}")
    d = c // num_heads
    qv = F.linear(x, W_qv, b_qv)
    q, v = _split_heads(qv[..., :c], num_heads), _split_heads(qv[..., c:], num_heads)
    atoms = performer_features(q * d ** -0.25, w_feat, normalize=normalize_queries)
    if static_atoms is not None:
        if static_atoms.shape[-3:-1] != (num_heads, n):
            raise ValueError(f"static_atoms must be (1, H={num_heads}, N={n}, M_s), got {tuple(static_atoms.shape)}")
        atoms = torch.cat([atoms, static_atoms.expand(b, num_heads, n, static_atoms.shape[-1])], dim=-1)
    return F.normalize(atoms, dim=-2), v


def _vars_dense(
    x, W_qv, b_qv, w_feat, static_atoms, W_proj, b_proj, num_heads, lam, steps, normalize_queries, lipschitz
) -> Tensor:
    atoms, v = vars_d_problem(x, W_qv, b_qv, w_feat, num_heads, static_atoms, normalize_queries)
    gram = atoms.transpose(-2, -1) @ atoms
    step = gershgorin_lipschitz(atoms) if lipschitz is None else lipschitz
    z = original_ista(lambda t: gram @ t, atoms.transpose(-2, -1) @ v, lam, step, steps)[-1]
    return F.linear(_merge_heads(atoms @ z), W_proj, b_proj)


def original_vars_d(
    x: Tensor,
    W_qv: Tensor,
    b_qv: Tensor | None,
    w_feat: Tensor,
    W_proj: Tensor,
    b_proj: Tensor | None,
    num_heads: int,
    lam: float = 0.3,
    steps: int = 5,
    normalize_queries: bool = True,
    lipschitz: Tensor | None = None,
) -> Tensor:
    """The original VARS-D attention: x (B, N, C) -> proj(merge_heads(D z_steps)) (B, N, C).

    Per sample and head, D = atoms (B, H, N, M) and V (B, H, N, d) from :func:`vars_d_problem`;
    z (B, H, M, d) from :func:`original_ista` with b = D^T V, G = D^T D, L = :func:`gershgorin_lipschitz`
    (detached, so gradients flow through the unrolled steps only); the heads are merged back
    (channel h * d + j) and projected: W_proj (C, C), b_proj (C,). Defaults lam = 0.3, 5 steps,
    M = w_feat.shape[-1] (the original's 2 d); the residual and dropouts of the block are outside.

    w_feat: (H, d, M), the ORIGINAL layout (see :func:`performer_features`).
    normalize_queries: True = 651eb51's features (issue 10's fact 3); False = cf10635 exactly.
    lipschitz: if given, (B, H, 1, 1) used in place of the computed L (tests hold L fixed with it).
    Sources: cf10635 ``VARS_D.forward`` and ``VARS_D.att_func``; hyper-parameters from cf10635
    ``main.py``; ``qkv_bias=True`` in cf10635 ``robust_models.Transformer``.
    """
    return _vars_dense(x, W_qv, b_qv, w_feat, None, W_proj, b_proj, num_heads, lam, steps, normalize_queries, lipschitz)


def original_vars_sd(
    x: Tensor,
    W_qv: Tensor,
    b_qv: Tensor | None,
    w_feat: Tensor,
    static_atoms: Tensor,
    W_proj: Tensor,
    b_proj: Tensor | None,
    num_heads: int,
    lam: float = 0.3,
    steps: int = 5,
    normalize_queries: bool = True,
    lipschitz: Tensor | None = None,
) -> Tensor:
    """The original VARS-SD attention: :func:`original_vars_d` with the atoms [phi(q), static] (M = M_d + M_s).

    static_atoms: (1, H, N, M_s) free learned atoms (the original's ``VARS_SD.kernel``; the library's
    ``static_atoms.weight`` (H, N, M_s) is accepted as is), appended after phi(q) and normalized over
    the tokens together with them; N = S * S is the token grid (the RVT models have no class token).
    Everything else (start point, Gershgorin L + 1, lam 0.3, 5 steps) is VARS-D's.
    Source: cf10635 ``VARS_SD.__init__`` and ``VARS_SD.forward``.
    """
    return _vars_dense(
        x, W_qv, b_qv, w_feat, static_atoms, W_proj, b_proj, num_heads, lam, steps, normalize_queries, lipschitz
    )


def original_spectrum(kernels: Tensor, centered: bool = True) -> Tensor:
    """The original's half-spectrum parameter of real full-size kernels: (..., S, S) -> (..., S, S//2+1, 2).

    Returns view_as_real(rfft2(k0)) with k0 = kernels rolled by -(S//2) on both axes when ``centered``
    (entry (a, b) is the offset (a - S//2, b - S//2), the library's ``ConvOperator`` convention), else
    kernels as given (entry (a, b) is the offset (a, b)). With W this spectrum, the original's product
    :func:`spectral_filter` is the circular convolution y[p] = sum_o k[o] x[p - o].
    Hence the original's ``kernel2`` for a per-channel filter f (C, S, S) is
    ``original_spectrum(f)[:, None, None]``; for its ``kernel`` see :func:`original_kernel`.
    """
    s = kernels.shape[-1]
    if kernels.dim() < 2 or kernels.shape[-2] != s:
        raise ValueError(f"kernels must be (..., S, S), got {tuple(kernels.shape)}")
    if centered:
        kernels = torch.roll(kernels, shifts=(-(s // 2), -(s // 2)), dims=(-2, -1))
    return torch.view_as_real(torch.fft.rfft2(kernels))


def original_kernel(atoms: Tensor, centered: bool = True) -> Tensor:
    """The original's VARS-S ``kernel`` (C, K, 1, S, S//2+1, 2) whose synthesis atoms are atoms (C, K, S, S).

    The original decodes with conj(W) (module note 2), so D z = sum_k t_k * z_k (circular convolution per
    channel, t = atoms) needs W_k = conj(rfft2(t_k)): the conjugate of :func:`original_spectrum`, with the
    original's singleton input-channel axis. For the library's ``ConvDictionary`` pass its
    ``templates()`` (normalized, centered) with kernel_size = S.
    """
    spec = torch.view_as_complex(original_spectrum(atoms, centered)).conj().resolve_conj()
    return torch.view_as_real(spec).unsqueeze(2)


def spectral_encode(y: Tensor, spec: Tensor) -> Tensor:
    """b = D^T y: y (B, C, S, S), spec (C, K, S, S//2+1) complex -> (B, C, K, S, S), b_k = irfft2(W_k rfft2(y)).

    Source: cf10635 ``VARS_S_Block.forward``, ``fft_conv_grouped(x, kernel, ...)``.
    """
    return torch.fft.irfft2(
        torch.einsum("cksf,bcsf->bcksf", spec, torch.fft.rfft2(y, norm="ortho")), s=y.shape[-2:], norm="ortho"
    )


def spectral_decode(z: Tensor, spec: Tensor) -> Tensor:
    """D z: z (B, C, K, S, S) -> (B, C, S, S), irfft2(sum_k conj(W_k) rfft2(z_k)).

    Source: cf10635 ``VARS_S_Block.forward``, ``fft_conv_grouped(sparse_recon, kernel.conj().transpose(1, 2))``.
    """
    return torch.fft.irfft2(
        torch.einsum("cksf,bcksf->bcsf", spec.conj(), torch.fft.rfft2(z, norm="ortho")),
        s=z.shape[-2:],
        norm="ortho",
    )


def spectral_normal(z: Tensor, spec: Tensor) -> Tensor:
    """The original's step operator: (G z)_i = irfft2(sum_j W_i conj(W_j) rfft2(z_j)), z (B, C, K, S, S).

    This is D^T D z exactly only for Hermitian-consistent spectra (module note 2).
    Source: cf10635 ``VARS_S_Block.forward`` (``kk``) and ``att_func`` (``fft_conv_grouped(x, kk, ...)``).
    """
    gram = torch.einsum("cisf,cjsf->cijsf", spec, spec.conj())
    return torch.fft.irfft2(
        torch.einsum("cijsf,bcjsf->bcisf", gram, torch.fft.rfft2(z, norm="ortho")), s=z.shape[-2:], norm="ortho"
    )


def spectral_filter(y: Tensor, spec2: Tensor) -> Tensor:
    """The second per-channel kernel: y (B, C, S, S), spec2 (C, S, S//2+1) complex -> irfft2(W2 rfft2(y)).

    Source: cf10635 ``VARS_S_Block.forward``, ``fft_conv_grouped(new_x, kernel2, ...)``.
    """
    return torch.fft.irfft2(torch.fft.rfft2(y, norm="ortho") * spec2, s=y.shape[-2:], norm="ortho")


def vars_s_lipschitz(spec: Tensor) -> Tensor:
    """Exact step bound per channel: spec (C, K, S, S//2+1) complex -> (C,), detached.

    L_c = max over the half-spectrum frequencies f of the largest singular value of the K x K Gram
    G_c(f) = W_c(f) W_c(f)^H (W_c(f) the K-vector of channel c), the original's SVD bound taken on the
    complex Gram (the original's ``kk.float()`` drops the imaginary part: module note 4). With one input
    channel per group G_c(f) has rank one, so L_c = max_f ||W_c(f)||^2 = ||D_c||_2^2 for real kernels.
    Source: cf10635 ``VARS_S_Block.update_L`` (and its ``self.L.view(-1, 1).repeat(1, int_dim)`` per channel).
    """
    gram = torch.einsum("cisf,cjsf->csfij", spec, spec.conj())
    return torch.linalg.svdvals(gram.detach()).flatten(1).amax(-1)


def vars_s_problem(x: Tensor, W_v: Tensor, b_v: Tensor | None) -> Tensor:
    """The VARS-S signal: v = x W_v^T + b_v laid out per channel on the grid, x (B, N, C) -> (B, C, S, S).

    Token n = r S + c sits at grid row r, column c (the RVT ``Transformer`` flattens 'b c h w -> b (h w) c').
    No pre-norm: the block's ``norm1`` line is commented out and ``norm1`` is reused after decoding.
    Source: cf10635 ``VARS_S_Block.forward``.
    """
    b, n, c = x.shape
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"x must hold a square grid of tokens, got N={n}")
    return F.linear(x, W_v, b_v).transpose(-2, -1).reshape(b, c, s, s)


def original_vars_s(
    x: Tensor,
    W_v: Tensor,
    b_v: Tensor | None,
    kernel: Tensor,
    kernel2: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    W_proj: Tensor,
    b_proj: Tensor | None,
    lam: float = 3.5,
    steps: int = 3,
    bn_eps: float = 1e-5,
    bn_training: bool = False,
    lipschitz: Tensor | None = None,
) -> Tensor:
    """The original VARS-S attention branch: x (B, N, C), N = S * S -> proj(BN(k2 * D z_steps)) (B, N, C).

    v = :func:`vars_s_problem` (B, C, S, S): every channel is its own lasso (groups = C, one input
    channel per group) with K kernels of full size S x S: b = D^T v (:func:`spectral_encode`),
    z (B, C, K, S, S) from :func:`original_ista` with G = :func:`spectral_normal`, lam = 3.5 (full lam in
    the start point, lam / L in the steps), 3 steps, L = :func:`vars_s_lipschitz` per channel (detached);
    then D z (:func:`spectral_decode`), the second per-channel kernel (:func:`spectral_filter`), a
    BatchNorm over the C channels with statistics over batch and tokens, and proj.

    kernel: (C, K, 1, S, S//2+1, 2), kernel2: (C, 1, 1, S, S//2+1, 2): the original's parameters
    ``kernel`` and ``kernel2`` as they are stored (real pairs of the complex half spectrum; K = 5 is its
    ``int_dim_ratio``). For kernels given in space see :func:`original_kernel` and :func:`original_spectrum`:
    the synthesis atoms are irfft2(conj W_k), i.e. the encoder kernels irfft2(W_k) flipped.
    BatchNorm: ``bn_training=False`` (default) normalizes with the given running statistics
    bn_mean, bn_var (C,) (eval mode); True uses the batch's statistics (train mode, running stats unused).
    The block's residual, MLP and DropPath are outside; W_proj (C, C), b_proj (C,); W_v (C, C), b_v (C,)
    (``qkv_bias=True`` in the RVT models).
    lipschitz: if given, (C,) used in place of the computed L (tests hold L fixed with it).
    Sources: cf10635 ``VARS_S_Block.__init__`` (lam=3.5, int_dim_ratio=5, group=dim), ``forward``,
    ``att_func`` (``range(3)``), ``update_L``; ``batch_norm``; ``fft_conv_grouped``.
    """
    c = x.shape[-1]
    if kernel.dim() != 6 or kernel.shape[0] != c or kernel.shape[2] != 1 or kernel.shape[-1] != 2:
        raise ValueError(f"kernel must be (C={c}, K, 1, S, S//2+1, 2), got {tuple(kernel.shape)}")
    if kernel2.shape[:3] != (c, 1, 1):
        raise ValueError(f"kernel2 must be (C={c}, 1, 1, S, S//2+1, 2), got {tuple(kernel2.shape)}")
    v = vars_s_problem(x, W_v, b_v)
    s = v.shape[-1]
    if kernel.shape[3:5] != (s, s // 2 + 1):
        raise ValueError(f"kernel's spectrum must be (S, S//2+1) = {(s, s // 2 + 1)}, got {tuple(kernel.shape[3:5])}")
    spec = torch.view_as_complex(kernel.squeeze(2))
    spec2 = torch.view_as_complex(kernel2.reshape(c, *kernel2.shape[3:]))
    step = vars_s_lipschitz(spec) if lipschitz is None else lipschitz
    z = original_ista(
        lambda t: spectral_normal(t, spec), spectral_encode(v, spec), lam, step[:, None, None, None], steps
    )[-1]
    y = spectral_filter(spectral_decode(z, spec), spec2).flatten(-2)  # (B, C, N)
    y = F.batch_norm(
        y,
        None if bn_training else bn_mean,
        None if bn_training else bn_var,
        bn_weight,
        bn_bias,
        training=bn_training,
        eps=bn_eps,
    )
    return F.linear(y.transpose(-2, -1), W_proj, b_proj)

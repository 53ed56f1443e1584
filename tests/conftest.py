"""Shared hypothesis settings and strategies for random sparse-coding (lasso) problems.

Profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

* ``core`` (default): 25 examples per property, no deadline; the core suite runs in about a
  minute on 2 CPU cores.
* ``quick``: 5 examples, for a fast smoke run.
* ``thorough``: 300 examples, for a nightly or pre-release run.

Every random tensor is drawn from a ``torch.Generator`` seeded with an integer that hypothesis
draws, so a failing example is reproduced exactly from hypothesis' printed inputs (or its
``@reproduce_failure`` blob).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import vars_deq as vd

settings.register_profile(
    "core",
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("quick", parent=settings.get_profile("core"), max_examples=5)
settings.register_profile("thorough", parent=settings.get_profile("core"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "core"))

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny problems on one intra-op thread.

    With two OpenMP threads on a busy 2-core machine, batched LAPACK calls on tiny matrices
    (torch.linalg.solve of a (P, 5, 5) batch inside Anderson) were measured at ~20 ms each
    instead of ~15 us: the threads spin on each other. The problems here are far too small to
    gain from intra-op parallelism, so the core tests pin one thread and restore it afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# random dictionaries
# ---------------------------------------------------------------------------------------------


def random_orthonormal(n: int, k: int, gen: torch.Generator, batch=()) -> torch.Tensor:
    """(*batch, n, k) with orthonormal columns (k <= n), float64."""
    a = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    # fix the signs so the distribution is Haar (and the draw is a function of the seed only)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q[..., :k]


def spread_dictionary(n: int, m: int, log10_cond: float, gen: torch.Generator, batch=()) -> torch.Tensor:
    """Atoms (*batch, n, m) = U diag(s) V^T with r = min(n, m) singular values spread
    log-uniformly from 1 down to 10**-log10_cond (condition number 10**log10_cond on the range;
    an overcomplete m > n dictionary is also rank-deficient as an M x M Gram)."""
    r = min(n, m)
    u = random_orthonormal(n, r, gen, batch)
    v = random_orthonormal(m, r, gen, batch)
    if r == 1:
        s = torch.ones(1, dtype=torch.float64)
    else:
        s = torch.logspace(0.0, -log10_cond, r, dtype=torch.float64)
    return (u * s) @ v.transpose(-1, -2)


def gaussian_dictionary(n: int, m: int, gen: torch.Generator, batch=()) -> torch.Tensor:
    return torch.randn(*batch, n, m, generator=gen, dtype=torch.float64) / math.sqrt(n)


def coherent_dictionary(n: int, m: int, gen: torch.Generator, batch=(), spread: float = 0.1) -> torch.Tensor:
    """Unit-norm atoms clustered around one direction (high mutual coherence, ill-conditioned)."""
    common = torch.randn(*batch, n, 1, generator=gen, dtype=torch.float64)
    d = common + spread * torch.randn(*batch, n, m, generator=gen, dtype=torch.float64)
    return d / d.norm(dim=-2, keepdim=True)


# ---------------------------------------------------------------------------------------------
# random lasso problems
# ---------------------------------------------------------------------------------------------


@dataclass
class LassoCase:
    """A random batch of lasso problems, reproducible from ``seed``.

    D: atoms (*d_batch, N, M) with d_batch broadcasting to x's batch; x: (*batch, N, C);
    lam: a float or a tensor broadcastable to the codes (*batch, M, C).
    """

    D: torch.Tensor
    x: torch.Tensor
    lam: float | torch.Tensor
    nonneg: bool
    seed: int
    kind: str
    log10_cond: float
    info: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def batch(self) -> torch.Size:
        return self.x.shape[:-2]

    @property
    def N(self) -> int:
        return self.x.shape[-2]

    @property
    def M(self) -> int:
        return self.D.shape[-1]

    @property
    def C(self) -> int:
        return self.x.shape[-1]

    def problem(self, **kw) -> vd.SparseCoding:
        return vd.SparseCoding(self.D, self.x, self.lam, nonneg=self.nonneg, **kw)

    def dense(self):
        """D (*batch, N, M), x, and lam (*batch, M, C) broadcast to every problem, float64."""
        batch = tuple(self.batch)
        D = self.D.double().expand(*batch, self.N, self.M)
        lam = torch.as_tensor(self.lam, dtype=torch.float64).expand(*batch, self.M, self.C)
        return D, self.x.double(), lam

    def per_problem(self):
        """Yield (index, D_p, x_p, lam_p) for every problem, in this case's dtype."""
        batch = tuple(self.batch)
        D = self.D.expand(*batch, self.N, self.M)
        lam = self.lam
        if isinstance(lam, torch.Tensor):
            lam = lam.expand(*batch, *lam.shape[-2:]) if lam.dim() >= 2 else lam
        for idx in (list(_ndindex(batch)) if batch else [()]):
            lam_p = lam[idx] if isinstance(lam, torch.Tensor) and lam.dim() > 2 else lam
            yield idx, D[idx], self.x[idx], lam_p

    def __repr__(self) -> str:  # short, for hypothesis' falsifying-example report
        lam = self.lam if not isinstance(self.lam, torch.Tensor) else f"tensor{tuple(self.lam.shape)}"
        return (
            f"LassoCase(seed={self.seed}, kind={self.kind!r}, log10_cond={self.log10_cond}, "
            f"D={tuple(self.D.shape)}, x={tuple(self.x.shape)}, lam={lam}, nonneg={self.nonneg}, "
            f"dtype={self.dtype}, {self.info})"
        )


def _ndindex(shape):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _ndindex(shape[1:]):
            yield (i, *rest)


BATCHES = ((), (1,), (3,), (2, 2))


@st.composite
def lasso_cases(
    draw,
    dtypes=DTYPES,
    nonneg=None,
    kinds=("gaussian", "spread", "coherent"),
    max_log10_cond: float = 3.0,
    n_range=(2, 10),
    m_range=(1, 16),
    c_range=(1, 3),
    batches=BATCHES,
    d_batching=("shared", "full", "head"),
    lam_frac=(0.02, 0.8),
    lam_tensor: bool = True,
    overcomplete=None,
):
    """A random :class:`LassoCase`.

    Args:
        dtypes: dtypes to draw from.
        nonneg: fixed nonneg flag, or None to draw it.
        kinds: "gaussian" (i.i.d. atoms), "spread" (singular values spread over
            ``log10_cond`` decades, drawn up to ``max_log10_cond``), "coherent" (unit atoms
            around one direction).
        n_range, m_range, c_range: inclusive ranges for N tokens, M atoms, C channels.
        batches: problem batch shapes to draw from.
        d_batching: "shared" (one D), "full" (one D per problem), "head" (D per last batch dim).
        lam_frac: lam is drawn as a fraction of each problem's lam_max = ||D^T x||_inf, so the
            solution is neither trivially zero nor unregularized.
        lam_tensor: allow lam as a per-problem tensor (*batch, 1, 1).
        overcomplete: True forces M > N, False forces M <= N, None draws either.
    """
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    nn_ = draw(st.integers(*n_range), label="N")
    if overcomplete is True:
        mm = draw(st.integers(nn_ + 1, max(nn_ + 1, m_range[1])), label="M")
    elif overcomplete is False:
        mm = draw(st.integers(max(1, m_range[0]), nn_), label="M")
    else:
        mm = draw(st.integers(*m_range), label="M")
    cc = draw(st.integers(*c_range), label="C")
    batch = draw(st.sampled_from(batches), label="batch")
    dmode = draw(st.sampled_from(d_batching), label="D batching")
    if dmode == "head" and len(batch) == 0:
        dmode = "shared"
    kind = draw(st.sampled_from(kinds), label="kind")
    cond = draw(st.sampled_from([c for c in (0.0, 0.5, 1.0, 2.0, 3.0, 4.0) if c <= max_log10_cond]), label="log10_cond")
    nonneg_ = draw(st.booleans(), label="nonneg") if nonneg is None else nonneg
    signal = draw(st.sampled_from(("noise", "sparse")), label="signal")
    frac = draw(st.floats(*lam_frac), label="lam_frac")
    per_problem_lam = lam_tensor and draw(st.booleans(), label="lam tensor")
    log_scale = draw(st.integers(-2, 2), label="log2 scale")

    gen = torch.Generator().manual_seed(seed)
    d_batch = {"shared": (), "full": tuple(batch), "head": tuple(batch[-1:])}[dmode]
    if kind == "gaussian":
        D = gaussian_dictionary(nn_, mm, gen, d_batch)
        cond = 0.0
    elif kind == "spread":
        D = spread_dictionary(nn_, mm, cond, gen, d_batch)
    else:
        D = coherent_dictionary(nn_, mm, gen, d_batch, spread=10.0 ** (-cond / 2))
    D = D * 2.0**log_scale
    Dfull = D.expand(*batch, nn_, mm)
    if signal == "noise":
        x = torch.randn(*batch, nn_, cc, generator=gen, dtype=torch.float64)
    else:
        z_true = torch.randn(*batch, mm, cc, generator=gen, dtype=torch.float64)
        z_true = z_true * (torch.rand(*batch, mm, cc, generator=gen, dtype=torch.float64) < 0.3)
        if nonneg_:
            z_true = z_true.abs()
        x = Dfull @ z_true + 0.05 * torch.randn(*batch, nn_, cc, generator=gen, dtype=torch.float64)
    # keep lam_max away from zero (a zero signal is a trivial problem, tested on its own)
    x = x + 1e-3 * torch.randn(*batch, nn_, cc, generator=gen, dtype=torch.float64)
    b = Dfull.transpose(-1, -2) @ x
    lam_max = (b.clamp_min(0) if nonneg_ else b.abs()).amax((-2, -1))  # (*batch)
    lam_max = torch.where(lam_max > 0, lam_max, b.abs().amax((-2, -1)))
    if per_problem_lam:
        lam = (frac * lam_max)[..., None, None].to(dtype)
    else:
        lam = float(frac * lam_max.min()) if lam_max.numel() else frac
    return LassoCase(
        D=D.to(dtype),
        x=x.to(dtype),
        lam=lam,
        nonneg=nonneg_,
        seed=seed,
        kind=kind,
        log10_cond=cond,
        info={"signal": signal, "lam_frac": round(frac, 4), "D batching": dmode, "scale": 2.0**log_scale},
    )


# ---------------------------------------------------------------------------------------------
# dense reference formulas (float64)
# ---------------------------------------------------------------------------------------------


def dense_energy(D, x, lam, z, nonneg=False):
    """1/2 ||x - D z||^2 + sum(lam * |z|) per problem (+inf where nonneg and z < 0)."""
    D, x, z = D.double(), x.double(), z.double()
    lam = torch.as_tensor(lam, dtype=torch.float64)
    e = 0.5 * (x - D @ z).pow(2).sum((-2, -1)) + (lam * z.abs()).expand_as(z).sum((-2, -1))
    if nonneg:
        e = torch.where((z < 0).flatten(-2).any(-1), torch.full_like(e, math.inf), e)
    return e


def dense_lipschitz(D):
    """||D||_2^2 per problem from a dense SVD, float64."""
    return torch.linalg.svdvals(D.double())[..., 0].pow(2)


def energy_scale(x):
    """E(0) = 1/2 ||x||^2 per problem: the magnitude every energy comparison is relative to."""
    return 0.5 * x.double().pow(2).sum((-2, -1))


def reference_solution(case: LassoCase, tol: float = 1e-11, max_steps: int = 50000, solver: str = "fista_restart"):
    """A long float64 solve: (z*, E*, Solution). Coherent dictionaries can need more than
    max_steps to reach ``tol``; a relative residual below 1e-8 is still required (E* is then
    accurate to ~L ||z||^2 1e-16, far below what the callers compare)."""
    D, x, lam = case.D.double(), case.x.double(), case.lam
    if isinstance(lam, torch.Tensor):
        lam = lam.double()
    prob = vd.SparseCoding(D, x, lam, nonneg=case.nonneg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vd.ConvergenceWarning)
        sol = vd.solve(prob, solver, max_steps=max_steps, tol=tol, z0="zeros")
    assert bool((sol.stats.residual < 1e-8).all()), f"reference solve did not converge: {sol.stats.residual}"
    return sol.z, prob.energy(sol.z), sol


@pytest.fixture(autouse=True)
def _fresh_convergence_counts():
    """Each test is its own run: the once-per-line convergence warnings start from zero."""
    from vars_deq.backward import UNCONVERGED_ADJOINTS, UNCONVERGED_BACKWARDS

    UNCONVERGED_BACKWARDS.clear()
    UNCONVERGED_ADJOINTS.clear()
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the machine's 2 shared cores are not oversubscribed, and in-process runs
    match the CLI subprocesses the tests start with --threads 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

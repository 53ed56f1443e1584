"""Anderson acceleration (type II; Walker & Ni, SIAM J. Numer. Anal. 2011) of the map T.

With the last m points z_i and residuals f_i = T(z_i) - z_i, the mixing weights solve

    min_alpha || sum_i alpha_i f_i ||^2 + r ||alpha||^2   s.t.  sum_i alpha_i = 1,

with the ridge r = ridge * ||F F^T||_F scaled to the residual Gram, so rescaling a problem does
not change the iteration. The candidate is z_acc = sum_i alpha_i T(z_i) (projected on z >= 0 for
nonnegative problems). The small system is solved in float32 or wider, whatever the autocast.

Safeguards (per problem):
    "energy":   accept z_acc only if E(z_acc) <= Q(T z; z), the value of the proximal-gradient
                majorizer at the plain ISTA step, which bounds E(T z) from above; otherwise take
                T z. Both branches give E(z_{k+1}) <= Q(T z_k; z_k) <= E(z_k): the energy never
                increases. Accepting costs one Gram product per step, rejecting two.
    "residual": if the fixed-point residual grew since the last step, take T z and clear the
                memory (a heuristic; works on any map).
    None:       plain Anderson.
"""

from __future__ import annotations

import torch

from ..problems import relative_residual
from .base import Solver

SAFEGUARDS = ("energy", "residual", None)


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixing_weights(F: torch.Tensor, valid: torch.Tensor, ridge: float) -> torch.Tensor:
    """alpha (P, m) for residuals F (P, m, K) with a validity mask (P, m); invalid entries get 0."""
    wide = _wide_dtype(F.dtype)
    Fw = F.to(wide)
    v = valid.to(wide)
    H = Fw @ Fw.transpose(-1, -2)
    H = H * (v[:, :, None] * v[:, None, :])
    scale = (ridge * H.flatten(1).norm(dim=-1)).clamp_min(torch.finfo(wide).tiny * 1e8)
    eye = torch.eye(H.shape[-1], dtype=wide, device=H.device)
    H = H + eye * (v * scale[:, None] + (1 - v))[:, :, None]
    alpha = torch.linalg.solve(H, v.unsqueeze(-1)).squeeze(-1)
    alpha = alpha / alpha.sum(-1, keepdim=True)
    return alpha.to(F.dtype)


class Anderson(Solver):
    name = "anderson"

    def __init__(self, memory: int = 5, ridge: float = 1e-4, safeguard: str | None = "energy"):
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be an int >= 1, got {memory!r}")
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge!r}")
        if safeguard not in SAFEGUARDS:
            raise ValueError(f"safeguard must be one of {SAFEGUARDS}, got {safeguard!r}")
        self.memory, self.ridge, self.safeguard = memory, float(ridge), safeguard
        self.needs_lasso = safeguard == "energy"

    def __repr__(self) -> str:
        return f"Anderson(memory={self.memory}, ridge={self.ridge:g}, safeguard={self.safeguard!r})"

    def init(self, problem, z0):
        p = z0.shape[0]
        k = z0[0].numel()
        state = {
            "z": z0,
            "X": z0.new_zeros(p, self.memory, k),  # T(z_i), flattened
            "F": z0.new_zeros(p, self.memory, k),  # T(z_i) - z_i
            "valid": torch.zeros(p, self.memory, dtype=torch.bool, device=z0.device),
            "count": 0,
        }
        if getattr(problem, "is_lasso", False):
            state["gz"] = problem.normal(z0)
        if self.safeguard == "residual":
            state["res"] = torch.full((p,), torch.inf, dtype=z0.dtype, device=z0.device)
        return state

    def step(self, problem, state):
        z = state["z"]
        lasso = "gz" in state
        tz = problem.T_from(z, state["gz"]) if lasso else problem.T(z)
        f = tz - z
        slot = state["count"] % self.memory
        X = _put(state["X"], slot, tz.flatten(1))
        F = _put(state["F"], slot, f.flatten(1))
        valid = state["valid"].clone()
        valid[:, slot] = True
        new = {"X": X, "F": F, "valid": valid, "count": state["count"] + 1}

        plain = None
        if self.safeguard == "residual":
            res = relative_residual(z, tz)
            plain = res > state["res"]
            only_last = torch.zeros_like(valid)
            only_last[:, slot] = True
            valid = torch.where(plain[:, None], only_last, valid)
            new["valid"], new["res"] = valid, res

        alpha = mixing_weights(F, valid, self.ridge)
        cand = torch.einsum("pm,pmk->pk", alpha, X).reshape_as(z)
        if lasso and problem.nonneg:
            cand = cand.clamp_min(0)
        if plain is not None:
            cand = torch.where(_per_problem(plain, z), tz, cand)

        if self.safeguard == "energy":
            g_cand = problem.normal(cand)
            accept = problem.energy_from(cand, g_cand) <= problem.majorizer(z, state["gz"], tz)
            acc = _per_problem(accept, z)
            new["z"] = torch.where(acc, cand, tz)
            new["gz"] = torch.where(acc, g_cand, _normal_where_rejected(problem, tz, accept))
        else:
            new["z"] = cand
            if lasso:
                new["gz"] = problem.normal(cand)
        return new, z, tz


def _per_problem(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _put(buf: torch.Tensor, slot: int, row: torch.Tensor) -> torch.Tensor:
    """buf with buf[:, slot] = row; out of place while autograd records (unrolled backward)."""
    if torch.is_grad_enabled() and (buf.requires_grad or row.requires_grad):
        return torch.cat([buf[:, :slot], row[:, None], buf[:, slot + 1 :]], dim=1)
    buf[:, slot] = row
    return buf


def _normal_where_rejected(problem, tz: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
    """G T(z) where the candidate was rejected. Problems that accepted never read it, so when a
    host sync is allowed only the rejected ones pay for the product."""
    if not getattr(problem, "sync_ok", False):
        return problem.normal(tz)
    rejected = (~accept).nonzero().squeeze(-1)
    out = torch.zeros_like(tz)
    if rejected.numel() == 0:
        return out
    if rejected.numel() == accept.numel():
        return problem.normal(tz)
    return out.index_copy(0, rejected, problem.take(rejected).normal(tz[rejected]))

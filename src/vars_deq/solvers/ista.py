"""ISTA: Z_{k+1} = T(Z_k) (Daubechies, Defrise & De Mol 2004). On a generic map: plain fixed-point
iteration. With eta = 1/L, L >= ||D||^2, the lasso energy never increases (Beck & Teboulle 2009,
Lemma 2.3), and E(Z_k) - E* <= L ||Z_0 - Z*||^2 / (2k)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .base import StepSolver


class ISTAState(NamedTuple):
    z: torch.Tensor  # (P, ...) the iterate


class ISTA(StepSolver):
    name = "ista"

    def init(self, problem, z0):
        return ISTAState(z0)

    def step(self, problem, state, may_sync=False):
        tz = problem.T(state.z)
        return ISTAState(tz), state.z, tz

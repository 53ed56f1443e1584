"""ISTA: Z_{k+1} = T(Z_k) (Daubechies, Defrise & De Mol 2004). On a generic map: plain fixed-point
iteration. With eta = 1/L, L >= ||D||^2, the lasso energy never increases (Beck & Teboulle 2009,
Lemma 2.3), and E(Z_k) - E* <= L ||Z_0 - Z*||^2 / (2k)."""

from __future__ import annotations

from .base import Solver


class ISTA(Solver):
    name = "ista"

    def init(self, problem, z0):
        return {"z": z0}

    def step(self, problem, state):
        z = state["z"]
        tz = problem.T(z)
        return {"z": tz}, z, tz

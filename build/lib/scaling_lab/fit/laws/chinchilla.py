"""Compute-optimal allocation from a fitted law of the form E + A/N^alpha + B/D^beta with C = 6 N D:

    N_opt(C) = G (C/6)^a,  D_opt(C) = G^-1 (C/6)^b,  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta).

Applies to laws whose config sets ``compute_optimal: true`` (parameters named A, B, alpha, beta).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def frontier_terms(values: Mapping[str, np.ndarray]):
    """(G, a, b) of ``N_opt = G (C/6)^a``, ``D_opt = (C/6)^b / G``; ``values`` may hold arrays."""
    A, B = np.asarray(values["A"]), np.asarray(values["B"])
    alpha, beta = np.asarray(values["alpha"]), np.asarray(values["beta"])
    with np.errstate(all="ignore"):
        return (alpha * A / (beta * B)) ** (1.0 / (alpha + beta)), beta / (alpha + beta), alpha / (alpha + beta)


def frontier(values: Mapping[str, np.ndarray], budgets: Sequence[float]) -> dict[str, np.ndarray]:
    """Exponents, G and N_opt, D_opt at each budget; ``values`` may hold arrays (bootstrap samples)."""
    G, a, b = frontier_terms(values)
    with np.errstate(all="ignore"):
        C = np.asarray(budgets, dtype=float)
        n_opt = G[..., None] * (C / 6.0) ** a[..., None]
        d_opt = (C / 6.0) ** b[..., None] / G[..., None]
    return {"a": a, "b": b, "G": G, "N_opt": n_opt, "D_opt": d_opt}

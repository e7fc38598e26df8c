"""Laws as configured in ``conf/law/*.yaml``, exponent ties, and the law compiled for fitting.

A law's config gives its formula (evaluated by ``fit.laws.law.Law``), which parameters are positive (fitted as
logarithms: with positive inputs this turns ``E + A/N^alpha + B/D^beta`` into the log-sum-exp form of Hoffmann
et al.), optional bounds, and optional initial-grid entries. ``CompiledLaw`` differentiates the same formula with
sympy, so a law added in configuration gets exact gradients without touching the fitter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import sympy as sp

from scaling_lab.fit.expr import to_sympy
from scaling_lab.fit.laws.law import Law


@dataclass(frozen=True)
class LawSpec:
    """One configured law: the formula plus what the fitter needs to know about its parameters."""

    law: Law
    positive: tuple[str, ...] = ()
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    grid: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    compute_optimal: bool = False
    description: str = ""

    @property
    def name(self) -> str:
        return self.law.name

    @classmethod
    def from_config(cls, name: str, spec: Mapping[str, Any]) -> "LawSpec":
        for key in ("formula", "inputs", "params"):
            if key not in spec:
                raise ValueError(f"law {name!r}: config needs {key!r} (has {sorted(spec)})")
        law = Law.from_dict(name, spec)
        clash = [p for p in law.params if p in law.inputs]
        if clash:
            raise ValueError(f"law {name!r}: parameter(s) {clash} named like input(s) {list(law.inputs)}: the "
                             "formula cannot tell a fitted constant from a data column; rename the parameter(s)")
        positive = tuple(spec.get("positive") or ())
        bounds = {k: (float(v[0]), float(v[1])) for k, v in (spec.get("bounds") or {}).items()}
        grid = {k: tuple(float(x) for x in v) for k, v in (spec.get("grid") or {}).items()}
        unknown = (set(positive) | set(bounds) | set(grid)) - set(law.params)
        if unknown:
            raise ValueError(f"law {name!r}: positive/bounds/grid name parameters it does not have: {sorted(unknown)}")
        return cls(law=law, positive=positive, bounds=bounds, grid=grid,
                   compute_optimal=bool(spec.get("compute_optimal", False)),
                   description=str(spec.get("description", "")))


def load_laws(law_cfg: Mapping[str, Any]) -> dict[str, LawSpec]:
    """``cfg.law`` (name -> spec, one entry per law chosen with ``law=...``) as LawSpecs."""
    if not law_cfg:
        raise ValueError("no law selected: use law=chinchilla, law=inference_efficient or law=[a,b]")
    return {name: LawSpec.from_config(name, spec) for name, spec in law_cfg.items()}


def tie_map(params: Sequence[str], ties: Sequence[Sequence[str]]) -> dict[str, str]:
    """Parameter -> the free parameter it equals. Each tie group is tied to its first member the law has;
    members the law lacks are ignored (``alpha = beta = gamma`` ties only alpha and beta in Chinchilla)."""
    rep = {p: p for p in params}
    for group in ties or ():
        present = [p for p in group if p in rep]
        for p in present[1:]:
            if rep[p] != p:
                raise ValueError(f"parameter {p!r} appears in two ties: {list(ties)}")
            rep[p] = present[0]
    return rep


def tie_label(spec: LawSpec, ties: Sequence[Sequence[str]]) -> str:
    groups = {}
    for p, r in tie_map(spec.law.params, ties).items():
        groups.setdefault(r, []).append(p)
    tied = [" = ".join(g) for g in groups.values() if len(g) > 1]
    return ", ".join(tied) if tied else "none"


def linear_params(spec: LawSpec, ties: Sequence[Sequence[str]] = ()) -> tuple[str, ...]:
    """The untied parameters in which the formula is jointly linear at fixed values of the others (E, A, B in
    ``E + A/N^alpha + B/D^beta``; also in the inference-efficient law, where epsilon multiplies them and so is
    left out). Found from the formula's second derivatives: a set is kept while any pair in it, or any member with
    itself, has a non-zero one; the member with most such pairs is dropped first."""
    law = spec.law
    rep = tie_map(law.params, ties)
    symbols = {name: sp.Symbol(name, real=True) for name in (*law.inputs, *law.params)}
    expr = to_sympy(law.tree, symbols)
    alone = [p for p in law.params if rep[p] == p and sum(r == p for r in rep.values()) == 1]
    chosen = [p for p in alone if sp.simplify(sp.diff(expr, symbols[p], 2)) == 0 and expr.has(symbols[p])]
    while True:
        clash = {p: sum(sp.simplify(sp.diff(expr, symbols[p], symbols[q])) != 0 for q in chosen if q != p)
                 for p in chosen}
        worst = max(chosen, key=lambda p: clash[p], default=None)
        if worst is None or clash[worst] == 0:
            return tuple(chosen)
        chosen.remove(worst)


class CompiledLaw:
    """The law as a function of its free parameters ``theta`` (one per tie group, a positive parameter as its log
    when ``log_space``), evaluated for a batch of K parameter vectors at once over n data points.

    ``predict_jac(theta, inputs)`` returns the prediction (K, n) and its derivative with respect to each free
    parameter (a list of (K, n) arrays), both generated by sympy from the configured formula. Inputs enter
    through their logarithms, so powers of the data are exponentials (fast, and overflow-free in the usual range).
    """

    def __init__(self, spec: LawSpec, ties: Sequence[Sequence[str]] = (), log_space: bool = True,
                 natural: Sequence[str] = ()):
        self.spec = spec
        self.rep = tie_map(spec.law.params, ties)
        self.free = tuple(p for p in spec.law.params if self.rep[p] == p)
        self.is_log = np.array([log_space and p in spec.positive and p not in natural for p in self.free],
                               dtype=bool)
        self.log_space = log_space
        self.natural = tuple(p for p in natural if p in self.free)

        law = spec.law
        symbols = {name: sp.Symbol(name, real=True) for name in (*law.inputs, *law.params)}
        expr = to_sympy(law.tree, symbols)  # the parsed tree (scaling_lab.fit.expr), never sympy's own parser
        theta = [sp.Symbol(f"log_{p}" if log else p, real=True) for p, log in zip(self.free, self.is_log)]
        log_inputs = [sp.Symbol(f"log_{x}", real=True) for x in law.inputs]
        subs = {symbols[x]: sp.exp(lx) for x, lx in zip(law.inputs, log_inputs)}
        for p in law.params:
            t = theta[self.free.index(self.rep[p])]
            subs[symbols[p]] = sp.exp(t) if self.is_log[self.free.index(self.rep[p])] else t
        expr = sp.powsimp(expr.subs(subs), force=True)
        derivatives = [sp.powsimp(sp.diff(expr, t), force=True) for t in theta]
        self._fn = sp.lambdify([*theta, *log_inputs], [expr, *derivatives], modules="numpy", cse=True)

    @property
    def n_free(self) -> int:
        return len(self.free)

    def predict_jac(self, theta: np.ndarray, log_inputs: Mapping[str, np.ndarray]):
        theta = np.atleast_2d(theta)
        args = [theta[:, j:j + 1] for j in range(self.n_free)]
        args += [np.asarray(log_inputs[x], dtype=float)[None, :] for x in self.spec.law.inputs]
        shape = (theta.shape[0], args[-1].shape[1])
        with np.errstate(all="ignore"):
            out = self._fn(*args)
        pred, *jac = (np.broadcast_to(np.asarray(o, dtype=float), shape) for o in out)
        return pred, jac

    def values(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Natural parameter values (every law parameter, ties expanded) from free vectors (..., n_free)."""
        theta = np.asarray(theta, dtype=float)
        free = {p: (np.exp(theta[..., j]) if self.is_log[j] else theta[..., j]) for j, p in enumerate(self.free)}
        return {p: free[self.rep[p]] for p in self.spec.law.params}

    def theta(self, values: Mapping[str, float]) -> np.ndarray:
        return np.array([np.log(values[p]) if log else values[p] for p, log in zip(self.free, self.is_log)])

    def theta_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds in the fitted space (infinite where the config gives none)."""
        lo, hi = np.full(self.n_free, -np.inf), np.full(self.n_free, np.inf)
        for j, p in enumerate(self.free):
            if p in self.spec.bounds:
                a, b = self.spec.bounds[p]
                lo[j], hi[j] = (np.log(a) if a > 0 else -np.inf, np.log(b)) if self.is_log[j] else (a, b)
        return lo, hi

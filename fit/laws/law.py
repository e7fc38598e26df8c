"""A scaling law and its fitted constants: a small value object that evaluates with numpy alone.

A law is a named formula over named inputs (N, D, R, ...) and named parameters (E, A, B, alpha, ...), written once
in configuration (``conf/law/*.yaml``); fitting, prediction, planning and selection all evaluate the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from scaling_lab.conf import UserError
from scaling_lab.fit.expr import evaluate, parse_formula, same_formula


@dataclass(frozen=True)
class Law:
    """A scaling law: ``formula`` evaluated over ``inputs`` (data columns) and ``params`` (fitted constants)."""

    name: str
    formula: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]

    def __post_init__(self):
        # Parsed against a whitelist, never evaluated (scaling_lab.fit.expr): a hostile formula is a UserError here.
        tree = parse_formula(self.formula, (*self.inputs, *self.params), f"law {self.name!r}: formula")
        object.__setattr__(self, "tree", tree)

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "Law":
        if not isinstance(spec, Mapping):
            raise UserError(f"law {name!r} must be a mapping with formula, inputs and params")
        for key in ("formula", "inputs", "params"):
            if key not in spec:
                raise UserError(f"law {name!r} needs {key!r} (has {sorted(spec)})")
        return cls(name=name, formula=spec["formula"], inputs=_names(spec["inputs"], name, "inputs"),
                   params=_names(spec["params"], name, "params"))

    def same_as(self, other: "Law") -> bool:
        """The same formula over the same inputs (spacing and redundant parentheses aside)."""
        return same_formula(self.tree, other.tree) and set(self.inputs) == set(other.inputs)

    def evaluate(self, params: Mapping[str, Any], **inputs: Any):
        missing = [p for p in self.params if p not in params] + [i for i in self.inputs if i not in inputs]
        if missing:
            raise ValueError(f"law {self.name!r} needs {missing}")
        scope = {**{k: params[k] for k in self.params}, **{k: np.asarray(inputs[k], dtype=float) for k in self.inputs}}
        return evaluate(self.tree, scope)


def _names(value: Any, law: str, key: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise UserError(f"law {law!r}: {key} must be a list of names, not {value!r}")
    names = tuple(value)
    if not all(isinstance(n, str) for n in names):
        raise UserError(f"law {law!r}: {key} must be names, got {list(names)!r}")
    return names


@dataclass(frozen=True)
class LawConstants:
    """A law with fitted values: ``constants.predict(N=..., D=..., R=...)`` gives the loss."""

    law: Law
    values: Mapping[str, float]
    ci95: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return float(self.values[name])

    def predict(self, **inputs: Any):
        return self.law.evaluate(self.values, **inputs)

    def to_dict(self) -> dict:
        return {"formula": self.law.formula, "inputs": list(self.law.inputs),
                "params": {k: float(v) for k, v in self.values.items()},
                "ci95": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci95.items()}}

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "LawConstants":
        if not isinstance(spec, Mapping) or not isinstance(spec.get("params"), Mapping):
            raise UserError(f"law {name!r} needs params as a mapping of name -> value")
        try:
            values = {k: float(v) for k, v in spec["params"].items()}
            ci = {k: (float(v[0]), float(v[1])) for k, v in (spec.get("ci95") or {}).items()}
        except (TypeError, ValueError, IndexError, AttributeError) as err:
            raise UserError(f"law {name!r}: params and ci95 must be numbers ({err})") from None
        law = Law.from_dict(name, {"formula": spec.get("formula"), "inputs": spec.get("inputs"),
                                   "params": list(values)})
        return cls(law=law, values=values, ci95=ci)

"""The one parser of user-written expressions: law formulas and row queries are parsed, never evaluated.

A formula (``conf/law/*.yaml``, a law file given with ``--config-dir``, a fit.json) or a row query
(``source.rows``, ``source.fit_rows``, ``source.heldout_rows``) is parsed with Python's ``ast`` and every node is
checked against a whitelist; what passes becomes a small expression tree of tuples that this module evaluates with
numpy (formulas), over a DataFrame's columns (queries), or converts to sympy (the fitter's gradients). Nothing is
ever handed to ``eval``, ``compile``, ``sympy.parse_expr`` or ``DataFrame.eval``.

* formulas: numbers, the declared input and parameter names, ``+ - * / **``, unary ``-``/``+``, the functions
  ``exp log sqrt abs`` (one argument) and ``minimum maximum`` (two), and the constant ``pi``;
* queries: column names, numbers and strings, arithmetic as above, comparisons (``== != < <= > >=``, chained),
  ``and or not`` and their pandas spellings ``& | ~``.

Anything else (a call of another function, an attribute, a subscript, a lambda, a comprehension, a dunder name, an
undeclared name, an import...) is a one-line ``UserError`` naming what was refused.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Iterable, Mapping

import numpy as np

from scaling_lab.conf import UserError

MAX_LENGTH = 2000   # characters of one expression
MAX_DEPTH = 60      # nesting of the tree (ast and sympy recurse)

FUNCTIONS = {"exp": 1, "log": 1, "sqrt": 1, "abs": 1, "minimum": 2, "maximum": 2}  # name -> number of arguments
CONSTANTS = {"pi": math.pi}

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_BOOL_BINOPS = {ast.BitAnd: "and", ast.BitOr: "or"}
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_NP_FUNCTIONS = {"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs, "minimum": np.minimum,
                 "maximum": np.maximum}


class ExpressionError(UserError):
    """An expression uses something outside the whitelist, or is not an expression at all."""


def _describe(node: ast.AST) -> str:
    kinds = {ast.Lambda: "a lambda", ast.Attribute: "attribute access", ast.Subscript: "a subscript",
             ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
             ast.GeneratorExp: "a comprehension", ast.Call: "a function call", ast.NamedExpr: "an assignment",
             ast.IfExp: "a conditional", ast.List: "a list", ast.Tuple: "a tuple", ast.Dict: "a dict",
             ast.Set: "a set", ast.Starred: "a starred expression", ast.JoinedStr: "an f-string",
             ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield"}
    for kind, text in kinds.items():
        if isinstance(node, kind):
            return text
    return type(node).__name__


def _parse(text: Any, what: str) -> ast.AST:
    if not isinstance(text, str):
        raise ExpressionError(f"{what} must be a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"{what} is {len(text)} characters long (at most {MAX_LENGTH})")
    if "__" in text:
        raise ExpressionError(f"{what} {_short(text)} is refused: dunder names are not allowed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"{what} {_short(text)} is not an expression: {err.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ExpressionError(f"{what} {_short(text)} is nested too deeply") from None
    return tree.body


def _short(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n] + "...")


class _Converter:
    def __init__(self, text: str, what: str, names: Iterable[str], query: bool):
        self.text, self.what, self.names, self.query = text, what, set(names), query

    def refuse(self, why: str):
        allowed = ("column names, numbers, strings, + - * / **, comparisons, and/or/not (& | ~)" if self.query
                   else "its inputs and parameters, numbers, + - * / **, exp log sqrt abs minimum maximum, pi")
        raise ExpressionError(f"{self.what} {_short(self.text)} is refused: {why} (allowed: {allowed})")

    def convert(self, node: ast.AST, depth: int = 0):
        if depth > MAX_DEPTH:
            self.refuse("it is nested too deeply")
        d = depth + 1
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                if self.query:
                    return ("const", value)
                self.refuse(f"{value!r} is not a number")
            if isinstance(value, (int, float)):
                return ("num", float(value))
            if isinstance(value, str) and self.query:
                return ("const", value)
            self.refuse(f"the constant {value!r} is not allowed")
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return ("name", node.id)
            if not self.query and node.id in CONSTANTS:
                return ("num", CONSTANTS[node.id])
            if self.query:
                self.refuse(f"{node.id!r} is not a column (columns: {sorted(self.names)})")
            self.refuse(f"the name {node.id!r} is not declared (inputs and params: {sorted(self.names)})")
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None and self.query:
                op = _BOOL_BINOPS.get(type(node.op))
            if op is None:
                self.refuse(f"the operator {type(node.op).__name__} is not allowed")
            return ("bin", op, self.convert(node.left, d), self.convert(node.right, d))
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return ("neg", self.convert(node.operand, d))
            if isinstance(node.op, ast.UAdd):
                return self.convert(node.operand, d)
            if self.query and isinstance(node.op, (ast.Not, ast.Invert)):
                return ("not", self.convert(node.operand, d))
            self.refuse(f"the operator {type(node.op).__name__} is not allowed")
        if isinstance(node, ast.Call) and not self.query:
            fn = node.func
            if not isinstance(fn, ast.Name) or fn.id not in FUNCTIONS:
                name = fn.id if isinstance(fn, ast.Name) else _describe(fn)
                self.refuse(f"calling {name!r} is not allowed")
            if node.keywords or len(node.args) != FUNCTIONS[fn.id] or any(isinstance(a, ast.Starred)
                                                                         for a in node.args):
                self.refuse(f"{fn.id} takes {FUNCTIONS[fn.id]} positional argument(s)")
            return ("call", fn.id, *(self.convert(a, d) for a in node.args))
        if self.query and isinstance(node, ast.Compare):
            ops = [_COMPARE.get(type(o)) for o in node.ops]
            if None in ops:
                self.refuse(f"the comparison {type(node.ops[ops.index(None)]).__name__} is not allowed")
            operands = [self.convert(node.left, d), *(self.convert(c, d) for c in node.comparators)]
            parts = [("cmp", op, a, b) for op, a, b in zip(ops, operands, operands[1:])]
            out = parts[0]
            for p in parts[1:]:
                out = ("bin", "and", out, p)
            return out
        if self.query and isinstance(node, ast.BoolOp):
            op = "and" if isinstance(node.op, ast.And) else "or"
            values = [self.convert(v, d) for v in node.values]
            out = values[0]
            for v in values[1:]:
                out = ("bin", op, out, v)
            return out
        self.refuse(f"{_describe(node)} is not allowed")


# ----- formulas --------------------------------------------------------------------------------------------------

def parse_formula(text: Any, names: Iterable[str], what: str = "formula") -> tuple:
    """The expression tree of a law formula over ``names`` (its inputs and parameters)."""
    names = list(names)
    bad = [n for n in names if not str(n).isidentifier() or "__" in str(n) or n in FUNCTIONS or n in CONSTANTS]
    if bad:
        raise ExpressionError(f"{what}: {bad} cannot name an input or parameter")
    return _Converter(text, what, names, query=False).convert(_parse(text, what))


def evaluate(tree: tuple, scope: Mapping[str, Any]):
    """The tree's value with numpy, names looked up in ``scope``."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "const":
        return tree[1]
    if kind == "name":
        return scope[tree[1]]
    if kind == "neg":
        return -evaluate(tree[1], scope)
    if kind == "call":
        return _NP_FUNCTIONS[tree[1]](*(evaluate(a, scope) for a in tree[2:]))
    if kind == "bin":
        a, b = evaluate(tree[2], scope), evaluate(tree[3], scope)
        op = tree[1]
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return np.divide(a, b)
        if op == "**":
            return np.power(a, b)
        if op == "and":
            return a & b
        if op == "or":
            return a | b
    if kind == "not":
        return ~evaluate(tree[1], scope)
    if kind == "cmp":
        a, b = evaluate(tree[2], scope), evaluate(tree[3], scope)
        return _compare(tree[1], a, b)
    raise ValueError(f"not an expression tree node: {kind!r}")


def _compare(op: str, a, b):
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


def to_sympy(tree: tuple, symbols: Mapping[str, Any]):
    """The tree as a sympy expression over ``symbols`` (name -> sympy Symbol); numbers become sympy Floats (never
    exact integer powers a hostile ``9**9**9`` would spend forever on)."""
    import sympy as sp

    kind = tree[0]
    if kind == "num":
        v = tree[1]
        return sp.pi if v == math.pi else (sp.Integer(int(v)) if v.is_integer() and abs(v) <= 16 else sp.Float(v))
    if kind == "name":
        return symbols[tree[1]]
    if kind == "neg":
        return -to_sympy(tree[1], symbols)
    if kind == "call":
        fn = {"exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "abs": sp.Abs, "minimum": sp.Min,
              "maximum": sp.Max}[tree[1]]
        return fn(*(to_sympy(a, symbols) for a in tree[2:]))
    if kind == "bin":
        a, b = to_sympy(tree[2], symbols), to_sympy(tree[3], symbols)
        op = tree[1]
        if op == "**":
            if a.is_number and b.is_number:  # a constant power: as a float, never an exact giant integer
                return sp.Float(a) ** sp.Float(b)
            return a ** b
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[op]()
    raise ValueError(f"a formula has no {kind!r} node")


def same_formula(a: tuple, b: tuple) -> bool:
    """Two formula trees are the same formula (the same tree: spacing and redundant parentheses do not matter)."""
    return a == b


# ----- row queries ---------------------------------------------------------------------------------------------

def parse_query(text: Any, columns: Iterable[str], what: str = "query") -> tuple:
    """The expression tree of a row query over ``columns``."""
    columns = [c for c in map(str, columns) if c.isidentifier()]
    return _Converter(text, what, columns, query=True).convert(_parse(text, what))


def query_mask(frame, text: str, what: str = "query"):
    """The rows of ``frame`` (a DataFrame) the query selects, as a boolean Series."""
    import pandas as pd

    tree = parse_query(text, frame.columns, what)
    scope = {c: frame[c] for c in frame.columns if isinstance(c, str) and c.isidentifier()}
    try:
        with np.errstate(all="ignore"):
            mask = evaluate(tree, scope)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ExpressionError(f"{what} {_short(text)} failed: {err}") from None
    if not isinstance(mask, pd.Series) or mask.dtype != bool:
        raise ExpressionError(f"{what} {_short(text)} must give one true/false per row")
    return mask

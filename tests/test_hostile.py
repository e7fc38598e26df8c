"""Hostile formulas and row queries are parsed, never evaluated: refused with one line by every command.

Each hostile expression tries to create a marker file (through os.system, open, eval, a class-hierarchy walk...).
It is put where a user would put it: a fit.json (read by select, verify, plan, latency, report), a law file given
with ``--config-dir`` (fit, plan), a config value (``+law.<name>.formula=...``, ``source.rows=...``). Every
command must refuse it with ``scaling-<cmd>: error: ...`` on one line, exit 2, and the marker must never appear.
The commands are the installed console scripts, run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from scaling_lab.conf import UserError
from scaling_lab.fit.expr import parse_formula, query_mask
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.laws.law import Law
from scaling_lab.fit.laws.spec import CompiledLaw, LawSpec

BIN = Path(sys.executable).parent
IE = "(E + A / N**alpha + B / D**beta) * (1 + epsilon * R**gamma)"
CH = "E + A / N**alpha + B / D**beta"
IE_PARAMS = {"E": 1.7, "A": 400.0, "B": 400.0, "alpha": 0.34, "beta": 0.28, "epsilon": 0.01, "gamma": 0.5}
CH_PARAMS = {"E": 1.7, "A": 400.0, "B": 400.0, "alpha": 0.34, "beta": 0.28}

# label -> formula over N, D, R (and the law's params); {m} is the marker file's path. Each one would create it if
# evaluated by eval(), sympy.parse_expr() or DataFrame.eval(engine="python").
HOSTILE_FORMULAS = {
    "lambda + subclass walk": "(lambda: [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "
                              "'catch_warnings'][0]()._module.__builtins__['open']('{m}', 'w'))()",
    "__import__": "__import__('os').system('touch {m}')",
    "lambda": "(lambda: __import__('os').system('touch {m}'))() or E",
    "open() call": f"{CH} + 0 * len(open('{{m}}', 'w').name)",
    "nested in a whitelisted call": "E + exp(open('{m}', 'w').write('x'))",
    "eval()": "eval(\"open('{m}', 'w')\")",
    "attribute access": "exp.__globals__['os'].system('touch {m}')",
    "attribute, no dunder": "N.real + E",
    "subscript": "N[0] + E",
    "comprehension": "[open('{m}', 'w') for x in (1,)][0]",
    "walrus": "(f := open('{m}', 'w')) and E",
    "getattr": "getattr(N, 'real') + E",
    "statement": "import os; os.system('touch {m}')",
    "generator": "sum(open('{m}', 'w') for _ in (1,))",
}
# label -> row query over the CSV's columns N, D, loss.
HOSTILE_QUERIES = {
    "query: __import__": "__import__('os').system('touch {m}') == 0",
    "query: method call": "loss.nlargest(5).min() < 3",
    "query: pandas @local": "@pd.io.common.os.system('touch {m}')",
    "query: lambda": "(lambda: open('{m}', 'w'))() is None",
    "query: subscript": "N[0] > 1",
}


def _formula(label: str, mark: Path) -> str:
    return HOSTILE_FORMULAS[label].replace("{m}", str(mark))


def _query(label: str, mark: Path) -> str:
    return HOSTILE_QUERIES[label].replace("{m}", str(mark))


def _fit_json(path: Path, ie_formula: str = IE, ch_formula: str = CH) -> Path:
    doc = {"schema_version": 1, "provenance": {"source": "test", "n_convention": "non_embedding"},
           "laws": {"chinchilla": {"formula": ch_formula, "inputs": ["N", "D"], "params": CH_PARAMS},
                    "inference_efficient": {"formula": ie_formula, "inputs": ["N", "D", "R"], "params": IE_PARAMS}},
           "latency": {"model": "linear", "decode_ms_per_token": {"intercept": 0.1, "per_layer": 0.01,
                                                                  "per_layer_d2": 1e-8}}}
    path.write_text(json.dumps(doc))
    return path


def _csv(path: Path) -> Path:
    N, D = np.geomspace(1e6, 1e8, 12), np.geomspace(1e8, 1e10, 12)[::-1]
    pd.DataFrame({"N": N, "D": D, "loss": 2 + 400 / N ** 0.34 + 400 / D ** 0.28}).to_csv(path, index=False)
    return path


def _run(cmd: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([str(BIN / cmd), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


# ----- in-process: every hostile expression through every parser entry point ----------------------------------

@pytest.mark.parametrize("label", sorted(HOSTILE_FORMULAS))
def test_hostile_formula_refused_by_every_reader(tmp_path, label):
    mark = tmp_path / "pwned"
    formula = _formula(label, mark)
    for make in (lambda: Law("x", formula, ("N", "D", "R"), tuple(IE_PARAMS)),
                 lambda: LawSpec.from_config("x", {"formula": formula, "inputs": ["N", "D", "R"],
                                                   "params": list(IE_PARAMS)}),
                 lambda: read_fit_json(_fit_json(tmp_path / "fit.json", ie_formula=formula)),
                 lambda: read_fit_json(_fit_json(tmp_path / "fit.json", ch_formula=formula))):
        with pytest.raises(UserError) as err:
            make()
        message = str(err.value)
        assert "\n" not in message and ("refused" in message or "not an expression" in message), message
    assert not mark.exists()


@pytest.mark.parametrize("label", sorted(HOSTILE_QUERIES))
def test_hostile_query_refused(tmp_path, label):
    mark = tmp_path / "pwned"
    frame = pd.read_csv(_csv(tmp_path / "runs.csv"))
    with pytest.raises(UserError, match="refused|not an expression"):
        query_mask(frame, _query(label, mark), "source.rows query")
    assert not mark.exists()


def test_whitelisted_formulas_and_queries_work():
    law = Law("x", "maximum(E, 0) + A * exp(-alpha * log(N)) + sqrt(abs(-B)) / D**beta - 0 * pi",
              ("N", "D"), ("E", "A", "B", "alpha", "beta"))
    value = law.evaluate(CH_PARAMS, N=1e6, D=1e9)
    assert value == pytest.approx(1.7 + 400 * 1e6 ** -0.34 + 20 / 1e9 ** 0.28)
    spec = LawSpec.from_config("chinchilla", {"formula": CH, "inputs": ["N", "D"], "params": list(CH_PARAMS),
                                              "positive": ["E", "A", "B"]})
    model = CompiledLaw(spec)
    pred, jac = model.predict_jac(model.theta(CH_PARAMS), {"N": np.log([1e6]), "D": np.log([1e9])})
    assert pred[0, 0] == pytest.approx(1.7 + 400 * 1e6 ** -0.34 + 400 * 1e9 ** -0.28) and len(jac) == 5
    frame = pd.DataFrame({"N": [1.0, 2.0, 3.0], "D": [3.0, 2.0, 1.0], "status": ["ok", "ok", "failed"]})
    mask = query_mask(frame, "(N > 1) & ~(D == 1) or status == 'failed' and not N * 2 < 1", "q")
    assert mask.tolist() == [False, True, True]
    assert query_mask(frame, "1 < N <= 2", "q").tolist() == [False, True, False]
    # a constant power is a float, never an exact integer a hostile 9**9**9 would spend forever on
    import sympy as sp

    from scaling_lab.fit.expr import to_sympy

    assert to_sympy(parse_formula("E * 9**9**9", ["E"]), {"E": sp.Symbol("E")}).is_finite is not False


# ----- real processes: the installed console scripts --------------------------------------------------------------

def _cases(tmp: Path) -> list[tuple[str, str, list[str]]]:
    """(label, command, args): each hostile formula in at least one command's input, each command several."""
    mark = tmp / "pwned"
    results = tmp / "results"
    (results / "demo").mkdir(parents=True, exist_ok=True)
    (results / "demo" / "abc.json").write_text(json.dumps({"run_id": "abc", "sweep": "demo", "status": "ok"}))
    csv = _csv(tmp / "runs.csv")
    cases = []
    labels = sorted(HOSTILE_FORMULAS)
    fit_readers = [
        ("scaling-select", lambda f: [f"constants={f}", "budget.tokens=1e9", "budget.params=1e6", f"out={tmp}/sel"]),
        ("scaling-verify", lambda f: [f"constants={f}", f"results_dir={results}", f"out={tmp}/ver"]),
        ("scaling-plan", lambda f: [f"constants={f}", "target.loss=2.5", f"out={tmp}/plan"]),
        ("scaling-latency", lambda f: [f"constants={f}", f"out={tmp}/lat", "shapes.n_layers=[1]"]),
        ("scaling-report", lambda f: [f"constants={f}", f"results_dir={results}", f"out={tmp}/report.md"]),
    ]
    for i, (cmd, args) in enumerate(fit_readers):
        for j in range(2):  # two formulas per command, rotating so all are used
            label = labels[(2 * i + j) % len(labels)]
            where = "inference_efficient" if j == 0 else "chinchilla"
            kwargs = {"ie_formula" if j == 0 else "ch_formula": _formula(label, mark)}
            fit = _fit_json(tmp / f"fit-{cmd}-{j}.json", **kwargs)
            cases.append((f"fit.json ({where}): {label}", cmd, args(fit)))
    # a law file given with --config-dir: scaling-fit law=evil, and scaling-plan with a replaced chinchilla
    for k, label in enumerate(labels[10:12]):
        conf = tmp / f"conf-fit-{k}"
        (conf / "law").mkdir(parents=True)
        (conf / "law" / "evil.yaml").write_text(yaml.safe_dump(
            {"evil": {"formula": _formula(label, mark), "inputs": ["N", "D"], "params": list(CH_PARAMS)}}))
        cases.append((f"law file: {label}", "scaling-fit",
                      ["--config-dir", str(conf), "source=csv", f"source.path={csv}", "law=evil", "bootstrap.n=0",
                       "plots=false", f"out={tmp}/fit{k}"]))
    conf = tmp / "conf-plan"
    (conf / "law").mkdir(parents=True)
    (conf / "law" / "chinchilla.yaml").write_text(yaml.safe_dump(
        {"chinchilla": {"formula": _formula(labels[12], mark), "inputs": ["N", "D"], "params": list(CH_PARAMS)}}))
    cases.append((f"law file: {labels[12]}", "scaling-plan",
                  ["--config-dir", str(conf), "constants=hoffmann2022", "target.loss=2.5", f"out={tmp}/plan2"]))
    # config values: a formula on the command line, and row queries
    cases.append((f"config +law formula: {labels[13]}", "scaling-fit",
                  ["source=csv", f"source.path={csv}", "law=chinchilla",
                   f"+law.evil.formula=\"{_formula(labels[13], mark)}\"", "+law.evil.inputs=[N,D]",
                   "+law.evil.params=[E,A,B,alpha,beta]", "bootstrap.n=0", "plots=false", f"out={tmp}/fit9"]))
    for key, label in zip(("source.rows", "source.fit_rows", "source.heldout_rows"), sorted(HOSTILE_QUERIES)):
        cases.append((f"config {key}: {label}", "scaling-fit",
                      ["source=csv", f"source.path={csv}", "law=chinchilla", f"{key}=\"{_query(label, mark)}\"",
                       "bootstrap.n=0", "plots=false", f"out={tmp}/fitq"]))
    return cases


@pytest.mark.slow
def test_every_command_refuses_hostile_expressions(tmp_path):
    cases = _cases(tmp_path)
    assert len({c[0].split(": ", 1)[1] for c in cases}) >= 10
    assert {c[1] for c in cases} >= {"scaling-select", "scaling-verify", "scaling-plan", "scaling-latency",
                                     "scaling-report", "scaling-fit"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda c: (c, _run(c[1], c[2], tmp_path)), cases))
    failures = []
    for (label, cmd, args), proc in done:
        lines = proc.stderr.strip().splitlines()
        ok = (proc.returncode == 2 and len(lines) >= 1 and lines[-1].startswith(f"{cmd}: error: ")
              and "Traceback" not in proc.stderr)
        if not ok:
            failures.append(f"{label} / {cmd}: exit {proc.returncode}: {proc.stderr[-600:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "pwned").exists()

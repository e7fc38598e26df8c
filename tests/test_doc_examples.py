"""Every command example in the docs runs: the installed command, against a real tiny results folder.

What an example is: a line that starts with ``scaling-<cmd>``, ``make``, ``python scripts/...`` or
``python -m scaling_lab...``, in a fenced code block or a 4-space-indented block of the markdown docs (the files
``tests/test_doc_references.py`` reads, but ``scripts/output/``: what scripts printed and a dated log, history like
CHANGELOG.md) or in a help page, ``conf/hydra/help/*.yaml`` (its Usage and Examples lines: what ``--help``
prints). A trailing ``\\`` joins the next line; a ``# comment`` (markdown) or a run of 3 spaces (a help page's
description column) ends it.

Each example is one test case (id ``file:line``) and exactly one of:

* excluded: ``EXCLUDED`` names it, with the reason (the whole study, a GPU);
* a synopsis: it still has a placeholder (``<name>``, ``...``) after ``SUBSTITUTIONS``. It cannot run, so the
  command composes its concrete ``key=value`` words (``--cfg job``): an unknown key or a bad value fails;
* run: ``SUBSTITUTIONS`` map the docs' names (the demo sweep, a run id, ``../shared``) onto the shared folder,
  ``SHRINK`` appends overrides to what would train or measure for long (and turns W&B off), and the command must
  exit 0. One that reads ``../shared`` is skipped, with the reason, where that folder is absent.

The shared folder is what the demo's stages write, at smoke size, built once by doc examples themselves
(``FIXTURE``). Each example runs in its own copy of it, after the examples above it in its code block (a help page
is one block) whose output folder (``out=``) it reads: the second export example reads what the first wrote. A
command line that several docs show runs once on its copy, and its cases share what it printed.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from scaling_lab.fit.io import store
from tests.helpers import SHARED, TINY
from tests.test_doc_references import ROOT, doc_texts

BIN = Path(sys.executable).parent
COMMAND = re.compile(r"(?:scaling-[a-z-]+|make|python scripts/\S+|python -m scaling_lab[\w.]*)(?=\s|$)")
# <name>, <run id>, <preset|fit.json>, <...> and an elision (`...`, `=..`): what a reader fills in
PLACEHOLDER = re.compile(r"<(?:\w[^<>'\"=]*|\.\.\.)>|\.\.")

# Examples that are not run, and why.
EXCLUDED = {
    "make demo": "the whole study (minutes on 2 cores): its stages are the examples run here, at smoke size",
    "make test": "the whole test suite, this file included",
    "scaling-fit sweep=isoflop source.columns.budget=flops_budget":
        "needs an isoFLOP sweep's records (18 runs); Approach 2 runs here on the published isoFLOP CSVs",
    "scaling-fit --config-dir mylaws 'law=[chinchilla,kaplan_n]' source=csv source.path=...":
        "needs the law file shown above it, mylaws/law/kaplan_n.yaml",
    "scaling-train -m sweep=paper_small hydra/launcher=submitit_slurm hydra.launcher.partition=gpu train=gpu":
        "needs a SLURM cluster with GPUs",
    "scaling-train train=gpu_ddp train.devices=4 model.params=1e8 train.tokens_per_param=20": "needs 4 GPUs",
    "scaling-latency arch=bian2025 measure.device=cuda 'shapes.params=[1e8,1e9]' out=results/latency/gpu":
        "needs a CUDA GPU",
}

# The docs' names -> the shared folder's (regular expressions, in order; {shared}, {root} and {run} are filled in).
SUBSTITUTIONS = {
    r"\bdemo\b": "smoke",                                   # the demo sweep and its paths: the smoke sweep
    r"run=(?:<run id>|3f2a9c0b71de)": "run={run}",          # a run of it that kept its weights
    r"\.\./shared/": "{shared}/",                           # the published data
    r"source\.path=losses\.csv(?= source\.columns\.N=N_params)": "source.path={shared}/reference/bian2025/losses.csv",
    r"source\.path=losses\.csv(?= source\.columns\.N=params)":
        "source.path={shared}/reference/isoflops/epochai_chinchilla.csv",
    r"results/fit/<sweep>/": "results/fit/smoke/",
    r"data\.path=(?:books/|/data/books)": "data.path={root}/pipeline",   # a corpus of files: this package's source
    r"select\.latency_budget_ms=0\.4": "select.latency_budget_ms=1e3",  # a budget a busy test machine meets too
    r" results_dir=results(?=\s|$)": "",                   # the default: the same command as without it
}

# Overrides appended to what would train or measure for long, by the longest command prefix they match; logger=none
# also for the rest (a stage's offline W&B run costs seconds).
SHRINK = {
    "scaling-train": [*TINY, "logger=none"],                # one run: the tests' tiny run
    "scaling-train -m": ["data.eval_tokens=2048", "data.val_curve_tokens=512", "latency.repeats=1",
                         "train.threads=1", "logger=none"],  # the smoke sweep: FIXTURE trained it, a re-launch skips it
    "scaling-fit": ["bootstrap.n=20", "logger=none"],
    "scaling-latency": ["shapes.params=[2e4]", "measure.rounds=1", "measure.repeats=1", "logger=none"],
    "scaling-select": ["select.protocol.repeats=1", "logger=none"],
    "scaling-verify": ["params_factor=1.0", "tokens_per_param=2", "remeasure_rounds=1",
                       'train_overrides=["logger=none"]', "logger=none"],
    "scaling-quantize": ["rows='params_non_embedding > 2e4 and tokens_budget > 1e5'", "measure.repeats=1",
                         "logger=none"],
    "scaling-speculate": ["prompts=1", "new_tokens=8", "repeats=1", "logger=none"],
    "scaling-plan": ["logger=none"],
    "scaling-report": ["logger=none"],
}

# The shared folder: the demo's stages at smoke size (2 sizes x 2 depths x 2 budgets, weights kept), as the docs
# write them; then SUBSTITUTIONS and SHRINK as for every example.
FIXTURE = [
    "scaling-train -m sweep=demo hydra/launcher=joblib hydra.launcher.n_jobs=2 train.tokens_per_param=2,4 "
    "train.save_model=true",
    "scaling-fit sweep=demo 'source.fit_rows=\"params_non_embedding < 1e5\"' 'protocol.ties=[[alpha,beta]]'",
    "scaling-latency sweep=demo constants=results/fit/demo/fit.json 'measure.modes=[none,int8,int4]'",
    "scaling-quantize sweep=demo",
    "scaling-speculate sweep=demo 'ks=[1,2,4]'",
]


@dataclass(frozen=True)
class Example:
    where: str   # file:line
    block: str   # the code block (or help page) it belongs to
    text: str    # the command as written, continuation lines joined, its comment cut


def _cut(line: str, end: re.Pattern) -> str:
    """``line`` up to the first match of ``end`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif end.match(line, i):
            return line[:i]
    return line


def _commands(rel: Path, numbered: list[tuple[int, str]], end: re.Pattern):
    """The examples among the (line number, text) lines of one block."""
    block = f"{rel}:{numbered[0][0]}" if numbered else ""
    lines = iter(numbered)
    for n, line in lines:
        text = line.strip()
        if not COMMAND.match(text):
            continue
        while text.endswith("\\"):
            text = text[:-1].rstrip() + " " + next(lines, (0, ""))[1].strip()
        yield Example(f"{rel}:{n}", block, _cut(text, end).strip())


def markdown_examples(texts):
    """The examples in the code blocks of markdown ``texts``, (file, line, text) as ``doc_texts`` yields them."""
    comment = re.compile(r"\s+#")
    for rel, lines in itertools.groupby(texts, key=lambda t: t[0]):
        if rel.suffix != ".md" or rel.parts[:2] == ("scripts", "output"):
            continue
        fenced, block = False, []
        for _, n, line in lines:
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced or line.startswith("    "):
                block.append((n, line))
                continue
            yield from _commands(rel, block, comment)
            block = []
        yield from _commands(rel, block, comment)


def help_examples(root: Path = ROOT):
    """The examples of every help page (its template's lines), a page being one block."""
    for path in sorted((root / "conf" / "hydra" / "help").glob("*.yaml")):
        text = path.read_text()
        start = next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith("template:"))
        template = yaml.safe_load(text)["template"].splitlines()
        yield from _commands(path.relative_to(root), [(start + k, line) for k, line in enumerate(template, 1)],
                             re.compile(r"\s{3,}"))


def all_examples() -> list[Example]:
    # doc_texts yields the markdown files first: stop there (its Python prose is not needed)
    markdown = itertools.takewhile(lambda t: t[0].suffix == ".md", doc_texts())
    return [*markdown_examples(markdown), *help_examples()]


def substitute(text: str, run: str = "") -> str:
    for pattern, replacement in SUBSTITUTIONS.items():
        text = re.sub(pattern, replacement.format(shared=SHARED, root=ROOT, run=run), text)
    return text


def kind(example: Example) -> str:
    """excluded, synopsis or run."""
    if example.text in EXCLUDED:
        return "excluded"
    return "synopsis" if PLACEHOLDER.search(substitute(example.text)) else "run"


def argv(text: str, extra: list[str]) -> list[str]:
    """The command line of ``text``: the installed command (or this interpreter for ``python``) and its words."""
    words = shlex.split(text) + extra
    return [sys.executable if words[0] == "python" else str(BIN / words[0]), *words[1:]]


def shrink_key(text: str) -> str | None:
    """The longest SHRINK prefix ``text`` starts with."""
    return max((p for p in SHRINK if text == p or text.startswith(p + " ")), key=len, default=None)


def shrunk(text: str) -> list[str]:
    """``text`` with the SHRINK overrides of its longest matching prefix."""
    key = shrink_key(text)
    return argv(text, SHRINK[key] if key else [])


def synopsis_argv(text: str) -> list[str]:
    """A synopsis' concrete words composed by its command (``--cfg job``): the words with a placeholder or an
    alternative (``a|b``) dropped, optional brackets taken off, without ``-m`` (Hydra composes one job)."""
    words = shlex.split(text)
    head = 3 if words[:2] == ["python", "-m"] else 1
    keep = [w[1:-1] if w.startswith("[") and w.endswith("]") and "=" in w else w for w in words[head:]]
    keep = [w for w in keep if w != "-m" and "|" not in w and not PLACEHOLDER.search(w) and not w.startswith("[")]
    return argv(" ".join(shlex.quote(w) for w in words[:head]), [*keep, "--cfg", "job"])


def same(command: list[str]) -> tuple[str, ...]:
    """What a command line sets, word order aside: its program and flags, and each key's last value."""
    words = {}
    for word in command[1:]:
        words[word.split("=", 1)[0] if "=" in word and not word.startswith("-") else word] = word
    return (command[0], *sorted(words.values()))


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def failure(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}: {shlex.join(out.args)}\n{out.stdout[-1500:]}\n{out.stderr[-2500:]}"


EXAMPLES = all_examples()


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory, token_cache):
    """The shared folder (``results/`` of the FIXTURE stages), the environment every example runs with, a run id
    of it with saved weights, and what the FIXTURE commands printed (an example that is one of them has run)."""
    root = tmp_path_factory.mktemp("doc-examples")
    env = {"SCALING_CACHE": token_cache, "SCALING_SUBMITIT_DIR": str(root / "submitit")}
    done = {}
    for text in FIXTURE:
        command = shrunk(substitute(text))
        out = done[(same(command),)] = run(command, root, env)
        assert out.returncode == 0, failure(out)
    table = store.load_table(root / "results", "smoke")
    return root, env, str(table[table.status == "ok"].run_id.iloc[0]), done


def needs(example: Example) -> list[Example]:
    """The examples above ``example`` in its code block that write what it reads (a folder of theirs, ``out=``)."""
    before = [b for b in EXAMPLES[:EXAMPLES.index(example)] if b.block == example.block and kind(b) == "run"]
    return [b for b in before if any(w.startswith("out=") and f"={w[4:]}" in example.text
                                     for w in shlex.split(b.text))]


class Runner:
    """Examples run in fresh copies of the shared folder; the same command (after the same ones it needs) runs once."""

    def __init__(self, root: Path, env: dict[str, str], run_id: str, done: dict):
        self.root, self.env, self.run_id, self.done = root, env, run_id, dict(done)

    def run(self, example: Example) -> subprocess.CompletedProcess:
        """What ``example`` printed, run after the examples it needs (the first of them to fail, if one does)."""
        commands = [shrunk(substitute(e.text, self.run_id)) for e in [*needs(example), example]]
        chain = tuple(same(c) for c in commands)
        if chain not in self.done:
            folder = self.root / "examples" / str(len(self.done))
            shutil.copytree(self.root / "results", folder / "results")
            for k, command in enumerate(commands, 1):
                out = self.done[chain[:k]] = run(command, folder, self.env)
                if out.returncode:
                    self.done[chain] = out
                    break
        return self.done[chain]


@pytest.fixture(scope="session")
def runner(shared_folder):
    return Runner(*shared_folder)


@pytest.mark.slow
@pytest.mark.parametrize("example", [e for e in EXAMPLES if kind(e) == "run"], ids=lambda e: e.where)
def test_example_runs(example, request):
    if str(SHARED) in substitute(example.text) and not SHARED.exists():
        pytest.skip(f"{SHARED} is absent: the example reads the project's shared data")
    out = request.getfixturevalue("runner").run(example)
    assert out.returncode == 0, failure(out)


@pytest.mark.slow
@pytest.mark.parametrize("example", [e for e in EXAMPLES if kind(e) == "synopsis"], ids=lambda e: e.where)
def test_synopsis_composes(example, tmp_path):
    out = run(synopsis_argv(substitute(example.text)), tmp_path, {})
    assert out.returncode == 0, failure(out)


def test_every_example_is_run_composed_or_excluded_with_a_reason():
    """Nothing is dropped silently: each table entry names an example that is still in the docs, and every example
    is run, composed, or excluded with its reason."""
    texts = {e.text for e in EXAMPLES}
    assert not set(EXCLUDED) - texts, f"EXCLUDED names examples the docs no longer have: {set(EXCLUDED) - texts}"
    unused = [p for p in SUBSTITUTIONS if not any(re.search(p, e.text) for e in EXAMPLES)]
    assert not unused, f"SUBSTITUTIONS that match no example: {unused}"
    used = {shrink_key(substitute(t)) for t in [*texts, *FIXTURE]}
    unused = [p for p in SHRINK if p not in used]
    assert not unused, f"SHRINK entries that match no example: {unused}"
    assert all(e.text.split()[0] in {"make", "python"} or (BIN / e.text.split()[0]).exists() for e in EXAMPLES)


@pytest.mark.slow
def test_a_broken_example_fails_with_the_commands_error(tmp_path):
    """The collection and the run above catch a broken example: a key the command refuses, beside a good one."""
    doc = tmp_path / "x.md"
    doc.write_text("# x\n\n```bash\n"
                   "scaling-plan constants=sardana2024 target.chinchilla_params=7e10 demand.tokens=2e12\n"
                   "scaling-plan constants=sardana2024 target.chinchilla_params=7e10 demand.token=2e12\n```\n")
    lines = [(Path("x.md"), n, line) for n, line in enumerate(doc.read_text().splitlines(), 1)]
    good, broken = markdown_examples(lines)
    assert (good.where, broken.where) == ("x.md:4", "x.md:5") and kind(good) == kind(broken) == "run"
    assert run(shrunk(substitute(good.text)), tmp_path, {}).returncode == 0
    out = run(shrunk(substitute(broken.text)), tmp_path, {})
    assert out.returncode == 2 and "scaling-plan: error:" in out.stderr and "demand.token" in out.stderr, failure(out)

"""Every repository path and dotted module name the docs name exists: backticked references in the markdown files,
the YAML configs' comments and the Python docstrings and comments. A renamed module or file then fails here
instead of misleading a reader."""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

import pytest

from tests.helpers import SHARED

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "models", "pipeline", "fit", "conf", "scripts", "tests")
# `x` in markdown, ``x`` in docstrings; the text inside is one reference candidate
BACKTICKED = re.compile(r"``([^`\s]+)``|`([^`\s]+)`")
# a repository path: under a package or ../shared, naming a file (by its extension) or a folder (a trailing /);
# a bare file name (`fit.json`) is an output's name, not a path
EXT = r"\.(?:md|py|yaml|toml|txt|json|csv|sh|cfg)"
PATH = re.compile(r"^(?:\.\./shared/.*|(?:%s)/(?:[\w.-]+/)*(?:[\w.-]+%s)?(?:[:#].*)?)$" % ("|".join(PACKAGES), EXT))
DOTTED = re.compile(r"^(?:scaling_lab\.)?(?:models|pipeline|fit|conf)\.(?!(?:json|csv|yaml|md|py|txt)$)[A-Za-z_][\w.]*$")
# the same references written without backticks: a repository file path, or a dotted name inside the package
PLAIN = re.compile(r"(?<![\w./-])((?:%s)/[\w/.-]*%s|(?:scaling_lab\.)?(?:models|pipeline|fit)\.(?!(?:json|csv|yaml|md|py|txt)\b)"
                   r"[a-z_]\w*(?:\.[A-Za-z_]\w*)*)(?![\w/-])" % ("|".join(PACKAGES), EXT))
PLACEHOLDER = re.compile(r"[<>*{}$\[\]=]|\.\.\.")
# text that is history by design: what a release changed, under the names it had then
HISTORY = {"CHANGELOG.md"}


def doc_texts(root: Path = ROOT):
    """(file, line, text) of every piece of prose the repository's docs are made of."""
    for path in sorted(root.rglob("*.md")):
        rel = path.relative_to(root)
        if rel.parts[0].startswith(".") or str(rel) in HISTORY or "results" in rel.parts[:1]:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            yield rel, n, line
    for path in sorted((root / "conf").rglob("*.yaml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "#" in line:
                yield path.relative_to(root), n, line[line.index("#"):]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            yield from _python_prose(path, root)


def _python_prose(path: Path, root: Path):
    """The docstrings and comments of one Python file."""
    source = path.read_text()
    rel = path.relative_to(root)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                start = node.body[0].lineno
                for k, line in enumerate(doc.splitlines()):
                    yield rel, start + k, line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield rel, tok.start[0], tok.string


def resolves(ref: str, shared: Path | None) -> bool | None:
    """Whether a reference exists: True, False, or None when it cannot be checked here (../shared absent)."""
    ref = ref.rstrip(".,:;)")
    if ref.startswith("../shared/"):
        return None if shared is None else (shared / ref[len("../shared/"):].split("#")[0]).exists()
    if PATH.match(ref):
        target = ref.split("#")[0].split(":")[0]
        if target.startswith("scripts/output/"):  # a script's output, written when it runs
            return None
        return (ROOT / target).exists() or any((ROOT / p / target).exists() for p in PACKAGES) \
            or (ROOT / "conf" / target).exists()
    return _importable(ref.removeprefix("scaling_lab."))


def _importable(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("scaling_lab." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def references(texts):
    """(file, line, reference) for every backticked path or dotted module name in ``texts``."""
    for rel, n, line in texts:
        found = [m.group(1) or m.group(2) for m in BACKTICKED.finditer(line)]
        found += [m.group(1) for m in PLAIN.finditer(BACKTICKED.sub(" ", line))]
        for ref in found:
            ref = ref.rstrip(".,:;)")
            if PLACEHOLDER.search(ref) or ref.startswith(("http", "-")) or "://" in ref:
                continue
            if PATH.match(ref) or DOTTED.match(ref):
                yield rel, n, ref


def broken(texts, shared: Path | None) -> list[str]:
    return [f"{rel}:{n}: `{ref}`" for rel, n, ref in references(texts) if resolves(ref, shared) is False]


def test_every_reference_resolves():
    bad = broken(doc_texts(), SHARED if SHARED.exists() else None)
    assert not bad, f"{len(bad)} references name nothing in the repository:\n" + "\n".join(bad)


def test_a_broken_reference_is_caught():
    """The check fails on a renamed module, a missing file and a missing function, and passes the real ones."""
    texts = [(Path("x.md"), 1, "see `fit/plan_cli.py`, `fit.latency_model`, `pipeline.data.no_such_function`"),
             (Path("y.py"), 2, "# ``pipeline/data.py`` and ``scaling_lab.pipeline.data.prepare_cache`` exist")]
    assert broken(texts, None) == ["x.md:1: `fit/plan_cli.py`", "x.md:1: `fit.latency_model`",
                                   "x.md:1: `pipeline.data.no_such_function`"]


@pytest.mark.parametrize("ref", ["conf/train.yaml", "pipeline/", "models.shapes.GPTConfig", "fit.io.store"])
def test_real_references_resolve(ref):
    assert resolves(ref, None)


def test_the_readme_links_its_findings_instead_of_copying_them():
    """The README's "What it found" is a link to the generated findings plus at most 10 lines: results live in
    `scripts/output/`, not in the reference docs."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("What it found:"):].split("\n\n", 1)[0]
    assert "(scripts/output/demo_findings.md)" in block
    assert len(block.splitlines()) <= 10, block

"""One content model, two renderings: a report is a list of :class:`Section` (paragraphs, tables, figures), written
as ``report.md`` and as a self-contained ``report.html`` (inline CSS, figures as relative files beside it, no
script, no font or stylesheet fetched from anywhere: it opens from disk with no server and no network)."""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    max_rows: int = 60


@dataclass
class Inline:
    """Markup embedded as is in the HTML (an inline SVG); ``text`` stands in for it in the Markdown."""
    markup: str
    text: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)  # str (a paragraph, `code` and **bold** allowed) | Table | Figure
    missing: str | None = None                        # why the section is empty and which command fills it

    def add(self, *blocks) -> "Section":
        self.blocks.extend(b for b in blocks if b is not None)
        return self


def fmt(x: Any, digits: int = 4) -> str:
    """A number as people read it: 4 significant figures, thousands separators for integers, no 2e+01."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        a = abs(x)
        if a != 0 and (a >= 1e6 or a < 1e-3):
            mant, exp = f"{x:.{digits - 1}e}".split("e")
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        if a >= 10 ** digits or x.is_integer():
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _cells(frame: pd.DataFrame, limit: int) -> tuple[list[str], list[list[str]], int]:
    rows = [[fmt(v.item() if hasattr(v, "item") else v) for v in row] for row in frame.head(limit).itertuples(index=False)]
    return [str(c) for c in frame.columns], rows, max(0, len(frame) - limit)


# ----- Markdown ------------------------------------------------------------------------------------------------

def _md_table(t: Table) -> str:
    head, rows, more = _cells(t.frame, t.max_rows)
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    if more:
        lines.append(f"\n({more} more rows in the CSV)")
    return (f"*{t.caption}*\n\n" if t.caption else "") + "\n".join(lines)


def markdown(title: str, intro: str, sections: list[Section], folder: Path) -> str:
    parts = [f"# {title}\n", intro + "\n", "Contents: " + " · ".join(f"[{s.title}](#{s.id})" for s in sections) + "\n"]
    for s in sections:
        parts.append(f'<a id="{s.id}"></a>\n## {s.title}\n')
        if s.missing:
            parts.append(f"_{s.missing}_\n")
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_md_table(b) + "\n")
            elif isinstance(b, Figure):
                parts.append(f"![{b.caption}]({os.path.relpath(b.path, folder)})\n\n*{b.caption}*\n")
            elif isinstance(b, Inline):
                parts.append(f"*{b.text}*\n")
            else:
                parts.append(str(b) + "\n")
    return "\n".join(parts)


# ----- HTML ----------------------------------------------------------------------------------------------------

CSS = """
:root { --fg: #1d232a; --muted: #5b6670; --line: #d8dde2; --accent: #0072B2; --bg: #ffffff; --soft: #f5f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { padding: 28px 40px 18px; border-bottom: 1px solid var(--line); background: var(--soft); }
header h1 { margin: 0 0 6px; font-size: 26px; }
header p { margin: 0; color: var(--muted); max-width: 70em; }
nav { position: sticky; top: 0; z-index: 2; background: var(--bg); border-bottom: 1px solid var(--line);
      padding: 8px 40px; font-size: 13px; overflow-x: auto; white-space: nowrap; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
main { padding: 8px 40px 60px; max-width: 1280px; }
section { border-bottom: 1px solid var(--line); padding: 10px 0 24px; }
h2 { font-size: 20px; margin: 18px 0 8px; }
p.missing { color: var(--muted); font-style: italic; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.table-wrap { overflow-x: auto; margin: 10px 0 4px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: var(--muted); padding-bottom: 4px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: var(--soft); position: sticky; top: 0; font-weight: 600; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
code { background: var(--soft); padding: 1px 4px; border-radius: 3px; font-size: 90%; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 8px 24px; }
"""


def _inline(text: str) -> str:
    """Paragraph text: HTML-escaped, then `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html_table(t: Table) -> str:
    head, rows, more = _cells(t.frame, t.max_rows)
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    tail = f'<p class="missing">{more} more rows in the CSV.</p>' if more else ""
    return (f'<div class="table-wrap"><table>{cap}<thead><tr>'
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr></thead><tbody>{body}</tbody></table></div>"
            + tail)


def _html_figure(f: Figure, folder: Path) -> str:
    src = Path(os.path.relpath(f.path, folder)).as_posix()
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(f.caption)}" loading="lazy">'
            f"<figcaption>{_inline(f.caption)}</figcaption></figure>")


def to_html(title: str, intro: str, sections: list[Section], folder: Path) -> str:
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        inner = [f"<h2>{html.escape(s.title)}</h2>"]
        if s.missing:
            inner.append(f'<p class="missing">{_inline(s.missing)}</p>')
        figures: list[str] = []
        for b in s.blocks:
            if isinstance(b, Figure):
                figures.append(_html_figure(b, folder))
                continue
            if figures:
                inner.append('<div class="figures">' + "".join(figures) + "</div>")
                figures = []
            if isinstance(b, Inline):
                inner.append(f'<figure class="inline">{b.markup}<figcaption>{_inline(b.text)}</figcaption></figure>')
                continue
            inner.append(_html_table(b) if isinstance(b, Table) else f"<p>{_inline(str(b))}</p>")
        if figures:
            inner.append('<div class="figures">' + "".join(figures) + "</div>")
        body.append(f'<section id="{s.id}">' + "".join(inner) + "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{_inline(intro)}</p></header><nav>{nav}</nav>"
            f"<main>{''.join(body)}</main></body></html>\n")

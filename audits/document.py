"""The report as data: blocks (headings, text, tables, figures, the verdict) and their HTML and Markdown
renderings; every value is escaped on output (what a run directory holds is untrusted)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

PASS, FAIL, NOT_VERIFIED, NONE = "PASS", "FAIL", "NOT VERIFIED", "NONE"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str
    tone: str = ""  # "", "pass", "fail", "warn": how the paragraph is highlighted


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    row_tones: Sequence[str] = ()  # per row, as Text.tone
    compact: bool = False


@dataclass(frozen=True)
class Figure:
    name: str  # file name of the PNG next to report.md
    png: bytes
    alt: str


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS, FAIL, NOT VERIFIED or NONE (nothing to check; no effect on the verdict)
    detail: str


@dataclass(frozen=True)
class Verdict:
    status: str
    checks: Sequence[Check]


Block = Heading | Text | Table | Figure | Verdict

TONE_OF = {PASS: "pass", FAIL: "fail", NOT_VERIFIED: "warn", NONE: ""}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1b1b1b;
       max-width: 1320px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 21px; margin-top: 34px; border-bottom: 2px solid #ccc; }
h3 { font-size: 17px; margin-top: 22px; }
.verdict { border: 3px solid; border-radius: 8px; padding: 12px 18px; margin: 16px 0; }
.verdict .status { font-size: 30px; font-weight: 700; letter-spacing: 1px; }
.verdict.pass { border-color: #1a7f37; background: #eaf6ec; } .verdict.pass .status { color: #1a7f37; }
.verdict.fail { border-color: #c62828; background: #fdecea; } .verdict.fail .status { color: #c62828; }
.verdict.warn { border-color: #b26a00; background: #fff6e0; } .verdict.warn .status { color: #b26a00; }
.verdict table { background: white; width: 100%; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 14px; }
th, td { border: 1px solid #c8c8c8; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef0f3; } tbody tr:nth-child(even) { background: #f8f9fa; }
table.compact { font-size: 12px; } table.compact td { padding: 2px 6px; white-space: nowrap; }
table.compact td:nth-child(6), table.compact td:last-child { white-space: normal; }
td:first-child { white-space: nowrap; }
tr.fail td, td.fail { background: #fdecea; color: #8b1a1a; font-weight: 600; }
tr.warn td, td.warn { background: #fff6e0; } td.pass { color: #1a7f37; font-weight: 600; }
p.fail { color: #c62828; font-weight: 600; } p.warn { color: #8a5300; } p.pass { color: #1a7f37; }
img { max-width: 100%; border: 1px solid #ddd; margin: 8px 0; }
.meta { color: #555; }
"""


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """One self-contained page: every text escaped, images inline."""
    esc = html.escape
    out = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]

    def table(t: Table) -> str:
        head = "".join(f"<th>{esc(c)}</th>" for c in t.columns)
        rows = []
        for i, row in enumerate(t.rows):
            tone = t.row_tones[i] if i < len(t.row_tones) else ""
            cells = "".join(f"<td>{esc(str(c))}</td>" for c in row)
            rows.append(f'<tr class="{tone}">{cells}</tr>' if tone else f"<tr>{cells}</tr>")
        css = ' class="compact"' if t.compact else ""
        return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            css = f' class="{block.tone}"' if block.tone else ""
            out.append(f"<p{css}>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            out.append(table(block))
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode()
            out.append(f'<img src="data:image/png;base64,{data}" alt="{esc(block.alt)}">')
        elif isinstance(block, Verdict):
            rows = "".join(
                f'<tr><td>{esc(c.name)}</td><td class="{TONE_OF[c.status]}">{esc(c.status)}</td>'
                f"<td>{esc(c.detail)}</td></tr>"
                for c in block.checks
            )
            out.append(
                f'<div class="verdict {TONE_OF[block.status]}"><div class="status">{esc(block.status)}</div>'
                f"<table><thead><tr><th>check</th><th>outcome</th><th>detail</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></div>"
            )
    out.append("</body></html>\n")
    return "\n".join(out)


def _md(text: str) -> str:
    """Markdown-safe text: HTML escaped (Markdown passes HTML through) and no table, link or emphasis syntax."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    out = [f"# {_md(title)}", ""]

    def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        out.append("| " + " | ".join(_md(c) for c in columns) + " |")
        out.append("|" + "---|" * len(columns))
        out.extend("| " + " | ".join(_md(str(c)) for c in row) + " |" for row in rows)
        out.append("")

    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + _md(block.text), ""]
        elif isinstance(block, Text):
            out += [f"**{_md(block.text)}**" if block.tone == "fail" else _md(block.text), ""]
        elif isinstance(block, Table):
            table(block.columns, block.rows)
        elif isinstance(block, Figure):
            out += [f"![{_md(block.alt)}]({block.name})", ""]
        elif isinstance(block, Verdict):
            out += [f"## Verdict: **{_md(block.status)}**", ""]
            table(("check", "outcome", "detail"), [(c.name, c.status, c.detail) for c in block.checks])
    return "\n".join(out)

"""`secure-mor report RUN_DIR`: a self-contained, offline privacy report of a run directory.

Writes OUT/report.html (one file: CSS inline, plots as PNG data: URIs, no script, no
external URL) and OUT/report.md with its PNGs next to it. In this order:

    verdict     ledger integrity (verify_ledger against RUN/keys, anchored by the heads recorded in
                results.json: lines after the last one are UNANCHORED, NOT VERIFIED), epsilon
                recomputation and budgets (audits.recompute, as `audit recompute`), empirical
                audits: PASS / FAIL / NOT VERIFIED
    budgets     per party: budget, claimed and recomputed spending, remaining; cumulative epsilon plot
    empirical   RUN/audits/empirical-*.json (schema secure-mor/empirical-audit/v1): table, and the
                empirical lower bound vs the claimed epsilon
    results     every results.json (RUN/ and RUN/align/*/): configuration, accuracy before/after
                per question family, GRPO reward, timings; the clients; RUN/eval/*.json
    releases    every ledger line: time, party, kind, mechanism, claimed and recomputed epsilon, hash

Everything read from the run directory is untrusted (the report is for auditors): it is
HTML-escaped on output, and whatever is missing or malformed is stated in the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_mor.audits.recompute import UNBOUNDED_EPSILON, RecomputeError, Report, recompute_quietly
from secure_mor.audits.verify import VerifyResult, anchors_of, results_files, verify_ledger
from secure_mor.crypto.signing import read_registry
from secure_mor.ledger import Anchor, LedgerError, line_hash, parse_line

EMPIRICAL_SCHEMA = "secure-mor/empirical-audit/v1"
EMPIRICAL_FIELDS = (
    "arch",
    "epsilon_claimed",
    "delta",
    "canaries",
    "guesses",
    "correct",
    "confidence",
    "epsilon_lower_bound",
    "seconds",
)
RUN_MARKERS = ("ledger.jsonl", "keys", "results.json", "align", "eval", "clients", "data.json", "audits")

PASS, FAIL, NOT_VERIFIED, NONE = "PASS", "FAIL", "NOT VERIFIED", "NONE"
EXIT_CODES = {PASS: 0, FAIL: 1, NOT_VERIFIED: 3}  # 2: not a run directory (ReportError)


class ReportError(ValueError):
    """RUN_DIR does not exist or holds nothing Secure MoR wrote."""


# ---------------------------------------------------------------- the document: blocks rendered to HTML and Markdown


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


# ---------------------------------------------------------------- reading the run directory


@dataclass
class RunFiles:
    """What the report is built from; `notes` says what is missing or could not be read."""

    path: Path
    results: list[tuple[str, dict]] = field(default_factory=list)  # (relative path, results.json)
    evaluations: list[tuple[str, dict]] = field(default_factory=list)  # (stage, eval/<stage>.json)
    clients: list[tuple[str, dict, dict]] = field(default_factory=list)  # (party, client.json, metrics.json)
    ledger: list[dict | None] = field(default_factory=list)  # parsed lines; None: not a JSON object
    registry: dict[str, str] = field(default_factory=dict)
    empirical: list[tuple[str, dict]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8
            self.notes.append(f"{path.relative_to(self.path)}: cannot be read ({err}); left out")
            return None

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.jsonl"


def read_run(run_dir: Path) -> RunFiles:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    if not any((run_dir / name).exists() for name in RUN_MARKERS):
        raise ReportError(f"{run_dir} holds nothing Secure MoR wrote (none of {', '.join(RUN_MARKERS)})")
    run = RunFiles(run_dir)
    for path in results_files(run_dir):
        if isinstance(results := run.read_json(path), dict):
            run.results.append((str(path.relative_to(run_dir)), results))
    if not run.results:
        run.notes.append("no results.json yet (no finished alignment in this run directory)")
    for path in sorted(run_dir.glob("eval/*.json")):
        if isinstance(evaluation := run.read_json(path), dict):
            run.evaluations.append((path.stem, evaluation))
    for directory in sorted(run_dir.glob("clients/client-*")):
        client, metrics = (
            run.read_json(directory / n) if (directory / n).is_file() else None for n in ("client.json", "metrics.json")
        )
        run.clients.append(
            (directory.name, client if isinstance(client, dict) else {}, metrics if isinstance(metrics, dict) else {})
        )
    if run.ledger_path.is_file():
        for raw in run.ledger_path.read_bytes().splitlines():
            try:
                line = parse_line(raw)
            except LedgerError:
                line = None  # shown as unparsed; recomputation and verification fail on it
            run.ledger.append(line)
    else:
        run.notes.append("no ledger (ledger.jsonl): no release has been recorded, nothing to verify")
    if (run_dir / "keys").is_dir():
        run.registry = read_registry(run_dir / "keys")
    if not run.registry:
        run.notes.append("no public keys (keys/*.pub): the ledger's signatures cannot be verified")
    for path in sorted(run_dir.glob("audits/empirical-*.json")):
        audit = run.read_json(path)
        if isinstance(audit, dict) and audit.get("schema") == EMPIRICAL_SCHEMA:
            run.empirical.append((path.name, audit))
        elif audit is not None:
            run.notes.append(f"audits/{path.name}: not a {EMPIRICAL_SCHEMA} file; left out")
    return run


# ---------------------------------------------------------------- formatting untrusted values


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any, digits: int = 3) -> str:
    """A number for a table; "-" when absent, the value as text when it is not a number."""
    if value is None:
        return "-"
    if not _is_number(value):
        return str(value)
    if math.isinf(value) or value >= UNBOUNDED_EPSILON:
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _general(value: Any) -> str:
    """A small number such as a delta or a learning rate: 1e-05, not 0.000010."""
    return f"{value:g}" if _is_number(value) else _num(value)


def _ordered(keys: Any) -> list[str]:
    """Distinct keys in the order first seen (question families keep the data's order)."""
    return list(dict.fromkeys(keys))


def _eps(value: Any) -> str:
    """An epsilon as the ledger logs it (the largest float means unbounded)."""
    return _num(value, 4)


def _time(value: Any) -> str:
    if not _is_number(value) or not 0 <= value < 1e11:
        return _num(value)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))


def _short(text: Any, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hash(line: dict) -> str:
    """The line's SHA-256 (what the next line's prev_hash holds); "-" when it has no canonical form (NaN)."""
    try:
        return line_hash(line)
    except (ValueError, TypeError):
        return "-"


def mechanism_summary(mechanism: Any, depth: int = 0) -> str:
    """A DpEvent (named-tuple JSON form) in a few words, e.g. "160 x Poisson(q=0.25) Gaussian(sigma=3.584)"."""
    if mechanism is None:
        return "-"
    if not isinstance(mechanism, dict):
        return f"malformed ({type(mechanism).__name__})"
    if depth > 6:
        return "…"
    name, event = mechanism.get("class_name"), mechanism.get("event")
    if name == "GaussianDpEvent":
        return f"Gaussian(sigma={_num(mechanism.get('noise_multiplier'))})"
    if name == "LaplaceDpEvent":
        return f"Laplace(b={_num(mechanism.get('noise_multiplier'))})"
    if name == "PoissonSampledDpEvent":
        return f"Poisson(q={_num(mechanism.get('sampling_probability'), 4)}) {mechanism_summary(event, depth + 1)}"
    if name == "SelfComposedDpEvent":
        return f"{_num(mechanism.get('count'))} x {mechanism_summary(event, depth + 1)}"
    if name == "ComposedDpEvent" and isinstance(mechanism.get("events"), list):
        return "[" + "; ".join(mechanism_summary(e, depth + 1) for e in mechanism["events"]) + "]"
    if name == "NoOpDpEvent":
        return "post-processing (no cost)"
    if name == "NonPrivateDpEvent":
        return "NON-PRIVATE"
    fields = {k: v for k, v in mechanism.items() if k not in ("module_name", "class_name")}
    return _short(f"{name}({json.dumps(fields, default=str)})", 80)


# ---------------------------------------------------------------- the checks


@dataclass
class Audit:
    """The outcomes of every check, computed once and shown in several sections."""

    verification: VerifyResult | None
    recomputation: Report | None
    checks: list[Check]

    @property
    def status(self) -> str:
        statuses = {c.status for c in self.checks}
        return FAIL if FAIL in statuses else NOT_VERIFIED if NOT_VERIFIED in statuses else PASS


def run_checks(run: RunFiles, tolerance: float) -> Audit:
    verification, recomputation = None, None
    integrity = Check("Ledger integrity (hash chain, per-party order, Ed25519 signatures)", NOT_VERIFIED, "")
    arithmetic = Check(
        f"Epsilon recomputation (dp-accounting RDP and PLD, tolerance {tolerance:g})", NOT_VERIFIED, "no ledger"
    )
    budgets = Check("Budgets (every party's total within its budget)", NOT_VERIFIED, "no ledger")
    anchors, anchor_problems = anchors_of(run.results)
    if not run.ledger_path.is_file():
        released = anchors or anchor_problems
        integrity = Check(integrity.name, FAIL if released else NOT_VERIFIED,
                          "no ledger.jsonl, but results.json records releases" if released
                          else "no ledger.jsonl in the run directory")  # fmt: skip
    elif not run.registry:
        integrity = Check(integrity.name, NOT_VERIFIED, "no public keys in keys/: signatures cannot be checked")
    else:
        verification = verify_ledger(run.ledger_path, run.registry, anchors=anchors)
        integrity = Check(
            integrity.name,
            PASS if verification.ok else FAIL,
            f"{verification.entries} entries, {len(run.registry)} registered keys, head {verification.head_hash}"
            if verification.ok
            else f"line {verification.error_line}: {verification.reason}",
        )
    if run.ledger_path.is_file():
        try:
            recomputation = recompute_quietly(run.ledger, tolerance=tolerance)  # an unparsed line (None) fails
        except RecomputeError as err:
            arithmetic = Check(arithmetic.name, FAIL, f"cannot recompute: {err}")
            budgets = Check(budgets.name, NOT_VERIFIED, "not recomputed")
        else:
            entry_problems = [
                f"line {e.line} ({e.party}): {e.status}: {e.reason}" for e in recomputation.entries if not e.ok
            ]
            over = [p for p in recomputation.parties if p.status == "over budget"]
            running = [
                f"{p.party}: {p.status}: {'; '.join(p.reasons)}"
                for p in recomputation.parties
                if not p.ok and p.status != "over budget"
            ]
            problems = entry_problems + running
            arithmetic = Check(
                arithmetic.name,
                FAIL if problems else PASS,
                "; ".join(problems)
                if problems
                else f"{len(recomputation.entries)} releases and {len(recomputation.parties)} "
                "running totals agree with the claims",
            )
            budgets = Check(
                budgets.name,
                FAIL if over else PASS,
                "; ".join(f"{p.party}: {'; '.join(p.reasons)}" for p in over)
                if over
                else f"{len(recomputation.parties)} parties within budget",
            )
    anchor = _anchor_check(verification, anchors, anchor_problems)
    return Audit(verification, recomputation, [integrity, arithmetic, budgets, anchor, _empirical_check(run)])


def _anchor_check(verification: VerifyResult | None, anchors: list[Anchor], problems: list[str]) -> Check:
    """Each results.json records the ledger's entry count and head hash when it was written; verify_ledger
    checked that the ledger still holds those lines. Lines after the last recorded head are UNANCHORED:
    a cut-off tail or a party re-signing its own last entries would not show."""
    name = "Ledger anchored by the heads recorded in results.json"
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    if verification is None or not verification.ok:
        return Check(name, NOT_VERIFIED, "the ledger did not verify")
    if verification.entries == 0 and not anchors:
        return Check(name, NOT_VERIFIED, "UNANCHORED: the ledger is empty and no results.json records a head "
                                         "(an emptied ledger would look the same)")
    if verification.unanchored:
        return Check(name, NOT_VERIFIED, f"UNANCHORED: lines {verification.anchored + 1}-{verification.entries} "
                                         f"are covered by no recorded head ({len(anchors)} recorded head(s))")
    return Check(name, PASS, f"{len(anchors)} recorded head(s) found in the ledger; every line is anchored")


def _empirical_verdict(audit: dict) -> str:
    claimed, bound = audit.get("epsilon_claimed"), audit.get("epsilon_lower_bound")
    if claimed is None:
        return "non-private (nothing to contradict)"
    if not (_is_number(claimed) and _is_number(bound)):
        return "malformed"
    return "VIOLATION: lower bound above the claim" if bound > claimed else "consistent with the claim"


def _empirical_check(run: RunFiles) -> Check:
    name = "Empirical privacy audits (lower bound <= claimed epsilon)"
    if not run.empirical:
        return Check(name, NONE, "no empirical audit in this run")
    bad = [
        f"{where} ({_get(a, 'arch')}): {_empirical_verdict(a)}"
        for where, a in run.empirical
        if _empirical_verdict(a).startswith(("VIOLATION", "malformed"))
    ]
    return Check(name, FAIL if bad else PASS, "; ".join(bad) or f"{len(run.empirical)} audit(s), none above its claim")


# ---------------------------------------------------------------- plots


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(9, 4.2))


def _label(text: Any) -> str:
    """Plot text from a file: short, and no mathtext ($...$ would be parsed by matplotlib)."""
    return _short(text, 40).replace("$", r"\$")


def cumulative_epsilon_plot(run: RunFiles, audit: Audit) -> bytes | None:
    """One panel per party (budgets are often equal: shared axes would hide parties behind each
    other): its running epsilon total over the ledger's lines, claimed (solid) and recomputed
    (dotted), and its budget (dashed). Unbounded (non-private) totals cannot be drawn: the panel says so."""
    claimed: dict[str, list[tuple[int, float]]] = {}
    budget: dict[str, float] = {}
    for number, line in enumerate(run.ledger, start=1):
        party = _get(line, "party")
        if not isinstance(party, str) or not _is_number(total := _get(line, "total_epsilon")):
            continue
        claimed.setdefault(party, []).append((number, total))
        if _is_number(b := _get(line, "budget", "epsilon")):
            budget[party] = b
    if not claimed:
        return None
    recomputed: dict[str, list[tuple[int, float]]] = {}
    for e in audit.recomputation.entries if audit.recomputation else []:
        recomputed.setdefault(e.party, []).append((e.line, e.total))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(claimed), 1, figsize=(9, 0.9 + 1.5 * len(claimed)), sharex=True, squeeze=False)
    last = len(run.ledger)
    for index, (ax, (party, points)) in enumerate(zip(axes[:, 0], sorted(claimed.items()), strict=True)):
        color = f"C{index % 10}"
        finite = [(x, y) for x, y in points if y < UNBOUNDED_EPSILON]
        if finite:
            xs, ys = zip(*finite + [(last, finite[-1][1])], strict=True)
            ax.plot(xs, ys, drawstyle="steps-post", color=color, linewidth=2, label="claimed")
            if len(finite) <= 30:
                ax.plot(xs[:-1], ys[:-1], "o", color=color, markersize=4)
        if len(finite) < len(points):
            ax.text(
                0.5,
                0.5,
                "non-private release: epsilon = inf",
                transform=ax.transAxes,
                ha="center",
                color="#c62828",
                fontweight="bold",
            )
        if rec := [(x, y) for x, y in recomputed.get(party, []) if math.isfinite(y)]:
            xs, ys = zip(*rec + [(last, rec[-1][1])], strict=True)
            ax.plot(xs, ys, drawstyle="steps-post", color="black", linestyle=":", linewidth=1.5, label="recomputed")
        limit = budget.get(party)
        if limit is not None and limit < UNBOUNDED_EPSILON:
            ax.axhline(limit, color="#c62828", linestyle="--", linewidth=1.2, label=f"budget {limit:g}")
        spent = f"{finite[-1][1]:.3g}" if len(finite) == len(points) else "inf"
        of = f" of budget {limit:g}" if limit is not None and limit < UNBOUNDED_EPSILON else " (no budget logged)"
        ax.set_title(f"{_label(party)}: spent {spent}{of}", fontsize=10, loc="left")
        ax.set_ylim(
            bottom=0,
            top=max(
                [1.0] + [y * 1.15 for _, y in finite] + ([limit * 1.15] if limit and limit < UNBOUNDED_EPSILON else [])
            ),
        )
        ax.set_ylabel("epsilon")
        ax.legend(fontsize=7, loc="lower right")
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("ledger line")
    axes[-1, 0].set_xlim(0, max(last, 1) + 1)
    fig.suptitle("Cumulative privacy budget use per party", fontsize=12)
    return _png(fig)


def empirical_plot(run: RunFiles) -> bytes | None:
    """Empirical lower bound vs claimed epsilon; non-private runs drawn at the right edge, marked inf."""
    points = [(a.get("epsilon_claimed"), a.get("epsilon_lower_bound"), a.get("arch")) for _, a in run.empirical]
    points = [(c, b, arch) for c, b, arch in points if (c is None or _is_number(c)) and _is_number(b)]
    if not points:
        return None
    finite = [c for c, _, _ in points if c is not None]
    inf_x = 2 * max(finite, default=1.0)
    fig, ax = _figure()
    top = max([inf_x] + [b for _, b, _ in points])
    diagonal = 1.25 * max(finite, default=0.0)  # y = x only where claims are finite
    ax.plot([0, diagonal], [0, diagonal], color="grey", linestyle="--", linewidth=1, label="lower bound = claim")
    for claimed, bound, arch in points:
        x = inf_x if claimed is None else claimed
        color = "#c62828" if claimed is not None and bound > claimed else "#1f77b4"
        ax.scatter([x], [bound], color=color, zorder=3)
        ax.annotate(_label(arch), (x, bound), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ticks = sorted(set(finite)) + ([inf_x] if len(finite) < len(points) else [])
    ax.set_xticks(ticks, [f"{t:g}" if t in finite else "inf" for t in ticks])
    ax.set(
        xlabel="claimed epsilon",
        ylabel="empirical epsilon lower bound",
        title="Empirical audits: a point above the dashed line contradicts its claim",
    )
    ax.set_xlim(0, top * 1.08)
    ax.set_ylim(0, top * 1.08)
    ax.legend(fontsize=8)
    return _png(fig)


def reward_plot(run: RunFiles) -> bytes | None:
    """The mean fused reward of each GRPO logging step, per configuration (TRL's log)."""
    curves = [(where, rewards) for where, results in run.results if (rewards := _rewards(run, where, results))]
    if not curves:
        return None
    fig, ax = _figure()
    for where, rewards in curves:
        ax.plot(range(1, len(rewards) + 1), rewards, marker=".", label=_label(where))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="scoring round (TRL's logged reward)",
        ylabel="mean fused reward",
        title="GRPO: mean fused reward per scoring round",
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def _rewards(run: RunFiles, where: str, results: dict) -> list[float]:
    """Mean fused rewards from TRL's log: grpo_log.json next to the results.json, or (RUN/results.json
    of `demo`) in its configuration's align/<label>/. Never a path named inside the file."""
    label = str(_get(results, "config", "fusion") or "").replace(":", "-")
    for path in (run.path / where).parent / "grpo_log.json", run.path / "align" / label / "grpo_log.json":
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
            return [h["reward"] for h in history if isinstance(h, dict) and _is_number(h.get("reward"))]
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
    return []


# ---------------------------------------------------------------- sections


def verdict_section(run: RunFiles, audit: Audit) -> list[Block]:
    blocks: list[Block] = [Verdict(audit.status, audit.checks)]
    if audit.status == FAIL:
        blocks.append(Text("At least one check FAILED: the privacy claims of this run are not confirmed.", "fail"))
    elif audit.status == NOT_VERIFIED:
        blocks.append(Text("Some checks could not run (see the table): the privacy claims are not confirmed.", "warn"))
    return blocks + [Text(f"Missing or unreadable: {note}.", "warn") for note in run.notes]


def budget_section(run: RunFiles, audit: Audit) -> list[Block]:
    blocks: list[Block] = [Heading("Privacy budget per party")]
    if not run.ledger:
        return blocks + [Text("No ledger: no privacy budget has been spent or recorded.", "warn")]
    if png := cumulative_epsilon_plot(run, audit):
        blocks.append(Figure("budget.png", png, "cumulative epsilon per party over the ledger's lines"))
    if audit.recomputation is None:
        return blocks + [Text("The ledger could not be recomputed; only the claimed totals are plotted.", "fail")]
    rows, tones = [], []
    for p in audit.recomputation.parties:
        spent = max(p.claimed_total, p.total)
        budget = p.budget_epsilon
        remaining = "-" if budget is None else "inf" if math.isinf(budget) else _eps(budget - spent)
        used = "-" if budget is None or math.isinf(budget) or budget <= 0 else f"{100 * spent / budget:.1f}%"
        rows.append(
            [
                p.party,
                str(p.entries),
                _eps(budget),
                f"{p.delta:g}",
                _eps(p.claimed_total),
                _eps(p.rdp_total),
                _eps(p.pld_total),
                remaining,
                used,
                p.status,
            ]
        )
        tones.append("" if p.ok else "fail")
    blocks.append(
        Table(
            [
                "party",
                "releases",
                "budget epsilon",
                "delta",
                "spent (claimed)",
                "recomputed RDP",
                "recomputed PLD",
                "remaining",
                "used",
                "status",
            ],
            rows,
            tones,
        )
    )
    blocks.append(
        Text(
            "Remaining = budget minus the larger of the claimed and the recomputed (tighter of RDP "
            "and PLD) total. A budget of '-' means the party logged none (its releases cost nothing)."
        )
    )
    return blocks


def empirical_section(run: RunFiles) -> list[Block]:
    blocks: list[Block] = [Heading("Empirical privacy audits")]
    if not run.empirical:
        return blocks + [Text("No empirical audit in this run (no audits/empirical-*.json).")]
    extra = sorted({k for _, a in run.empirical for k in a} - {*EMPIRICAL_FIELDS, "schema"})
    rows, tones = [], []
    for where, a in run.empirical:
        verdict = _empirical_verdict(a)
        claimed = "non-private (inf)" if a.get("epsilon_claimed") is None else _eps(a.get("epsilon_claimed"))
        rows.append(
            [
                where,
                _num(a.get("arch")),
                claimed,
                _general(a.get("delta")),
                _num(a.get("canaries")),
                _num(a.get("guesses")),
                _num(a.get("correct")),
                _num(a.get("confidence")),
                _eps(a.get("epsilon_lower_bound")),
                _num(a.get("seconds"), 1),
                verdict,
                _short("; ".join(f"{k}={json.dumps(a[k], default=str)}" for k in extra if k in a), 160),
            ]
        )
        tones.append("fail" if verdict.startswith(("VIOLATION", "malformed")) else "")
    blocks.append(
        Table(
            [
                "file",
                "arch",
                "epsilon claimed",
                "delta",
                "canaries",
                "guesses",
                "correct",
                "confidence",
                "epsilon lower bound",
                "seconds",
                "outcome",
                "other fields",
            ],
            rows,
            tones,
        )
    )
    if png := empirical_plot(run):
        blocks.append(Figure("empirical.png", png, "empirical epsilon lower bound vs claimed epsilon"))
    return blocks


def _accuracy(results: dict, stage: str, family: str | None) -> Any:
    path = ("accuracy", stage, "overall") if family is None else ("accuracy", stage, "per_family", family)
    return _get(results, *path, "accuracy")


def results_section(run: RunFiles) -> list[Block]:
    blocks: list[Block] = [Heading("Configurations and results")]
    if not run.results:
        blocks.append(Text("No results.json yet: no alignment has finished in this run directory.", "warn"))
    else:
        blocks.append(
            Table(
                [
                    "results.json",
                    "fusion",
                    "epsilon",
                    "delta",
                    "seed",
                    "objective",
                    "k_min",
                    "w_min",
                    "GRPO steps",
                    "GRPO lr",
                    "KL beta",
                    "run id",
                ],
                [
                    [
                        where,
                        _num(_get(r, "config", "fusion")),
                        "inf (non-private)"
                        if _get(r, "config", "epsilon") is None
                        else _eps(_get(r, "config", "epsilon")),
                        _general(_get(r, "config", "delta")),
                        _num(_get(r, "config", "seed")),
                        _num(_get(r, "config", "objective")),
                        _num(_get(r, "config", "k_min")),
                        _general(_get(r, "config", "w_min")),
                        _num(_get(r, "config", "grpo", "max_steps")),
                        _general(_get(r, "config", "grpo", "learning_rate")),
                        _general(_get(r, "config", "grpo", "beta")),
                        _num(_get(r, "run_id")),
                    ]
                    for where, r in run.results
                ],
            )
        )
        families = _ordered(f for _, r in run.results for f in _get(r, "accuracy", "sft", "per_family") or {})
        blocks += [
            Heading("Held-out accuracy per question family: before (SFT) → after (aligned)", 3),
            Table(
                ["results.json", *families, "overall"],
                [
                    [where]
                    + [
                        f"{_num(_accuracy(r, 'sft', f))} → {_num(_accuracy(r, 'aligned', f))}"
                        for f in [*families, None]
                    ]
                    for where, r in run.results
                ],
            ),
            Heading("Style: share of full-sentence answers (the `sentences` objective), SFT → aligned", 3),
            Table(
                ["results.json", "objective", "sentences"],
                [
                    [where, _num(_get(r, "config", "objective")),
                     f"{_num(_get(r, 'accuracy', 'sft', 'overall', 'sentences'))} → "
                     f"{_num(_get(r, 'accuracy', 'aligned', 'overall', 'sentences'))}"]
                    for where, r in run.results
                ],
            ),
        ]
        blocks += [
            Heading("GRPO on the fused reward", 3),
            Table(
                [
                    "results.json",
                    "optimizer steps",
                    "scoring rounds",
                    "skipped rounds",
                    "reward, first quarter of rounds",
                    "reward, last quarter",
                    "held-out accuracy during GRPO",
                    "reward min",
                    "reward max",
                    "resumed from",
                ],
                [
                    [
                        where,
                        _num(_get(r, "grpo", "steps")),
                        _num(_get(r, "grpo", "rounds")),
                        _num(_get(r, "grpo", "skipped_rounds")),
                        _num(_get(r, "grpo", "reward_first_quarter")),
                        _num(_get(r, "grpo", "reward_last_quarter")),
                        _short(" → ".join(f"{_num(p.get('accuracy'))} (step {_num(p.get('step'))})"
                                          for p in _get(r, "grpo", "held_out_curve") or [] if isinstance(p, dict)),
                               120),
                        _num(min(rw, default=None)),
                        _num(max(rw, default=None)),
                        _num(_get(r, "grpo", "resumed_from")),
                    ]
                    for where, r in run.results
                    for rw in [_rewards(run, where, r)]
                ],
            ),
        ]
        if png := reward_plot(run):
            blocks.append(Figure("reward.png", png, "mean fused reward per GRPO step"))
        stages = ("policy_s", "clients_s", "router_s", "grpo_s", "eval_s", "total_s")
        scoring = ("scoring_round_trip", "client_compute", "authority_round_trip", "server_crypto")
        blocks += [
            Heading("Timings (seconds): stages, then the scoring rounds' parts", 3),
            Table(
                ["results.json", *(s.removesuffix("_s") for s in stages), *(s.replace("_", " ") for s in scoring)],
                [
                    [
                        where,
                        *(_num(_get(r, "timings", s), 1) for s in stages),
                        *(_num(_get(r, "timings", "scoring", s), 1) for s in scoring),
                    ]
                    for where, r in run.results
                ],
            ),
        ]
        if routers := [(where, r["router"]) for where, r in run.results if isinstance(r.get("router"), dict)]:
            clients = ", ".join(_ordered(p for _, r in run.results for p in _get(r, "clients") or {}))
            blocks += [
                Heading("Router (fusion mor): mean weight per client on held-out prompts, by objective and family",
                        3),
                Table(
                    ["results.json", "steps", "skipped", "final loss", "objective", "family", f"weights of {clients}"],
                    [
                        [
                            where,
                            _num(router.get("steps")),
                            _num(len(router.get("skipped") or [])),
                            _num((router.get("losses") or [None])[-1]),
                            objective,
                            family,
                            _short(weights, 60),
                        ]
                        for where, router in routers
                        for objective, by_family in (router.get("held_out_weights") or {}).items()
                        if isinstance(by_family, dict)
                        for family, weights in by_family.items()
                    ],
                ),
            ]
    blocks += clients_blocks(run)
    if run.evaluations:
        families = _ordered(f for _, e in run.evaluations for f in e.get("per_family") or {})
        blocks += [
            Heading("Policy evaluations before alignment (eval/*.json): accuracy (n)", 3),
            Table(
                ["stage", *families, "overall"],
                [
                    [stage]
                    + [
                        f"{_num(_get(s, 'accuracy'))} ({_num(_get(s, 'n'))})"
                        for s in [*(_get(e, "per_family", f) for f in families), e.get("overall")]
                    ]
                    for stage, e in run.evaluations
                ],
            ),
        ]
    return blocks


def clients_blocks(run: RunFiles) -> list[Block]:
    """The clients (clients/client-K/: client.json, metrics.json), else what results.json says of them."""
    rows = []
    for party, client, metrics in run.clients:
        runs = [r for r in metrics.get("runs") or [] if isinstance(r, dict)]
        held_out = metrics.get("held_out") if isinstance(metrics.get("held_out"), dict) else {}
        top1 = held_out.get("top1") if isinstance(held_out.get("top1"), dict) else {}
        rows.append(
            [
                party,
                _num(client.get("arch")),
                _num(client.get("family")),
                _num(client.get("style")),
                _eps(client.get("budget_epsilon")),
                _general(client.get("budget_delta")),
                str(len(runs)),
                "; ".join(
                    f"sigma {_num(r.get('noise_multiplier'))}, q {_num(r.get('sample_rate'), 4)}, "
                    f"{_num(r.get('steps'))} steps"
                    for r in runs
                )
                or "-",
                _eps(runs[-1].get("total_epsilon") if runs else None),
                ", ".join(f"{f} {_num(v)}" for f, v in top1.items()) or "-",
            ]
        )
    if not rows:
        for party, c in next((r["clients"] for _, r in run.results if isinstance(r.get("clients"), dict)), {}).items():
            c = c if isinstance(c, dict) else {}
            measures = c.get("reward_model") if isinstance(c.get("reward_model"), dict) else {}
            top1 = measures.get("top1") if isinstance(measures.get("top1"), dict) else {}
            accuracies = ", ".join(f"{f} {_num(v)}" for f, v in top1.items())
            rows.append(
                [
                    party,
                    _num(c.get("arch")),
                    _num(c.get("family")),
                    "-",
                    _eps(c.get("budget_epsilon")),
                    "-",
                    "-",
                    "-",
                    _eps(c.get("total_epsilon")),
                    accuracies,
                ]
            )
    if not rows:
        return [Heading("Clients", 3), Text("No client state (clients/) and no results.json: no client has trained.")]
    return [
        Heading("Clients: DP-SGD reward models", 3),
        Table(
            [
                "party",
                "arch",
                "family",
                "style",
                "budget epsilon",
                "budget delta",
                "runs",
                "DP-SGD mechanism",
                "epsilon spent",
                "held-out top-1 among all answers, per family",
            ],
            rows,
        ),
    ]


def releases_section(run: RunFiles, audit: Audit) -> list[Block]:
    blocks: list[Block] = [Heading("Every release in the ledger")]
    if not run.ledger:
        return blocks + [Text("No ledger.", "warn")]
    checked = {e.line: e for e in audit.recomputation.entries} if audit.recomputation else {}
    bad_line = audit.verification.error_line if audit.verification and not audit.verification.ok else None
    rows, tones = [], []
    for number, line in enumerate(run.ledger, start=1):
        if line is None:
            rows.append([str(number)] + ["-"] * 10 + ["not a JSON object"])
            tones.append("fail")
            continue
        e = checked.get(number)
        status = e.status if e else "no mechanism" if line.get("mechanism") is None else "-"
        if number == bad_line:
            status = f"verification FAILED: {audit.verification.reason}"
        rows.append(
            [
                str(number),
                _num(line.get("seq")),
                _time(line.get("time")),
                _short(line.get("party"), 40),
                _short(line.get("kind"), 30),
                mechanism_summary(line.get("mechanism")),
                _eps(line.get("epsilon")),
                _eps(e.recomputed) if e else "-",
                _eps(line.get("total_epsilon")),
                _eps(e.total) if e else "-",
                _hash(line)[:12],
                status,
            ]
        )
        tones.append("fail" if number == bad_line or (e and not e.ok) else "")
    blocks.append(
        Text(
            f"{len(run.ledger)} lines. Times in UTC; epsilons at each entry's delta, running totals at the "
            "party's budget delta; recomputed = the tighter of dp-accounting's RDP and PLD; hash = SHA-256 "
            "of the line (the next line's prev_hash)."
        )
    )
    blocks.append(
        Table(
            [
                "line",
                "seq",
                "time (UTC)",
                "party",
                "kind",
                "mechanism",
                "epsilon claimed",
                "epsilon recomputed",
                "running total claimed",
                "running total recomputed",
                "hash",
                "status",
            ],
            rows,
            tones,
            compact=True,
        )
    )
    return blocks


# ---------------------------------------------------------------- the whole report


@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    status: str  # PASS, FAIL or NOT VERIFIED
    checks: Sequence[Check]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def build_report(run_dir: Path, out: Path | None = None, tolerance: float = 0.05) -> ReportResult:
    """Read RUN_DIR, run every check and write OUT/report.html, OUT/report.md and its PNGs
    (OUT defaults to RUN_DIR/report). Raises ReportError when RUN_DIR is not a run directory."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    audit = run_checks(run, tolerance)
    out = Path(out) if out is not None else run_dir / "report"
    title = f"Secure MoR privacy report: {run_dir.resolve().name}"
    blocks: list[Block] = [
        Text(
            f"Run directory {run_dir.resolve()}; generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} "
            "by `secure-mor report`. Privacy ledger verified against keys/; every epsilon recomputed independently "
            "with dp-accounting."
        ),
        *verdict_section(run, audit),
        *budget_section(run, audit),
        *empirical_section(run),
        *results_section(run),
        *releases_section(run, audit),
    ]
    out.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        if isinstance(block, Figure):
            (out / block.name).write_bytes(block.png)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(title, blocks), encoding="utf-8")
    md_path.write_text(render_markdown(title, blocks), encoding="utf-8")
    return ReportResult(html_path, md_path, audit.status, audit.checks)

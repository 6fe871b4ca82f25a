"""Auditor commands on a privacy ledger.

    verify LEDGER [--keys DIR] [--head HASH]   format, hash chain, per-party sequence, signatures, anchors
    recompute LEDGER [--tolerance 0.05]        every epsilon and per-party total, recomputed
                                               with dp-accounting (RDP and PLD)

verify and recompute exit 0 when everything checks out and 1 otherwise (with the
first bad line and the reason, or the list of disagreements), never with a
traceback on a bad ledger; verify exits 3 when the ledger verifies but lines are
UNANCHORED (no --head and no results.json head covers them). (`audit empirical` trains a client: it is
secure_mor.experiments.cli's, registered in this group by secure_mor.cli.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from secure_mor.audits.verify import anchors_of, results_files, verify_ledger
from secure_mor.crypto.signing import read_registry
from secure_mor.ledger import Ledger, LedgerError

UNANCHORED_EXIT = 3  # verified, but some lines are covered by no anchor
LedgerArg = Annotated[Path, typer.Argument(help="The ledger (JSON Lines).")]
audit_app = typer.Typer(help="Audit the privacy ledger: signatures, chain, epsilons.", no_args_is_help=True)


def _console() -> Console:
    return Console(width=140)


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(f"[bold red]FAIL[/] {message}", highlight=False)
    return typer.Exit(1)


def _eps(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4f}"


@audit_app.command()
def verify(
    ledger: LedgerArg,
    keys: Annotated[Path | None, typer.Option("--keys", help="Dir of <party>.pub keys [LEDGER's dir/keys].")] = None,
    head: Annotated[
        str | None, typer.Option("--head", help="The head hash the ledger must end with (an anchor you hold).")
    ] = None,
) -> None:
    """Check every line's format, the hash chain, each party's sequence, every signature and the anchors:
    --head, and the ledger heads recorded in the run's results.json files (LEDGER's dir). Exit 0 when
    all of it holds and an anchor covers every line, 1 on any failure, 3 when lines are UNANCHORED."""
    console = _console()
    keys = keys if keys is not None else ledger.parent / "keys"
    if not ledger.is_file():
        raise _fail(console, f"no ledger at {ledger}")
    if not keys.is_dir():
        raise _fail(console, f"no key directory at {keys}")
    registry = read_registry(keys)
    if not registry:
        raise _fail(console, f"no *.pub keys in {keys}")
    anchors, problems = anchors_of(_results_near(ledger))
    if problems:
        raise _fail(console, f"{ledger}: {'; '.join(problems)}")
    result = verify_ledger(ledger, registry, expected_head=head, anchors=anchors)
    if not result.ok:
        raise _fail(console, f"{ledger}: line {result.error_line}: {result.reason}")
    console.print(
        f"[bold green]OK[/] {ledger}: {result.entries} entries, {len(registry)} registered parties, "
        f"head {result.head_hash}",
        highlight=False,
    )
    if result.unanchored or (head is None and not anchors):
        what = f"lines {result.anchored + 1}-{result.entries} are" if result.unanchored else "the (empty) ledger is"
        console.print(
            f"[bold red]UNANCHORED[/] {what} covered by no anchor (no --head, no results.json head): a cut-off "
            "tail, an emptied ledger, or a party re-signing its own last entries, would look the same. Verify "
            "again with --head HASH from a record you trust.",
            highlight=False,
        )
        raise typer.Exit(UNANCHORED_EXIT)


def _results_near(ledger: Path) -> list[tuple[str, object]]:
    """The results.json files of the run directory the ledger lives in, parsed (unreadable ones left out)."""
    out = []
    for path in results_files(ledger.parent):
        try:
            out.append((str(path), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return out


@audit_app.command("recompute")
def recompute_cmd(
    ledger: LedgerArg,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="Allowed difference (absolute; relative above 1).")
    ] = 0.05,
) -> None:
    """Recompute every epsilon with dp-accounting (RDP and PLD) and check the totals against the budgets."""
    from secure_mor.audits.recompute import RecomputeError, recompute_quietly  # dp-accounting: slow to import

    console = _console()
    if not ledger.is_file():
        raise _fail(console, f"no ledger at {ledger}")
    try:
        report = recompute_quietly(Ledger(ledger).entries(), tolerance=tolerance)
    except (LedgerError, RecomputeError) as err:
        raise _fail(console, f"{ledger}: {err}") from None

    table = Table(title=f"Releases (recomputed = tighter of RDP/PLD; tolerance {tolerance:g})")
    for column in ("line", "party", "kind", "accountant", "delta", "claimed eps", "RDP eps", "PLD eps", "status"):
        table.add_column(column, justify="right" if column in ("line", "delta") or "eps" in column else "left")
    for e in report.entries:
        status = "[green]ok[/]" if e.ok else f"[red]{e.status}[/]"
        table.add_row(
            str(e.line), e.party, e.kind, e.accountant, f"{e.delta:g}",
            _eps(e.claimed), _eps(e.rdp), _eps(e.pld), status,
        )  # fmt: skip
    console.print(table)

    totals = Table(title="Per-party composition vs budget")
    for column in ("party", "runs", "delta", "claimed total", "RDP total", "PLD total", "budget eps", "status"):
        totals.add_column(column, justify="left" if column in ("party", "status") else "right")
    for p in report.parties:
        status = "[green]ok[/]" if p.ok else f"[red]{p.status}[/]"
        totals.add_row(
            p.party, str(p.entries), f"{p.delta:g}", _eps(p.claimed_total), _eps(p.rdp_total),
            _eps(p.pld_total), _eps(p.budget_epsilon), status,
        )  # fmt: skip
    console.print(totals)
    if report.skipped:
        console.print(f"{len(report.skipped)} line(s) without a mechanism skipped: {report.skipped}", highlight=False)

    if not report.ok:
        for problem in report.problems:
            console.print(f"[red]-[/] {problem}", highlight=False)
        raise _fail(console, f"{ledger}: {len(report.problems)} disagreement(s) or overrun(s)")
    console.print(f"[bold green]OK[/] {ledger}: {len(report.entries)} releases and {len(report.parties)} totals agree")

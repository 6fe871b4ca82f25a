"""Auditor commands on a privacy ledger.

    verify LEDGER [--keys DIR] [--head HASH]   format, hash chain, per-party sequence, signatures, anchors
    recompute LEDGER [--tolerance 0.05]        every epsilon and per-party total, recomputed
                                               with dp-accounting (RDP and PLD)
    empirical --out RUN [--epsilon 4 ...]      one-run empirical privacy audit of a client's
                                               DP-SGD training (audits.empirical)

verify and recompute exit 0 when everything checks out and 1 otherwise (with the
first bad line and the reason, or the list of disagreements), never with a
traceback on a bad ledger; verify exits 3 when the ledger verifies but lines are
UNANCHORED (no --head and no results.json head covers them). empirical exits 2 on bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secure_mor.audits.ledger import Ledger, LedgerError, anchors_of, results_files, verify_ledger
from secure_mor.crypto.signing import read_registry

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


def _guesses(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--guesses") from None


@audit_app.command("empirical")
def empirical_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory; the result goes to RUN/audits/.")],
    client: Annotated[int, typer.Option(help="Whose data, family and annotation style (0-based).")] = 0,
    arch: Annotated[str | None, typer.Option(help="Reward-model architecture (default: client k's).")] = None,
    epsilon: Annotated[float, typer.Option(help="Target epsilon of the training; inf = non-private.")] = 4.0,
    delta: Annotated[float, typer.Option(help="Delta of the training and of the bound.")] = 1e-5,
    canaries: Annotated[int, typer.Option(help="Canary pairs m, each included with probability 1/2.")] = 200,
    guesses: Annotated[
        str, typer.Option(help="Numbers of guesses r to try (half 'in', half 'out'); union bound over them.")
    ] = "20,50,100",
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the split, the canaries, their inclusion and training.")] = 0,
    pairs: Annotated[int, typer.Option(help="The client's regular training pairs.")] = 800,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the architecture's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Expected batch size (default: the architecture's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default: the architecture's).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Clipping norm (default: the architecture's).")] = None,
) -> None:
    """One-run empirical privacy audit (Steinke, Nasr, Jagielski 2023) of one client's DP-SGD training.

    Trains once on the client's pairs plus a random half of m mislabelled canary pairs, guesses which
    canaries were in from their margins, and reports the epsilon that the right guesses refute: a
    lower bound on the training's true epsilon (an audit can refute a claim, never prove it)."""
    from secure_mor.audits.empirical import EmpiricalAuditConfig, write_result
    from secure_mor.clients.models import DEFAULT_ARCHS, architecture
    from secure_mor.data import DatasetError
    from secure_mor.experiments.audit import run_empirical_audit  # the training run: the clients' own code

    console = _console()
    try:
        if client < 0:
            raise ValueError(f"client must be >= 0, got {client}")
        arch = arch or DEFAULT_ARCHS[client % len(DEFAULT_ARCHS)]
        architecture(arch)
        train = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "max_grad_norm": max_grad_norm}
        config = EmpiricalAuditConfig(
            arch=arch, client=client, epsilon=epsilon, delta=delta, canaries=canaries, guesses=_guesses(guesses),
            confidence=confidence, seed=seed, pairs=pairs, train={k: v for k, v in train.items() if v is not None},
        )  # fmt: skip
    except ValueError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None

    import datasets

    datasets.disable_progress_bars()
    label = f"client-{client} ({arch}) at epsilon {_eps(epsilon)}"
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"{label}: data and canaries", total=None)

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, description=f"{label} loss {loss:.3f}")

        try:
            result = run_empirical_audit(config, out if (out / "data.json").exists() else None, progress)
        except (ValueError, DatasetError) as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(2) from None
    path = write_result(result, out)

    report = result.to_json()
    table = Table(title=f"Guesses (union bound over {len(result.outcomes)}: each at confidence "
                        f"{report['guess_sweep']['per_try_confidence']:.4f})")  # fmt: skip
    for column in ("guesses", "correct", "accuracy", "epsilon lower bound"):
        table.add_column(column, justify="right")
    for o in result.outcomes:
        table.add_row(str(o.guesses), str(o.correct), f"{o.correct / o.guesses:.3f}", f"{o.epsilon_lower_bound:.3f}")
    console.print(table)
    claimed = "non-private" if result.mechanism is None else f"claimed epsilon {result.epsilon_claimed:.3f}"
    console.print(
        f"[bold]empirical epsilon >= {result.epsilon_lower_bound:.3f}[/] at {confidence:g} confidence, delta "
        f"{delta:g} ({claimed}; m = {canaries} canaries, {result.included} included; {result.seconds:.1f} s) "
        f"-> {path}",
        highlight=False,
    )
    if result.mechanism is not None and result.epsilon_lower_bound > result.epsilon_claimed:
        raise _fail(console, f"the audit refutes the claimed epsilon {result.epsilon_claimed:.3f}")

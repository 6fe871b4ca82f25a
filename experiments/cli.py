"""`secure-mor audit empirical` (registered in the audit group by secure_mor.cli): the one-run empirical
privacy audit trains a client's reward model, so it is an experiment driver, not the auditor's
(secure_mor.audits imports no role). Exits 2 on bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from secure_mor.progress import progress_bar, training_task


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _guesses(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--guesses") from None


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

    console = Console(width=140)
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
    run_dir = out if (out / "data.json").exists() else None  # the run's own split, whatever its dataset
    console.print(f"client-{client}'s annotations from " + (f"the run's split ({out / 'data.json'})" if run_dir else
                  f"the default easy-VQA split of seed {seed} ({out} holds no data.json)"), highlight=False)
    label = f"client-{client} ({arch}) at epsilon {_eps(epsilon)}"
    with progress_bar(console) as bar:
        progress = training_task(bar, label, "data and canaries")
        try:
            result = run_empirical_audit(config, run_dir, progress)
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
        console.print(f"[bold red]FAIL[/] the audit refutes the claimed epsilon {result.epsilon_claimed:.3f}",
                      highlight=False)
        raise typer.Exit(1)

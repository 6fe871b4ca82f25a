"""`secure-mor client ...`: train a client's reward model with DP-SGD, evaluate clients.

    secure-mor client train --client 0 --epsilon 4 --delta 1e-5 --epochs 40 --out runs/demo
    secure-mor client eval --out runs/demo

Settings fixed at a client's creation (architecture, budget, reward clip, data
split) are read back from its client.json on later runs; passing a different
value is an error. Training options left out (epochs, batch size, learning
rate, clipping norm, grad-sample mode, ...) take the architecture's defaults
(`training.default_train_config`); the values used are printed. A new
client's initial parameters are drawn with the training seed. The signing
key's passphrase, if any, is read from the environment variable named by
--passphrase-env (never from the command line).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from secure_mor.progress import progress_bar, training_task

if TYPE_CHECKING:  # torch, Opacus and datasets load in the commands: `secure-mor --help` stays fast
    from secure_mor.clients.client import ClientConfig
    from secure_mor.data import SplitConfig

client_app = typer.Typer(help="Client role: DP-SGD reward models, budget, evaluation.", no_args_is_help=True)
console = Console()

ARCH_DEFAULT = "(default: the architecture's)"
SPLIT_DEFAULTS = {"seed": 0, "skew": 0.8, "pairs_per_client": 800, "num_clients": 3}


def split_config(split: dict[str, Any]) -> SplitConfig:
    from secure_mor.data import SplitConfig, default_clients

    return SplitConfig(
        clients=default_clients(split["num_clients"]),
        skew=split["skew"],
        pairs_per_client=split["pairs_per_client"],
        seed=split["seed"],
    )


def _stored(out: Path, client: int) -> ClientConfig | None:
    from secure_mor.clients.client import ClientConfig, client_dir

    path = client_dir(out, client) / "client.json"
    return ClientConfig.from_json(json.loads(path.read_text())) if path.exists() else None


def _passphrase(env: str | None) -> str | None:
    if env is None:
        return None
    if env not in os.environ:
        raise typer.BadParameter(f"environment variable {env} is not set", param_hint="--passphrase-env")
    return os.environ[env]


@client_app.command()
def train(
    client: Annotated[int, typer.Option(help="client id k (0-based)")],
    out: Annotated[Path, typer.Option(help="run directory")],
    epsilon: Annotated[float, typer.Option(help="epsilon this run may spend; inf = non-private")] = 4.0,
    delta: Annotated[float | None, typer.Option(help=f"delta of this run (<= the budget delta) {ARCH_DEFAULT}")] = None,
    epochs: Annotated[int | None, typer.Option(help=ARCH_DEFAULT)] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"expected (Poisson) batch size {ARCH_DEFAULT}")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Adam learning rate {ARCH_DEFAULT}")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help=f"per-pair clipping norm C {ARCH_DEFAULT}")] = None,
    accountant: Annotated[str | None, typer.Option(help=f"prv or rdp {ARCH_DEFAULT}")] = None,
    grad_sample_mode: Annotated[str | None, typer.Option(help=f"hooks, functorch or ew {ARCH_DEFAULT}")] = None,
    train_seed: Annotated[
        int | None, typer.Option(help=f"seed of initialisation, sampling, noise {ARCH_DEFAULT}")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="architecture (default: by client id)")] = None,
    budget_epsilon: Annotated[float | None, typer.Option(help="total budget, fixed at creation")] = None,
    budget_delta: Annotated[float | None, typer.Option(help="budget delta, fixed at creation")] = None,
    reward_clip: Annotated[float | None, typer.Option(help="scores clipped to [-R, R]")] = None,
    seed: Annotated[int | None, typer.Option(help="data split seed")] = None,
    skew: Annotated[float | None, typer.Option(help="fraction of a client's pairs from its family")] = None,
    pairs_per_client: int | None = None,
    num_clients: int | None = None,
    passphrase_env: Annotated[str | None, typer.Option(help="env var holding the key passphrase")] = None,
    public_epochs: Annotated[
        int | None, typer.Option(help="a new client's public warm-start passes; 0: none (default: PUBLIC_WARM_START)")
    ] = None,
) -> None:
    """Train (or continue training) one client's reward model under its budget. A new client first
    warm-starts on the split's public questions of its family, as a client node does (no budget: public data)."""
    from secure_mor.clients.client import ClientConfig, train_client
    from secure_mor.clients.models import DEFAULT_ARCHS
    from secure_mor.clients.training import BudgetExceeded, default_train_config
    from secure_mor.data import DatasetError, build_federated_data, public_annotations

    stored = _stored(out, client)
    given = {"seed": seed, "skew": skew, "pairs_per_client": pairs_per_client, "num_clients": num_clients}
    base_split = dict(stored.split) if stored else SPLIT_DEFAULTS
    split = {k: base_split[k] if v is None else v for k, v in given.items()}
    if public_epochs is not None and public_epochs < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--public-epochs")
    if not 0 <= client < split["num_clients"]:
        raise typer.BadParameter(f"client must be in [0, {split['num_clients']})", param_hint="--client")
    with console.status("building the federated split"):
        data = build_federated_data(split_config(split))
    data_config = data.config.clients[client]
    defaults = stored or ClientConfig(client, DEFAULT_ARCHS[client % len(DEFAULT_ARCHS)], "", "")
    config = ClientConfig(
        client_id=client,
        arch=arch or defaults.arch,
        family=data_config.family,
        style=data_config.style,
        budget_epsilon=defaults.budget_epsilon if budget_epsilon is None else budget_epsilon,
        budget_delta=defaults.budget_delta if budget_delta is None else budget_delta,
        reward_clip=defaults.reward_clip if reward_clip is None else reward_clip,
        split=split,
    )
    try:
        train_config = default_train_config(
            config.arch,
            epsilon,
            delta=delta,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            grad_sample_mode=grad_sample_mode,
            seed=train_seed,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    tc = train_config
    console.print(
        f"client-{client} ({config.arch}): epochs {tc.epochs}, batch {tc.batch_size}, lr {tc.lr:g}, "
        f"clip {tc.max_grad_norm:g}, accountant {tc.accountant}, grad-sample mode {tc.grad_sample_mode}, seed {tc.seed}"
    )
    with progress_bar(console) as bar:
        progress = training_task(bar, f"client-{client} ({config.arch})")
        try:
            # only a new client warm-starts (train_client); a stored one continues from its own state
            public = None if public_epochs == 0 or stored else public_annotations(data, config.style, config.family,
                                                                                    seed=split["seed"])
            trained, result = train_client(
                out, config, data.clients[client], train_config, _passphrase(passphrase_env), progress,
                public=public, public_epochs=public_epochs,
            )
        except BudgetExceeded as err:
            console.print(f"[red]refused:[/red] {err}")
            raise typer.Exit(2) from err
        except DatasetError as err:  # e.g. no public questions of the client's family; nothing was written
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from err
    budget = trained.privacy.budget.epsilon
    spent = f"epsilon {result.epsilon:.3f} this run, total {result.total_epsilon:.3f} of {budget:g}"
    if not math.isfinite(result.total_epsilon):
        spent = "non-private (no DP guarantee)"
    console.print(f"client-{client}: {result.steps} steps in {result.seconds:.1f} s; {spent}")


@client_app.command("eval")
def evaluate(
    out: Annotated[Path, typer.Option(help="run directory")],
    client: Annotated[list[int] | None, typer.Option(help="client id(s); default: all in the run")] = None,
) -> None:
    """Each client's reward model on the held-out set, per family: top-1 among all the family's answers
    (what GRPO needs), how often its best answer changes with the image, and pairwise accuracy."""
    from secure_mor.clients.client import RewardClient
    from secure_mor.clients.evaluation import accuracy_table
    from secure_mor.data import build_federated_data

    ids = client or sorted(int(p.name.split("-")[1]) for p in (out / "clients").glob("client-*"))
    clients = [RewardClient.load(out, k) for k in ids]
    if not clients:
        raise typer.BadParameter(f"no trained clients in {out}", param_hint="--out")
    rows = []
    data_by_split: dict[str, Any] = {}
    for trained in clients:
        key = json.dumps({**SPLIT_DEFAULTS, **trained.config.split}, sort_keys=True)
        if key not in data_by_split:
            with console.status("building the federated split"):
                data_by_split[key] = build_federated_data(split_config(json.loads(key)))
        accuracy = trained.evaluate(data_by_split[key], seed=trained.config.split.get("seed", 0))
        metrics = trained.metrics()
        metrics["evaluation"] = accuracy
        trained.save_metrics(metrics)
        rows.append((f"{trained.party} ({trained.config.arch})", trained.config.family, accuracy))
    console.print(accuracy_table(rows))

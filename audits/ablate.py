"""`secure-mor ablate`: the DP ablation sweep, epsilon x fusion x seed, through the real pipeline.

Every cell runs `server.pipeline.align` with real client nodes, a real key
authority and real CKKS, in-process (`LocalTransport`: the same handlers Flower
would call; Flower's start-up, about a minute per run, would otherwise dominate
a sweep). Layout under OUT:

    seed-S/base/          the split and the SFT policy of seed S (shared by its epsilons)
    seed-S/eps-E/         a run directory: clients trained at epsilon E (once), the
                          router (once), align/<fusion>/results.json per fusion, and
                          audits/empirical-*.json: a one-run empirical privacy audit of
                          client-0's training procedure at (epsilon E, seed S)
    results.csv           one row per finished cell, plus one "sft" row per (seed, epsilon);
                          the audit's columns (audit_*) on every row of its (seed, epsilon)
    policy_accuracy.png   held-out accuracy vs epsilon per fusion (mean and range over seeds)
    reward_models.png     each client's own-family preference accuracy vs epsilon
    empirical_epsilon.png the audits' empirical epsilon lower bound vs the claimed epsilon

Resumable: a cell whose results.json exists is read, not re-run, and so is an
audit whose JSON exists. (seed, epsilon) groups run in `workers` processes.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import shutil
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secure_mor.data import FAMILIES

COLUMNS = ["seed", "epsilon", "fusion", "overall", *FAMILIES, "reward_first", "reward_last", "grpo_s"]


@dataclass(frozen=True)
class AblationGrid:
    epsilons: tuple[float, ...] = (math.inf, 8.0, 4.0, 2.0, 1.0)
    fusions: tuple[str, ...] = ("mor", "uniform", "single:0", "single:1", "single:2")
    seeds: tuple[int, ...] = (0, 1, 2)


def _eps_label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _quiet_worker() -> None:
    import torch
    import transformers

    # A spawned worker starts with default warning filters; TRL calls a transformers API that v5 deprecates.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _audit(run: Path, config: Any, audit: dict[str, Any]) -> dict[str, Any]:
    """The empirical audit of client-0's training at the cell's (epsilon, delta, seed), with the
    cell's pairs per client and training settings; read back if already done."""
    from secure_mor.audits.empirical import EmpiricalAuditConfig, result_path, run_empirical_audit, write_result
    from secure_mor.clients.models import DEFAULT_ARCHS

    audit_config = EmpiricalAuditConfig(
        **{"arch": DEFAULT_ARCHS[0], "client": 0, "epsilon": config.epsilon, "delta": config.delta,
           "seed": config.seed, "pairs": config.pairs_per_client, "train": dict(config.client_training), **audit}
    )  # fmt: skip
    path = result_path(run, audit_config)
    if not path.exists():
        write_result(run_empirical_audit(audit_config), run)
    return json.loads(path.read_text())


def _group(
    out: Path, seed: int, epsilon: float, fusions: Sequence[str], overrides: dict[str, Any], audit: dict | None
) -> tuple[list[dict], dict | None]:
    """One (seed, epsilon) group: clients trained once, then every fusion, then the empirical
    audit (unless `audit` is None). Runs in a worker process."""

    from secure_mor.clients.node import ClientNode
    from secure_mor.crypto.authority_node import AuthorityNode
    from secure_mor.server.pipeline import AlignConfig, align
    from secure_mor.server.transport import LocalTransport

    _quiet_worker()
    config = replace(AlignConfig(seed=seed, epsilon=epsilon), **overrides)
    base, run = out / f"seed-{seed}" / "base", out / f"seed-{seed}" / f"eps-{_eps_label(epsilon)}"
    if not run.exists():
        run.mkdir(parents=True)
        for name in ("data.json", "policy", "eval"):
            source = base / name
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, run / name)
    nodes = {f"client-{k}": ClientNode(run, k) for k in range(config.num_clients)}
    nodes["authority"] = AuthorityNode(run)
    rows = []
    for fusion in fusions:
        done = run / "align" / fusion.replace(":", "-") / "results.json"
        results = (
            json.loads(done.read_text())
            if done.exists()
            else align(LocalTransport(nodes), run, replace(config, fusion=fusion), log=lambda m: None)
        )
        rows.append(results)
    return rows, None if audit is None else _audit(run, config, audit)


def _prepare_seed(out: Path, seed: int, overrides: dict[str, Any]) -> None:
    from secure_mor.config import RunDir
    from secure_mor.server.pipeline import AlignConfig, prepare_data, prepare_policy

    _quiet_worker()
    config = replace(AlignConfig(seed=seed), **overrides)
    run = RunDir(out / f"seed-{seed}" / "base")
    prepare_policy(run, prepare_data(run, config), config, log=lambda m: None)


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """CSV rows of one cell's results.json: the aligned policy, and its SFT start."""
    c = results["config"]
    epsilon = "inf" if c["epsilon"] is None else c["epsilon"]
    out = []
    for fusion, accuracy in ((c["fusion"], results["accuracy"]["aligned"]), ("sft", results["accuracy"]["sft"])):
        row = {
            "seed": c["seed"],
            "epsilon": epsilon,
            "fusion": fusion,
            "overall": accuracy["overall"]["accuracy"],
            **{f: accuracy["per_family"][f]["accuracy"] for f in FAMILIES},
        }
        if fusion != "sft":
            row.update(
                reward_first=results["grpo"]["reward_first"],
                reward_last=results["grpo"]["reward_last"],
                grpo_s=round(results["timings"]["grpo_s"], 1),
            )
            for party, client in results["clients"].items():
                row[f"{party}_own_accuracy"] = client["preference_accuracy"][client["family"]]
                row[f"{party}_epsilon"] = "inf" if client["total_epsilon"] is None else client["total_epsilon"]
        out.append(row)
    return out


def run_ablation(
    out: Path,
    grid: AblationGrid,
    overrides: dict[str, Any] | None = None,
    workers: int = 1,
    on_cell: Callable[[int, int], None] | None = None,
    audit: dict[str, Any] | None = None,
) -> Path:
    """Run (or resume) the sweep; returns the CSV path. `on_cell(done, total)` after each group.
    `audit`: EmpiricalAuditConfig fields for each group's empirical audit (e.g. canaries, guesses),
    over the cell's own settings; None: no audits."""
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    groups = [(seed, eps) for seed in grid.seeds for eps in grid.epsilons]
    # spawn: forking a process whose torch already started its thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_prepare_seed, out, seed, overrides) for seed in grid.seeds]):
            future.result()
        futures = [pool.submit(_group, out, seed, eps, grid.fusions, overrides, audit) for seed, eps in groups]
        results: list[dict] = []
        audits: list[dict] = []
        for done, future in enumerate(as_completed(futures), start=1):
            cells, audit_report = future.result()
            results += cells
            audits += [audit_report] if audit_report else []
            if on_cell:
                on_cell(done, len(groups))
    return write_outputs(out, results, audits)


def audit_columns(report: dict[str, Any]) -> dict[str, Any]:
    """CSV columns of one empirical audit (audits.empirical JSON)."""
    claimed = report["epsilon_claimed"]
    return {
        "audit_epsilon_lower_bound": round(report["epsilon_lower_bound"], 4),
        "audit_epsilon_claimed": "inf" if claimed is None else round(claimed, 4),
        "audit_correct": report["correct"],
        "audit_guesses": report["guesses"],
        "audit_canaries": report["canaries"],
        "audit_confidence": report["confidence"],
    }


def write_outputs(out: Path, results: list[dict[str, Any]], audits: Sequence[dict[str, Any]] = ()) -> Path:
    by_group = {(a["seed"], "inf" if a["train_config"]["epsilon"] is None else a["train_config"]["epsilon"]): a
                for a in audits}  # fmt: skip
    rows: list[dict[str, Any]] = []
    seen_sft = set()
    for r in results:
        for row in rows_of(r):
            key = (row["seed"], row["epsilon"], row["fusion"])
            if row["fusion"] == "sft" and key in seen_sft:
                continue
            seen_sft.add(key)
            if (row["seed"], row["epsilon"]) in by_group:
                row.update(audit_columns(by_group[row["seed"], row["epsilon"]]))
            rows.append(row)
    rows.sort(key=lambda r: (r["fusion"], str(r["epsilon"]), r["seed"]))
    fields = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    path = out / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out)
    if audits:
        plot_audits(list(audits), out)
    return path


def _epsilon_axis(value: Any, finite: list[float]) -> float:
    """inf is drawn to the right of the largest finite epsilon."""
    return 2 * max(finite, default=1.0) if value == "inf" else float(value)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    finite = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    ticks = sorted({_epsilon_axis(r["epsilon"], finite) for r in rows})
    labels = ["inf" if t not in finite else f"{t:g}" for t in ticks]

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    fusions = sorted({r["fusion"] for r in rows})
    for index, fusion in enumerate(fusions):
        by_eps: dict[float, list[float]] = {}
        for r in rows:
            if r["fusion"] == fusion:
                by_eps.setdefault(_epsilon_axis(r["epsilon"], finite), []).append(r["overall"])
        xs = sorted(by_eps)
        mean = [np.mean(by_eps[x]) for x in xs]
        low, high = [min(by_eps[x]) for x in xs], [max(by_eps[x]) for x in xs]
        dodge = 1.04 ** (index - (len(fusions) - 1) / 2)  # side by side, so no bar hides another
        ax.errorbar(
            [x * dodge for x in xs],
            mean,
            yerr=[np.subtract(mean, low), np.subtract(high, mean)],
            marker="o",
            capsize=3,
            label=fusion,
            linestyle="--" if fusion == "sft" else "-",
        )
    ax.set(
        xscale="log",
        xlabel="client DP budget epsilon",
        ylabel="held-out accuracy (overall)",
        title="Policy accuracy after GRPO, by fusion (mean, min-max over seeds)",
    )
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="fusion")  # beside the data, never over it
    fig.tight_layout()
    fig.savefig(out / "policy_accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    clients = sorted({k.removesuffix("_own_accuracy") for r in rows for k in r if k.endswith("_own_accuracy")})
    for client in clients:
        by_eps = {}
        for r in rows:
            if f"{client}_own_accuracy" in r and r["fusion"] != "sft":
                x = _epsilon_axis(r["epsilon"], finite)
                by_eps.setdefault(x, set()).add((r["seed"], r[f"{client}_own_accuracy"]))
        xs = sorted(by_eps)
        ax.plot(xs, [np.mean([v for _, v in by_eps[x]]) for x in xs], marker="o", label=client)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set(
        xscale="log",
        xlabel="client DP budget epsilon",
        ylabel="own-family preference accuracy",
        title="Client reward models under DP-SGD (mean over seeds)",
    )
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_models.png", dpi=120)
    plt.close(fig)


def plot_audits(audits: list[dict[str, Any]], out: Path) -> None:
    """Empirical lower bound vs claimed epsilon, one point per audit, with y = x: a point above the
    line would refute the claim. Non-private runs (no claim) are drawn at the right, labelled inf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({a["epsilon_claimed"] for a in audits if a["epsilon_claimed"] is not None})
    top = max(finite, default=1.0)

    def x_of(audit: dict[str, Any]) -> float:
        return 1.25 * top if audit["epsilon_claimed"] is None else audit["epsilon_claimed"]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="y = x (the claim)")
    for seed in sorted({a["seed"] for a in audits}):
        mine = sorted((a for a in audits if a["seed"] == seed), key=x_of)
        ax.plot([x_of(a) for a in mine], [a["epsilon_lower_bound"] for a in mine], marker="o", label=f"seed {seed}")
    ticks = finite + ([1.25 * top] if any(a["epsilon_claimed"] is None for a in audits) else [])
    ax.set_xticks(ticks, [f"{t:.2g}" for t in finite] + ["inf"] * (len(ticks) - len(finite)))
    confidence = audits[0]["confidence"]
    ax.set(
        xlabel="claimed epsilon (Opacus' accountant)",
        ylabel=f"empirical epsilon lower bound ({confidence:g})",
        title=f"One-run audit of client-0 ({audits[0]['arch']}), m = {audits[0]['canaries']} canaries",
    )
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "empirical_epsilon.png", dpi=120)
    plt.close(fig)

"""`secure-mor ablate`: the DP ablation sweep, epsilon x fusion x seed, through the real pipeline.

Every cell runs `server.pipeline.align` with real client nodes, a real key
authority and real CKKS, in-process (`LocalTransport`: the same handlers Flower
would call; Flower's start-up, about a minute per run, would otherwise dominate
a sweep). Layout under OUT:

    seed-S/base/          the split and the SFT policy of seed S (shared by its epsilons)
    seed-S/eps-E/         a run directory: clients trained at epsilon E (once), the
                          router (once), align/<fusion>/results.json per fusion
    results.csv           one row per finished cell, plus one "sft" row per (seed, epsilon)
    policy_accuracy.png   held-out accuracy vs epsilon per fusion (mean and range over seeds)
    reward_models.png     each client's own-family preference accuracy vs epsilon

Resumable: a cell whose results.json exists is read, not re-run. (seed, epsilon)
groups run in `workers` processes.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import shutil
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

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _group(out: Path, seed: int, epsilon: float, fusions: Sequence[str], overrides: dict[str, Any]) -> list[dict]:
    """One (seed, epsilon) group: clients trained once, then every fusion. Runs in a worker process."""

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
        results = json.loads(done.read_text()) if done.exists() else align(
            LocalTransport(nodes), run, replace(config, fusion=fusion), log=lambda m: None)
        rows.append(results)
    return rows


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
        row = {"seed": c["seed"], "epsilon": epsilon, "fusion": fusion, "overall": accuracy["overall"]["accuracy"],
               **{f: accuracy["per_family"][f]["accuracy"] for f in FAMILIES}}
        if fusion != "sft":
            row.update(reward_first=results["grpo"]["reward_first"], reward_last=results["grpo"]["reward_last"],
                       grpo_s=round(results["timings"]["grpo_s"], 1))
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
) -> Path:
    """Run (or resume) the sweep; returns the CSV path. `on_cell(done, total)` after each group."""
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    groups = [(seed, eps) for seed in grid.seeds for eps in grid.epsilons]
    # spawn: forking a process whose torch already started its thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_prepare_seed, out, seed, overrides) for seed in grid.seeds]):
            future.result()
        futures = [pool.submit(_group, out, seed, eps, grid.fusions, overrides) for seed, eps in groups]
        results: list[dict] = []
        for done, future in enumerate(as_completed(futures), start=1):
            results += future.result()
            if on_cell:
                on_cell(done, len(groups))
    return write_outputs(out, results)


def write_outputs(out: Path, results: list[dict[str, Any]]) -> Path:
    rows: list[dict[str, Any]] = []
    seen_sft = set()
    for r in results:
        for row in rows_of(r):
            key = (row["seed"], row["epsilon"], row["fusion"])
            if row["fusion"] == "sft" and key in seen_sft:
                continue
            seen_sft.add(key)
            rows.append(row)
    rows.sort(key=lambda r: (r["fusion"], str(r["epsilon"]), r["seed"]))
    fields = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    path = out / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out)
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

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fusion in sorted({r["fusion"] for r in rows}):
        by_eps: dict[float, list[float]] = {}
        for r in rows:
            if r["fusion"] == fusion:
                by_eps.setdefault(_epsilon_axis(r["epsilon"], finite), []).append(r["overall"])
        xs = sorted(by_eps)
        mean = [np.mean(by_eps[x]) for x in xs]
        low, high = [min(by_eps[x]) for x in xs], [max(by_eps[x]) for x in xs]
        ax.errorbar(xs, mean, yerr=[np.subtract(mean, low), np.subtract(high, mean)], marker="o", capsize=3,
                    label=fusion, linestyle="--" if fusion == "sft" else "-")
    ax.set(xscale="log", xlabel="client DP budget epsilon", ylabel="held-out accuracy (overall)",
           title="Policy accuracy after GRPO, by fusion (mean, min-max over seeds)")
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend()
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
    ax.set(xscale="log", xlabel="client DP budget epsilon", ylabel="own-family preference accuracy",
           title="Client reward models under DP-SGD (mean over seeds)")
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_models.png", dpi=120)
    plt.close(fig)

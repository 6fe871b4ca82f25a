"""`secure-mor ablate`: the DP ablation sweep, epsilon x fusion x objective x seed, through the real pipeline.

Every cell runs `server.pipeline.align` with real client nodes, a real key
authority and real CKKS, in-process (`LocalTransport`: the same handlers Flower
would call; Flower's start-up, about a minute per run, would otherwise dominate
a sweep). Beside the fusions, every seed runs the oracle diagnostic
(`experiments.oracle`: GRPO on a reward that reads the true answers) per objective:
the ceiling the alignment stage can reach from the same SFT start. Layout under OUT:

    seed-S/base/          the split, the SFT policy of seed S (shared by its epsilons) and
                          align/oracle[-<objective>]/ (the oracle runs)
    seed-S/eps-E/         a run directory: clients trained at epsilon E (once), the router
                          (once), align/<fusion>[-<objective>]/results.json per cell, and
                          audits/empirical-*.json: a one-run empirical privacy audit of
                          client-0's training procedure at (epsilon E, seed S)
    results.csv           one row per finished cell under OUT (earlier invocations' too), one
                          "sft" row and one "oracle" row per (seed, objective); the audit's
                          columns (audit_*) on every row of its (seed, epsilon)
    summary.md            mean +- sd over seeds of every fusion's accuracy, per family, and style
    policy_accuracy.png   held-out accuracy per fusion and epsilon, one panel per objective
    style.png             share of full-sentence answers, per fusion, one panel per objective
    reward_models.png     each client's own-family top-1 and pairwise accuracy vs epsilon
    router_weights.png    the learned router's mean weights, family x client, per objective
    empirical_epsilon.png the audits' empirical epsilon lower bound vs the claimed epsilon

Every fusion of a (seed, epsilon) group has its own key authority (its own CKKS
context and release state, `<run>/authorities/<label>`): the authority keeps one
router row per item for the life of its context, and a sweep releases the same
items under several fusions by design. A server that held every fusion's releases
of one group could solve for the clients' scores of the items they share; the
sweep runs on simulated institutions to compare fusions, a deployment runs one.

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

import numpy as np

from secure_mor.data import FAMILIES
from secure_mor.protocol import OBJECTIVES

COLUMNS = ["seed", "epsilon", "objective", "fusion", "overall", *FAMILIES, "sentences", "reward_first_quarter",
           "reward_last_quarter", "grpo_s"]
ORACLE, SFT = "oracle", "sft"
NO_EPSILON = "-"  # the SFT start and the oracle spend no client budget: one row per (seed, objective)


@dataclass(frozen=True)
class AblationGrid:
    epsilons: tuple[float, ...] = (math.inf, 4.0)
    fusions: tuple[str, ...] = ("mor", "uniform", "single:0", "single:1", "single:2")
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: tuple[int, ...] = (0, 1, 2)
    oracle: bool = True


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


def _audit(run: Path, config: Any, audit: dict[str, Any]) -> None:
    """The empirical audit of client-0's training at the cell's (epsilon, delta, seed), with the
    cell's annotations per client and training settings, unless its result is on disk."""
    from secure_mor.audits.empirical import EmpiricalAuditConfig, result_path, write_result
    from secure_mor.clients.models import DEFAULT_ARCHS
    from secure_mor.experiments.audit import run_empirical_audit

    audit_config = EmpiricalAuditConfig(
        **{"arch": DEFAULT_ARCHS[0], "client": 0, "epsilon": config.epsilon, "delta": config.delta,
           "seed": config.seed, "pairs": config.pairs_per_client, "train": config.client_training.overrides(), **audit}
    )  # fmt: skip
    path = result_path(run, audit_config)
    if not path.exists():
        write_result(run_empirical_audit(audit_config, run), run)


def _label(fusion: str, objective: str) -> str:
    from secure_mor.server.pipeline import AlignConfig

    return AlignConfig(fusion=fusion, objective=objective).label


def _group(
    out: Path, seed: int, epsilon: float, grid: AblationGrid, overrides: dict[str, Any], audit: dict | None
) -> None:
    """One (seed, epsilon) group: clients trained once, the router once, then every fusion and
    objective, then the empirical audit (unless `audit` is None). Runs in a worker process."""
    from secure_mor.authority.node import AuthorityNode
    from secure_mor.clients.node import ClientNode
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
    clients = {f"client-{k}": ClientNode(run, k) for k in range(config.num_clients)}
    for objective in grid.objectives:
        for fusion in grid.fusions:
            cell = replace(config, fusion=fusion, objective=objective)
            done = run / "align" / cell.label / "results.json"
            if done.exists():
                continue
            authority = AuthorityNode(run, authority_dir=run / "authorities" / cell.label)
            align(LocalTransport({**clients, "authority": authority}), run, cell, log=lambda m: None)
    if audit is not None:
        _audit(run, config, audit)


def _prepare_seed(out: Path, seed: int, grid: AblationGrid, overrides: dict[str, Any]) -> None:
    """The seed's split and SFT policy, then its oracle runs (one per objective)."""
    from secure_mor.config import RunDir
    from secure_mor.experiments.oracle import run_oracle
    from secure_mor.server.pipeline import AlignConfig, prepare_data, prepare_policy

    _quiet_worker()
    config = replace(AlignConfig(seed=seed), **overrides)
    run = RunDir(out / f"seed-{seed}" / "base")
    prepare_policy(run, prepare_data(run, config), config, log=lambda m: None)
    for objective in grid.objectives if grid.oracle else ():
        cell = replace(config, objective=objective, fusion=ORACLE)
        done = run.path / "align" / cell.label / "results.json"
        if not done.exists():
            run_oracle(run.path, cell, log=lambda m: None)


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """CSV rows of one cell's results.json: the aligned policy, and its SFT start."""
    c = results["config"]
    fusion = c["fusion"]
    epsilon = NO_EPSILON if fusion == ORACLE else ("inf" if c["epsilon"] is None else c["epsilon"])
    out = []
    for name, accuracy in ((fusion, results["accuracy"]["aligned"]), (SFT, results["accuracy"]["sft"])):
        row = {
            "seed": c["seed"],
            "epsilon": NO_EPSILON if name == SFT else epsilon,
            "objective": c["objective"],
            "fusion": name,
            "overall": accuracy["overall"]["accuracy"],
            "sentences": accuracy["overall"]["sentences"],
            **{f: accuracy["per_family"][f]["accuracy"] for f in FAMILIES},
        }
        if name != SFT:
            row.update(
                reward_first_quarter=results["grpo"]["reward_first_quarter"],
                reward_last_quarter=results["grpo"]["reward_last_quarter"],
                grpo_s=round(results["timings"]["grpo_s"], 1),
            )
            for party, client in (results.get("clients") or {}).items():
                own = client["family"]
                for measure, by_family in client["reward_model"].items():
                    row[f"{party}_{measure}_own"] = by_family.get(own)
                row[f"{party}_epsilon"] = "inf" if client["total_epsilon"] is None else client["total_epsilon"]
            router = results.get("router")
            if router and fusion == "mor":
                weights = router["held_out_weights"][c["objective"]]
                for family, mean in weights.items():
                    for k, w in enumerate(mean):
                        row[f"router_{family}_client-{k}"] = w
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
        for future in as_completed([pool.submit(_prepare_seed, out, seed, grid, overrides) for seed in grid.seeds]):
            future.result()
        futures = [pool.submit(_group, out, seed, eps, grid, overrides, audit) for seed, eps in groups]
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()
            if on_cell:
                on_cell(done, len(groups))
    return write_outputs(out, *finished_in(out))


def finished_in(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every finished cell's results.json and every empirical audit under OUT, those of earlier invocations
    with other grids included: a sweep run in parts (say correctness, then sentences) keeps one CSV, summary
    and set of plots of all of it, not of its last part."""
    cells = [*sorted(out.glob("seed-*/base/align/*/results.json")),
             *sorted(out.glob("seed-*/eps-*/align/*/results.json"))]
    audits = sorted(out.glob("seed-*/eps-*/audits/empirical-*.json"))
    return [json.loads(p.read_text()) for p in cells], [json.loads(p.read_text()) for p in audits]


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
    seen = set()
    for r in results:
        for row in rows_of(r):
            key = (row["seed"], row["epsilon"], row["objective"], row["fusion"])
            if key in seen:  # the SFT start appears in every cell of its seed
                continue
            seen.add(key)
            if (row["seed"], row["epsilon"]) in by_group:
                row.update(audit_columns(by_group[row["seed"], row["epsilon"]]))
            rows.append(row)
    rows.sort(key=lambda r: (r["objective"], r["fusion"], str(r["epsilon"]), r["seed"]))
    fields = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    path = out / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(summary(rows))
    plot(rows, out)
    if audits:
        plot_audits(list(audits), out)
    return path


# ---------------------------------------------------------------- summaries and plots


def _cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str, Any], list[dict[str, Any]]]:
    """(objective, fusion, epsilon) -> its rows over seeds."""
    cells: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["objective"], r["fusion"], r["epsilon"]), []).append(r)
    return cells


def _mean_sd(values: Sequence[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def fusion_order(fusions: set[str]) -> list[str]:
    first = [SFT, ORACLE, "mor", "uniform"]
    return [f for f in first if f in fusions] + sorted(fusions - set(first))


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: per objective, mean ± sd over seeds of overall and per-family accuracy and the
    sentence share, for every fusion and epsilon (SFT and oracle spend no client budget)."""
    lines = []
    cells = _cells(rows)
    sft = {(r["seed"], r["objective"]): r for r in rows if r["fusion"] == SFT}
    for objective in sorted({r["objective"] for r in rows}, key=OBJECTIVES.index):
        lines += [f"### Objective `{objective}`", "",
                  "| fusion | epsilon | seeds | overall | " + " | ".join(FAMILIES)
                  + " | sentences | lift over SFT | worst family change |",
                  "|---" * (7 + len(FAMILIES)) + "|"]
        keys = [k for k in cells if k[0] == objective]
        for fusion in fusion_order({k[1] for k in keys}):
            for eps in sorted({k[2] for k in keys if k[1] == fusion}, key=str):
                group = cells[objective, fusion, eps]
                values = [_mean_sd([float(r[m]) for r in group]) for m in ("overall", *FAMILIES, "sentences")]
                # paired with the SFT start of the same seed: the seeds' SFT policies differ more than the fusions
                starts = [(r, sft.get((r["seed"], objective))) for r in group]
                if fusion != SFT and all(start for _, start in starts):
                    values.append(_mean_sd([float(r["overall"]) - float(start["overall"]) for r, start in starts]))
                    worst = [min(float(r[f]) - float(start[f]) for f in FAMILIES) for r, start in starts]
                    values.append(_mean_sd(worst))
                else:
                    values += ["", ""]
                lines.append(f"| {fusion} | {eps} | {len(group)} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def _epsilon_order(values: set[Any]) -> list[Any]:
    finite = sorted(float(v) for v in values if v not in ("inf", NO_EPSILON))
    return (["inf"] if "inf" in values else []) + finite


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(rows)
    objectives = sorted({r["objective"] for r in rows}, key=OBJECTIVES.index)
    fusions = [f for f in fusion_order({r["fusion"] for r in rows}) if f not in (SFT, ORACLE)]
    epsilons = _epsilon_order({r["epsilon"] for r in rows})
    colours = {fusion: f"C{i}" for i, fusion in enumerate(fusions)}  # one colour per fusion in every panel

    def group(objective: str, fusion: str, eps: Any) -> list[dict[str, Any]]:
        return cells.get((objective, fusion, eps if eps == "inf" else _find_eps(cells, eps)), [])

    for metric, name, ylabel in (("overall", "policy_accuracy.png", "held-out accuracy (overall)"),
                                 ("sentences", "style.png", "share of full-sentence answers")):
        fig, axes = plt.subplots(1, len(objectives), figsize=(6.5 * len(objectives), 4.6), squeeze=False)
        legend: dict[str, Any] = {}
        for ax, objective in zip(axes[0], objectives, strict=True):
            present = [f for f in fusions if any(group(objective, f, eps) for eps in epsilons)]
            width = 0.8 / max(len(present), 1)
            for i, fusion in enumerate(present):
                xs, means, sds = [], [], []
                for j, eps in enumerate(epsilons):
                    values = [float(r[metric]) for r in group(objective, fusion, eps)]
                    if values:
                        xs.append(j - 0.4 + width * (i + 0.5))
                        means.append(np.mean(values))
                        sds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
                ax.bar(xs, means, width, yerr=sds, capsize=3, color=colours[fusion], label=fusion)
            # the two lines in different colours: the oracle's can lie on the SFT start's (a kept step 0)
            for fusion, style, colour in ((SFT, "--", "black"), (ORACLE, ":", "firebrick")):
                seeds = cells.get((objective, fusion, NO_EPSILON), [])
                if seeds:
                    ax.axhline(np.mean([float(r[metric]) for r in seeds]), color=colour, linestyle=style,
                               linewidth=1.4, label=f"{fusion} (mean over seeds)")
            ax.set_xticks(range(len(epsilons)), [f"epsilon {e if e == 'inf' else f'{e:g}'}" for e in epsilons])
            ax.set(ylabel=ylabel, title=f"objective: {objective}", ylim=(0, 1))
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        order = [f"{SFT} (mean over seeds)", f"{ORACLE} (mean over seeds)", *fusions]
        labels = [label for label in order if label in legend]
        axes[0][-1].legend([legend[label] for label in labels], labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                           title="fusion (mean ± sd over seeds)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    plot_reward_models(rows, out, epsilons)
    plot_router(rows, out, epsilons)


def _find_eps(cells: dict, eps: float) -> Any:
    """The epsilon key as the CSV rows carry it (a float, or its string once read back)."""
    for key in cells:
        if key[2] not in ("inf", NO_EPSILON) and float(key[2]) == eps:
            return key[2]
    return eps


def plot_reward_models(rows: list[dict[str, Any]], out: Path, epsilons: list[Any]) -> None:
    import matplotlib.pyplot as plt

    clients = sorted({k.removesuffix("_top1_own") for r in rows for k in r if k.endswith("_top1_own")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, measure, title in ((axes[0], "top1", "top-1 among all answers (what GRPO needs)"),
                               (axes[1], "pairwise", "pairwise: true vs one wrong answer")):
        for client in clients:
            xs, means = [], []
            for j, eps in enumerate(epsilons):
                values = {(r["seed"], float(r[f"{client}_{measure}_own"])) for r in rows
                          if str(r["epsilon"]) == str(eps) and r.get(f"{client}_{measure}_own") not in (None, "")}
                if values:
                    xs.append(j)
                    means.append(np.mean([v for _, v in values]))
            ax.plot(xs, means, marker="o", label=client)
        ax.set_xticks(range(len(epsilons)), [f"epsilon {e if e == 'inf' else f'{e:g}'}" for e in epsilons])
        ax.set(ylabel="own-family accuracy (mean over seeds)", title=title, ylim=(0, 1))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "reward_models.png", dpi=120)
    plt.close(fig)


def plot_router(rows: list[dict[str, Any]], out: Path, epsilons: list[Any]) -> None:
    import matplotlib.pyplot as plt

    mor = [r for r in rows if r["fusion"] == "mor" and any(k.startswith("router_") for k in r)]
    if not mor:
        return
    clients = sorted({k.rsplit("_", 1)[1] for r in mor for k in r if k.startswith("router_")})
    objectives = sorted({r["objective"] for r in mor}, key=OBJECTIVES.index)
    shown = [e for e in epsilons if any(str(r["epsilon"]) == str(e) for r in mor)]
    fig, axes = plt.subplots(len(objectives), len(shown), figsize=(max(4.2 * len(shown), 6.0), 3.4 * len(objectives)),
                             squeeze=False)
    for a, objective in enumerate(objectives):
        for b, eps in enumerate(shown):
            group = [r for r in mor if r["objective"] == objective and str(r["epsilon"]) == str(eps)]
            matrix = np.array([[np.mean([float(r[f"router_{f}_{c}"]) for r in group]) for c in clients]
                               for f in FAMILIES])
            ax = axes[a][b]
            ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
            ax.set_xticks(range(len(clients)), clients)
            ax.set_yticks(range(len(FAMILIES)), FAMILIES)
            ax.set_title(f"{objective}, epsilon {eps if eps == 'inf' else f'{eps:g}'}")
    fig.suptitle("Learned router: mean weight per held-out\nquestion family (rows) and client (columns)")
    fig.tight_layout()
    fig.savefig(out / "router_weights.png", dpi=120)
    plt.close(fig)


def plot_audits(audits: list[dict[str, Any]], out: Path) -> None:
    """out/empirical_epsilon.png: the audits' lower bounds vs their claims, one series per seed."""
    from secure_mor.audits.plots import claimed_vs_empirical

    points = [(a["epsilon_claimed"], a["epsilon_lower_bound"], f"seed {a['seed']}") for a in audits]
    title = f"One-run audit of client-0 ({audits[0]['arch']}), m = {audits[0]['canaries']} canaries"
    png = claimed_vs_empirical(points, title, f"empirical epsilon lower bound ({audits[0]['confidence']:g})")
    (out / "empirical_epsilon.png").write_bytes(png)

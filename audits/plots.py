"""The report's plots (matplotlib, Agg, PNG bytes): cumulative epsilon, claimed vs empirical epsilon (also
the ablation's), the fused reward."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

from secure_mor.audits.checks import Audit
from secure_mor.audits.formatting import field_of, is_number, short
from secure_mor.audits.recompute import UNBOUNDED_EPSILON
from secure_mor.audits.run_files import RunFiles


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
    return short(text, 40).replace("$", r"\$")


def cumulative_epsilon_plot(run: RunFiles, audit: Audit) -> bytes | None:
    """One panel per party (budgets are often equal: shared axes would hide parties behind each
    other): its running epsilon total over the ledger's lines, claimed (solid) and recomputed
    (dotted), and its budget (dashed). Unbounded (non-private) totals cannot be drawn: the panel says so."""
    claimed: dict[str, list[tuple[int, float]]] = {}
    budget: dict[str, float] = {}
    for number, line in enumerate(run.ledger, start=1):
        party = field_of(line, "party")
        if not isinstance(party, str) or not is_number(total := field_of(line, "total_epsilon")):
            continue
        claimed.setdefault(party, []).append((number, total))
        if is_number(b := field_of(line, "budget", "epsilon")):
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
    """The run's empirical audits (`claimed_vs_empirical`), one series per architecture."""
    points = [(a.get("epsilon_claimed"), a.get("epsilon_lower_bound"), _label(a.get("arch"))) for _, a in run.empirical]
    points = [(c, b, arch) for c, b, arch in points if (c is None or is_number(c)) and is_number(b)]
    if not points:
        return None
    return claimed_vs_empirical(points, "Empirical audits: a point above the dashed line contradicts its claim")


def claimed_vs_empirical(points: Sequence[tuple[float | None, float, str]], title: str,
                         ylabel: str = "empirical epsilon lower bound") -> bytes:
    """Empirical lower bound vs claimed epsilon, a point per audit ((claim, bound, series): the points of
    one series joined), with y = x where claims are finite: a point above it (red) refutes its claim.
    Non-private runs (claim None) are drawn at the right edge, marked inf."""
    finite = sorted({c for c, _, _ in points if c is not None})
    inf_x = 2 * max(finite, default=1.0)
    fig, ax = _figure()
    top = max([inf_x] + [b for _, b, _ in points])
    diagonal = 1.25 * max(finite, default=0.0)
    ax.plot([0, diagonal], [0, diagonal], color="grey", linestyle="--", linewidth=1, label="lower bound = claim")
    for series in dict.fromkeys(label for _, _, label in points):
        mine = sorted(((inf_x if c is None else c), b, c) for c, b, label in points if label == series)
        ax.plot([x for x, _, _ in mine], [b for _, b, _ in mine], marker="o", label=series)
        refuted = [(x, b) for x, b, c in mine if c is not None and b > c]
        if refuted:
            ax.scatter(*zip(*refuted, strict=True), color="#c62828", zorder=3, s=60)
    ticks = finite + ([inf_x] if any(c is None for c, _, _ in points) else [])
    ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["inf"] * (len(ticks) - len(finite)))
    ax.set(xlabel="claimed epsilon", ylabel=ylabel, title=title)
    ax.set_xlim(0, top * 1.08)
    ax.set_ylim(0, top * 1.08)
    ax.legend(fontsize=8)
    return _png(fig)


def reward_plot(run: RunFiles) -> bytes | None:
    """The mean fused reward of each GRPO logging step, per configuration (TRL's log)."""
    curves = [(where, rewards) for where, results in run.results if (rewards := grpo_rewards(run, where, results))]
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


def grpo_rewards(run: RunFiles, where: str, results: dict) -> list[float]:
    """Mean fused rewards from TRL's log: grpo_log.json next to the results.json, or (RUN/results.json
    of `demo`) in its configuration's align/<label>/. Never a path named inside the file."""
    label = str(field_of(results, "config", "fusion") or "").replace(":", "-")
    for path in (run.path / where).parent / "grpo_log.json", run.path / "align" / label / "grpo_log.json":
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
            return [h["reward"] for h in history if isinstance(h, dict) and is_number(h.get("reward"))]
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
    return []

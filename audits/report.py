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

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_mor.audits.checks import Audit, empirical_verdict, run_checks
from secure_mor.audits.document import (
    FAIL,
    NOT_VERIFIED,
    PASS,
    Block,
    Check,
    Figure,
    Heading,
    Table,
    Text,
    Verdict,
    render_html,
    render_markdown,
)
from secure_mor.audits.formatting import (
    eps,
    field_of,
    general,
    mechanism_summary,
    num,
    ordered,
    short,
    short_hash,
    when,
)
from secure_mor.audits.plots import cumulative_epsilon_plot, empirical_plot, grpo_rewards, reward_plot
from secure_mor.audits.run_files import EMPIRICAL_FIELDS, RunFiles, read_run

EXIT_CODES = {PASS: 0, FAIL: 1, NOT_VERIFIED: 3}  # 2: not a run directory (ReportError)


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
        remaining = "-" if budget is None else "inf" if math.isinf(budget) else eps(budget - spent)
        used = "-" if budget is None or math.isinf(budget) or budget <= 0 else f"{100 * spent / budget:.1f}%"
        rows.append(
            [
                p.party,
                str(p.entries),
                eps(budget),
                f"{p.delta:g}",
                eps(p.claimed_total),
                eps(p.rdp_total),
                eps(p.pld_total),
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
        verdict = empirical_verdict(a)
        claimed = "non-private (inf)" if a.get("epsilon_claimed") is None else eps(a.get("epsilon_claimed"))
        rows.append(
            [
                where,
                num(a.get("arch")),
                claimed,
                general(a.get("delta")),
                num(a.get("canaries")),
                num(a.get("guesses")),
                num(a.get("correct")),
                num(a.get("confidence")),
                eps(a.get("epsilon_lower_bound")),
                num(a.get("seconds"), 1),
                verdict,
                short("; ".join(f"{k}={json.dumps(a[k], default=str)}" for k in extra if k in a), 160),
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
    return field_of(results, *path, "accuracy")


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
                        num(field_of(r, "config", "fusion")),
                        "inf (non-private)"
                        if field_of(r, "config", "epsilon") is None
                        else eps(field_of(r, "config", "epsilon")),
                        general(field_of(r, "config", "delta")),
                        num(field_of(r, "config", "seed")),
                        num(field_of(r, "config", "objective")),
                        num(field_of(r, "config", "k_min")),
                        general(field_of(r, "config", "w_min")),
                        num(field_of(r, "config", "grpo", "max_steps")),
                        general(field_of(r, "config", "grpo", "learning_rate")),
                        general(field_of(r, "config", "grpo", "beta")),
                        num(field_of(r, "run_id")),
                    ]
                    for where, r in run.results
                ],
            )
        )
        families = ordered(f for _, r in run.results for f in field_of(r, "accuracy", "sft", "per_family") or {})
        blocks += [
            Heading("Held-out accuracy per question family: before (SFT) → after (aligned)", 3),
            Table(
                ["results.json", *families, "overall"],
                [
                    [where]
                    + [
                        f"{num(_accuracy(r, 'sft', f))} → {num(_accuracy(r, 'aligned', f))}"
                        for f in [*families, None]
                    ]
                    for where, r in run.results
                ],
            ),
            Heading("Style: share of full-sentence answers (the `sentences` objective), SFT → aligned", 3),
            Table(
                ["results.json", "objective", "sentences"],
                [
                    [where, num(field_of(r, "config", "objective")),
                     f"{num(field_of(r, 'accuracy', 'sft', 'overall', 'sentences'))} → "
                     f"{num(field_of(r, 'accuracy', 'aligned', 'overall', 'sentences'))}"]
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
                        num(field_of(r, "grpo", "steps")),
                        num(field_of(r, "grpo", "rounds")),
                        num(field_of(r, "grpo", "skipped_rounds")),
                        num(field_of(r, "grpo", "reward_first_quarter")),
                        num(field_of(r, "grpo", "reward_last_quarter")),
                        short(" → ".join(f"{num(p.get('accuracy'))} (step {num(p.get('step'))})"
                                          for p in field_of(r, "grpo", "held_out_curve") or [] if isinstance(p, dict)),
                               120),
                        num(min(rw, default=None)),
                        num(max(rw, default=None)),
                        num(field_of(r, "grpo", "resumed_from")),
                    ]
                    for where, r in run.results
                    for rw in [grpo_rewards(run, where, r)]
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
                        *(num(field_of(r, "timings", s), 1) for s in stages),
                        *(num(field_of(r, "timings", "scoring", s), 1) for s in scoring),
                    ]
                    for where, r in run.results
                ],
            ),
        ]
        if routers := [(where, r["router"]) for where, r in run.results if isinstance(r.get("router"), dict)]:
            clients = ", ".join(ordered(p for _, r in run.results for p in field_of(r, "clients") or {}))
            blocks += [
                Heading("Router (fusion mor): mean weight per client on held-out prompts, by objective and family",
                        3),
                Table(
                    ["results.json", "steps", "skipped", "final loss", "objective", "family", f"weights of {clients}"],
                    [
                        [
                            where,
                            num(router.get("steps")),
                            num(len(router.get("skipped") or [])),
                            num((router.get("losses") or [None])[-1]),
                            objective,
                            family,
                            short(weights, 60),
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
        families = ordered(f for _, e in run.evaluations for f in e.get("per_family") or {})
        blocks += [
            Heading("Policy evaluations before alignment (eval/*.json): accuracy (n)", 3),
            Table(
                ["stage", *families, "overall"],
                [
                    [stage]
                    + [
                        f"{num(field_of(s, 'accuracy'))} ({num(field_of(s, 'n'))})"
                        for s in [*(field_of(e, "per_family", f) for f in families), e.get("overall")]
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
                num(client.get("arch")),
                num(client.get("family")),
                num(client.get("style")),
                eps(client.get("budget_epsilon")),
                general(client.get("budget_delta")),
                str(len(runs)),
                "; ".join(
                    f"sigma {num(r.get('noise_multiplier'))}, q {num(r.get('sample_rate'), 4)}, "
                    f"{num(r.get('steps'))} steps"
                    for r in runs
                )
                or "-",
                eps(runs[-1].get("total_epsilon") if runs else None),
                ", ".join(f"{f} {num(v)}" for f, v in top1.items()) or "-",
            ]
        )
    if not rows:
        for party, c in next((r["clients"] for _, r in run.results if isinstance(r.get("clients"), dict)), {}).items():
            c = c if isinstance(c, dict) else {}
            measures = c.get("reward_model") if isinstance(c.get("reward_model"), dict) else {}
            top1 = measures.get("top1") if isinstance(measures.get("top1"), dict) else {}
            accuracies = ", ".join(f"{f} {num(v)}" for f, v in top1.items())
            rows.append(
                [
                    party,
                    num(c.get("arch")),
                    num(c.get("family")),
                    "-",
                    eps(c.get("budget_epsilon")),
                    "-",
                    "-",
                    "-",
                    eps(c.get("total_epsilon")),
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
                num(line.get("seq")),
                when(line.get("time")),
                short(line.get("party"), 40),
                short(line.get("kind"), 30),
                mechanism_summary(line.get("mechanism")),
                eps(line.get("epsilon")),
                eps(e.recomputed) if e else "-",
                eps(line.get("total_epsilon")),
                eps(e.total) if e else "-",
                short_hash(line)[:12],
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

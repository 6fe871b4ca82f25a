"""Reading a run directory for the report: the ledger, keys, results, evaluations and empirical audits,
and what is missing or malformed (stated in the report, never raised past it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_mor.audits.verify import results_files
from secure_mor.crypto.signing import read_registry
from secure_mor.ledger import LedgerError, parse_line

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


class ReportError(ValueError):
    """RUN_DIR does not exist or holds nothing Secure MoR wrote."""



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

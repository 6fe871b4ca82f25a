"""The report's checks, computed once: ledger integrity and anchors, epsilon recomputation and budgets,
empirical audits; together the verdict PASS / FAIL / NOT VERIFIED."""

from __future__ import annotations

from dataclasses import dataclass

from secure_mor.audits.document import FAIL, NONE, NOT_VERIFIED, PASS, Check
from secure_mor.audits.formatting import field_of, is_number
from secure_mor.audits.recompute import RecomputeError, Report, recompute_quietly
from secure_mor.audits.run_files import RunFiles
from secure_mor.audits.verify import VerifyResult, anchors_of, verify_ledger
from secure_mor.ledger import Anchor


@dataclass
class Audit:
    """The outcomes of every check, computed once and shown in several sections."""

    verification: VerifyResult | None
    recomputation: Report | None
    checks: list[Check]

    @property
    def status(self) -> str:
        statuses = {c.status for c in self.checks}
        return FAIL if FAIL in statuses else NOT_VERIFIED if NOT_VERIFIED in statuses else PASS


def run_checks(run: RunFiles, tolerance: float) -> Audit:
    verification, recomputation = None, None
    integrity = Check("Ledger integrity (hash chain, per-party order, Ed25519 signatures)", NOT_VERIFIED, "")
    arithmetic = Check(
        f"Epsilon recomputation (dp-accounting RDP and PLD, tolerance {tolerance:g})", NOT_VERIFIED, "no ledger"
    )
    budgets = Check("Budgets (every party's total within its budget)", NOT_VERIFIED, "no ledger")
    anchors, anchor_problems = anchors_of(run.results)
    if not run.ledger_path.is_file():
        released = anchors or anchor_problems
        integrity = Check(integrity.name, FAIL if released else NOT_VERIFIED,
                          "no ledger.jsonl, but results.json records releases" if released
                          else "no ledger.jsonl in the run directory")  # fmt: skip
    elif not run.registry:
        integrity = Check(integrity.name, NOT_VERIFIED, "no public keys in keys/: signatures cannot be checked")
    else:
        verification = verify_ledger(run.ledger_path, run.registry, anchors=anchors)
        integrity = Check(
            integrity.name,
            PASS if verification.ok else FAIL,
            f"{verification.entries} entries, {len(run.registry)} registered keys, head {verification.head_hash}"
            if verification.ok
            else f"line {verification.error_line}: {verification.reason}",
        )
    if run.ledger_path.is_file():
        try:
            recomputation = recompute_quietly(run.ledger, tolerance=tolerance)  # an unparsed line (None) fails
        except RecomputeError as err:
            arithmetic = Check(arithmetic.name, FAIL, f"cannot recompute: {err}")
            budgets = Check(budgets.name, NOT_VERIFIED, "not recomputed")
        else:
            entry_problems = [
                f"line {e.line} ({e.party}): {e.status}: {e.reason}" for e in recomputation.entries if not e.ok
            ]
            over = [p for p in recomputation.parties if p.status == "over budget"]
            running = [
                f"{p.party}: {p.status}: {'; '.join(p.reasons)}"
                for p in recomputation.parties
                if not p.ok and p.status != "over budget"
            ]
            problems = entry_problems + running
            arithmetic = Check(
                arithmetic.name,
                FAIL if problems else PASS,
                "; ".join(problems)
                if problems
                else f"{len(recomputation.entries)} releases and {len(recomputation.parties)} "
                "running totals agree with the claims",
            )
            budgets = Check(
                budgets.name,
                FAIL if over else PASS,
                "; ".join(f"{p.party}: {'; '.join(p.reasons)}" for p in over)
                if over
                else f"{len(recomputation.parties)} parties within budget",
            )
    anchor = _anchor_check(verification, anchors, anchor_problems)
    return Audit(verification, recomputation, [integrity, arithmetic, budgets, anchor, _empirical_check(run)])


def _anchor_check(verification: VerifyResult | None, anchors: list[Anchor], problems: list[str]) -> Check:
    """Each results.json records the ledger's entry count and head hash when it was written; verify_ledger
    checked that the ledger still holds those lines. Lines after the last recorded head are UNANCHORED:
    a cut-off tail or a party re-signing its own last entries would not show."""
    name = "Ledger anchored by the heads recorded in results.json"
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    if verification is None or not verification.ok:
        return Check(name, NOT_VERIFIED, "the ledger did not verify")
    if verification.entries == 0 and not anchors:
        return Check(name, NOT_VERIFIED, "UNANCHORED: the ledger is empty and no results.json records a head "
                                         "(an emptied ledger would look the same)")
    if verification.unanchored:
        return Check(name, NOT_VERIFIED, f"UNANCHORED: lines {verification.anchored + 1}-{verification.entries} "
                                         f"are covered by no recorded head ({len(anchors)} recorded head(s))")
    return Check(name, PASS, f"{len(anchors)} recorded head(s) found in the ledger; every line is anchored")


def empirical_verdict(audit: dict) -> str:
    claimed, bound = audit.get("epsilon_claimed"), audit.get("epsilon_lower_bound")
    if claimed is None:
        return "non-private (nothing to contradict)"
    if not (is_number(claimed) and is_number(bound)):
        return "malformed"
    return "VIOLATION: lower bound above the claim" if bound > claimed else "consistent with the claim"


def _empirical_check(run: RunFiles) -> Check:
    name = "Empirical privacy audits (lower bound <= claimed epsilon)"
    if not run.empirical:
        return Check(name, NONE, "no empirical audit in this run")
    bad = [
        f"{where} ({field_of(a, 'arch')}): {empirical_verdict(a)}"
        for where, a in run.empirical
        if empirical_verdict(a).startswith(("VIOLATION", "malformed"))
    ]
    return Check(name, FAIL if bad else PASS, "; ".join(bad) or f"{len(run.empirical)} audit(s), none above its claim")

"""The auditor's checks of a privacy ledger (secure_mor.ledger has its format and writer): the
chain, each party's sequence, every signature against the registry, and the anchors that close
truncation (module docstring of secure_mor.ledger)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_mor.crypto.signing import SignatureError, verify
from secure_mor.ledger import GENESIS_HASH, Anchor, LedgerError, is_count, parse_line, signed_part


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    head_hash: str
    error_line: int | None = None  # 1-based line number of the first bad line
    reason: str = ""
    anchored: int = 0  # leading lines covered by an anchor (or by the expected head)

    @property
    def unanchored(self) -> int:
        return self.entries - self.anchored


def verify_ledger(
    path: Path | str,
    registry: Mapping[str, str],
    expected_head: str | None = None,
    anchors: Sequence[Anchor] = (),
) -> VerifyResult:
    """Check every line's format, the hash chain, each party's sequence and every signature
    against `registry` ({party: Ed25519 public key hex}), then the anchors: each must name a
    line of this ledger by its hash, and `expected_head` must be the last line's hash (an
    auditor's head from earlier: detects truncation, extension and rewritten last lines).
    `ok` says whether all of that holds; `anchored` how many leading lines an anchor covers."""
    path = Path(path)
    prev, hashes = GENESIS_HASH, []
    next_party_seq: dict[str, int] = {}

    def fail(number: int, reason: str) -> VerifyResult:
        return VerifyResult(False, len(hashes), prev, number, reason)

    data = path.read_bytes() if path.exists() else b""
    pieces = data.split(b"\n") if data else [b""]
    for number, raw in enumerate(pieces[:-1], start=1):
        try:
            line = parse_line(raw)
        except LedgerError as err:
            return fail(number, str(err))
        if line["seq"] != number - 1:
            return fail(number, f"sequence number {line['seq']}, expected {number - 1} (deleted or reordered)")
        if line["prev_hash"] != prev:
            return fail(number, "previous-hash link broken (an earlier line was changed, deleted or reordered)")
        party = line["party"]
        if party not in registry:
            return fail(number, f"unknown signer {party!r} (not in the registry)")
        if line["public_key"] != registry[party]:
            return fail(number, f"public key of {party!r} does not match the registry")
        expected_seq = next_party_seq.get(party, 0)
        if line["party_seq"] != expected_seq:
            return fail(number, f"{party!r} entry number {line['party_seq']}, expected {expected_seq}")
        try:
            verify(registry[party], bytes.fromhex(line["signature"]), signed_part(line))
        except SignatureError:
            return fail(number, f"signature by {party!r} does not verify (line altered or re-chained)")
        next_party_seq[party] = expected_seq + 1
        prev = hashlib.sha256(raw).hexdigest()
        hashes.append(prev)
    if pieces[-1]:
        return fail(len(pieces), "the last line is truncated (no newline)")
    count, anchored = len(hashes), 0
    for anchor in sorted(anchors, key=lambda a: a.entries):
        held = hashes[anchor.entries - 1] if 0 < anchor.entries <= count else GENESIS_HASH
        if anchor.entries > count or held != anchor.head:
            return VerifyResult(False, count, prev, min(anchor.entries, count + 1),
                                f"line {anchor.entries} is not the anchored head {anchor.head[:16]}... "
                                "(the ledger was cut short or rewritten)")  # fmt: skip
        anchored = anchor.entries
    if expected_head is not None:
        if prev != expected_head:
            return VerifyResult(
                False,
                count,
                prev,
                count + 1,
                "head hash differs from the expected head (truncated, extended or rewritten)",
            )
        anchored = count
    return VerifyResult(True, count, prev, anchored=anchored)


def released_anything(results: Mapping[str, Any]) -> bool:
    """Whether a results.json reports a release (a decrypted GRPO round or a router step)."""
    grpo, router = results.get("grpo") or {}, results.get("router") or {}
    rounds, skipped = grpo.get("rounds", 0), grpo.get("skipped_rounds", 0)
    return (isinstance(rounds, int) and isinstance(skipped, int) and rounds > skipped) or bool(router.get("steps"))


def anchors_of(results: Iterable[tuple[str, Any]]) -> tuple[list[Anchor], list[str]]:
    """The ledger anchors recorded in results.json files ((name, parsed content) pairs), and the
    problems: a results.json that reports releases must record a non-empty ledger head."""
    anchors, problems = [], []
    for name, result in results:
        record = result.get("ledger") if isinstance(result, dict) else None
        entries, head = (record or {}).get("entries"), (record or {}).get("head")
        if is_count(entries) and entries > 0 and isinstance(head, str):
            anchors.append(Anchor(entries, head))
        elif isinstance(result, dict) and released_anything(result):
            problems.append(f"{name} reports releases but records no ledger head (an empty ledger cannot hold them)")
    return anchors, problems


def results_files(run_dir: Path) -> list[Path]:
    """Where a run directory's results.json files are (the demo's summary and one per fusion)."""
    return [p for p in [run_dir / "results.json", *sorted(run_dir.glob("align/*/results.json"))] if p.is_file()]

"""The privacy ledger: append-only, hash-chained, signed JSON Lines.

Each line is one release of privacy-relevant information: who released (party, with
a per-party sequence number), what mechanism (as a DpEvent in dp-accounting's
named-tuple JSON form, enough for any accountant to recompute epsilon), the epsilon
the party claims and the accountant it used, the party's running total and its
budget, and the chain fields: `seq` (the line's index) and `prev_hash` (the SHA-256
of the previous line's exact bytes). The party signs the whole line except the
signature itself, chain fields included: deleting, reordering or re-chaining lines
would need a new signature from every party whose line follows the change.

Strict format (`parse_line`): a line is exactly the canonical JSON of its object
(`crypto.signing.canonical_json`: sorted keys, no whitespace, ASCII escapes, finite
numbers as Python writes them), with no duplicate key, integer `seq` and
`party_seq`, and a newline after every line. Any other spelling of the same content
(whitespace, a \\u escape, 1.0 for 1, CRLF, a repeated key that a lenient parser
would silently resolve) is refused, so the hash and the signature cover the bytes
an auditor reads, not a re-serialisation of them.

Anchors. The chain proves that no line was changed in place; it cannot prove that
the ledger was not cut short, or that the last lines were not replaced by their own
signer. An anchor (`Anchor`: a line count and the hash of that line, e.g. the head
recorded in a run's results.json, or a head the auditor noted earlier) closes that:
`verify_ledger` checks every anchor and reports how many leading lines some anchor
covers. Lines after the last anchor are UNANCHORED: the auditor's tools say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_mor.crypto.signing import Signer, canonical_json
from secure_mor.files import lock_beside

GENESIS_HASH = "0" * 64
DP_EVENT_MODULE = "dp_accounting.dp_event"

KIND_DP_TRAINING = "dp_sgd_training"
KIND_REWARD_RELEASE = "fused_reward_release"
KIND_ROUTER_GRADIENT_RELEASE = "router_gradient_release"
KIND_STEP_SKIPPED = "step_skipped"
KIND_ROUTER_SETUP = "router_setup"  # the server's commitment to a router training's public parts (nothing released)
KINDS = (KIND_DP_TRAINING, KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE, KIND_STEP_SKIPPED, KIND_ROUTER_SETUP)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


class LedgerError(ValueError):
    """The ledger is damaged, forged or was given an invalid entry."""


def _event(class_name: str, **fields: Any) -> dict[str, Any]:
    return {"module_name": DP_EVENT_MODULE, "class_name": class_name, **fields}


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dict[str, Any]:
    """DP-SGD with Poisson sampling as a DpEvent: `steps` compositions of a
    Poisson-subsampled Gaussian of the given noise multiplier."""
    gaussian = _event("GaussianDpEvent", noise_multiplier=float(noise_multiplier))
    sampled = _event("PoissonSampledDpEvent", sampling_probability=float(sample_rate), event=gaussian)
    return _event("SelfComposedDpEvent", event=sampled, count=int(steps))


def no_privacy_cost_event() -> dict[str, Any]:
    """A release that is post-processing of DP outputs (or of no private data)."""
    return _event("NoOpDpEvent")


def non_private_event() -> dict[str, Any]:
    return _event("NonPrivateDpEvent")


def line_hash(line: Mapping[str, Any]) -> str:
    """SHA-256 of a line's bytes (for a line that `parse_line` accepts, its canonical JSON)."""
    return hashlib.sha256(canonical_json(dict(line))).hexdigest()


def signed_part(line: Mapping[str, Any]) -> bytes:
    """What the party signs: the whole line but its signature (body and chain fields)."""
    return canonical_json({k: v for k, v in line.items() if k != "signature"})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise LedgerError("a key appears twice")
    return out


def _no_constant(name: str) -> Any:
    raise LedgerError(f"{name} is not a number")


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_line(raw: bytes) -> dict[str, Any]:
    """One ledger line (without its newline), strictly: LedgerError unless it is the canonical
    JSON of an object with no duplicate key, integer seq and party_seq, hex hashes and signature."""
    try:
        line = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also a > 4,300-digit integer
        raise LedgerError(f"not valid JSON ({type(err).__name__})") from err
    if not isinstance(line, dict):
        raise LedgerError("not a JSON object")
    try:
        canonical = canonical_json(line)
    except ValueError as err:  # a number that overflowed to inf
        raise LedgerError(f"not canonical JSON ({err})") from err
    if canonical != raw:
        raise LedgerError("not canonical JSON (sorted keys, no whitespace, no escapes or spellings of its own)")
    for key in ("seq", "party_seq"):
        if not is_count(line.get(key)):
            raise LedgerError(f"{key} {line.get(key)!r} is not a non-negative integer")
    if not (isinstance(line.get("prev_hash"), str) and _HEX64.fullmatch(line["prev_hash"])):
        raise LedgerError("prev_hash is not a SHA-256 hex digest")
    if not (isinstance(line.get("signature"), str) and _HEX128.fullmatch(line["signature"])):
        raise LedgerError("signature is not an Ed25519 signature in hex")
    if not isinstance(line.get("party"), str) or not isinstance(line.get("public_key"), str):
        raise LedgerError("party and public_key must be strings")
    if line.get("kind") not in KINDS:
        raise LedgerError(f"unknown kind {line.get('kind')!r}")
    return line


def _split_lines(data: bytes) -> list[bytes]:
    """The file's lines without their newlines; LedgerError if the last one has none (cut short)."""
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise LedgerError(f"line {len(lines)}: the last line is truncated (no newline)")
    return lines[:-1]


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta}


@dataclass(frozen=True)
class Anchor:
    """The ledger held `entries` lines and its last one hashed to `head` (GENESIS_HASH for none)."""

    entries: int
    head: str


class Ledger:
    """One ledger file. Appends are serialised with an advisory file lock, so several processes on one
    machine (Flower's simulation workers) may share it. The file only grows: an object reads, strictly,
    only what was appended since it last looked (a file replaced or cut short is read again from the
    start), so an append costs the new lines, not the whole ledger."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self._read = 0  # bytes parsed so far
        self._file: tuple[int, int] | None = None  # (device, inode) of what was read
        self._count = 0
        self._last_hash = GENESIS_HASH
        self._last_line: tuple[int, bytes] = (0, b"")  # offset and bytes of the last line (re-checked each read)
        self._per_party: dict[str, int] = {}

    def _catch_up(self) -> None:
        """Parse what was appended since the last call; LedgerError names the first bad line."""
        if not self.path.exists():
            if self._read:
                raise LedgerError(f"{self.path} disappeared")
            return
        with open(self.path, "rb") as f:
            stat = os.fstat(f.fileno())
            offset, last = self._last_line
            f.seek(offset)
            if (self._file not in (None, (stat.st_dev, stat.st_ino)) or stat.st_size < self._read
                    or f.read(len(last)) != last):  # replaced, cut short or its last line rewritten
                self._reset()
            self._file = (stat.st_dev, stat.st_ino)
            f.seek(self._read)
            new = f.read()
        for raw in _split_lines(new):
            try:
                line = parse_line(raw)
            except LedgerError as err:
                raise LedgerError(f"line {self._count + 1}: {err}") from err
            self._last_line = (self._read, raw + b"\n")
            self._read += len(raw) + 1
            self._count += 1
            self._last_hash = hashlib.sha256(raw).hexdigest()
            self._per_party[line["party"]] = self._per_party.get(line["party"], 0) + 1

    def entries(self) -> list[dict[str, Any]]:
        """All lines, parsed strictly (`parse_line`); LedgerError names the first bad line."""
        out = []
        for number, raw in enumerate(_split_lines(self.path.read_bytes()) if self.path.exists() else [], start=1):
            try:
                out.append(parse_line(raw))
            except LedgerError as err:
                raise LedgerError(f"line {number}: {err}") from err
        return out

    def entries_of(self, party: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e.get("party") == party]

    def head(self) -> Anchor:
        """The anchor of the ledger as it is now (record it, e.g. in results.json)."""
        if not self.path.exists():
            return Anchor(0, GENESIS_HASH)
        with lock_beside(self.path):
            self._catch_up()
            return Anchor(self._count, self._last_hash)

    def append(
        self,
        signer: Signer,
        kind: str,
        *,
        mechanism: Mapping[str, Any],
        epsilon: float,
        delta: float,
        accountant: str,
        total_epsilon: float,
        budget: Budget | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sign and append one release by `signer.party`; returns the line written."""
        if kind not in KINDS:
            raise LedgerError(f"unknown ledger entry kind {kind!r}; expected one of {KINDS}")
        with lock_beside(self.path):
            self._catch_up()  # never extend a ledger whose lines this object has not read and checked
            line = {
                "party": signer.party,
                "party_seq": self._per_party.get(signer.party, 0),
                "public_key": signer.public_key_hex,
                "time": time.time(),
                "kind": kind,
                "mechanism": dict(mechanism),
                "epsilon": float(epsilon),
                "delta": float(delta),
                "accountant": accountant,
                "total_epsilon": float(total_epsilon),
                "budget": budget.as_dict() if budget else None,
                "details": dict(details or {}),
                "seq": self._count,
                "prev_hash": self._last_hash,
            }
            line["signature"] = signer.sign(signed_part(line)).hex()
            with open(self.path, "ab") as f:
                f.write(canonical_json(line) + b"\n")
            self._catch_up()
        return line

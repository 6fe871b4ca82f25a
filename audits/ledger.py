"""The privacy ledger: append-only, hash-chained, signed JSON Lines.

Each line is one release of privacy-relevant information. Its signed body says
who released (party, with a per-party sequence number so that a party's own
entries cannot be dropped or reordered unnoticed), what mechanism (as a DpEvent
in dp-accounting's named-tuple JSON form, enough for any accountant to recompute
epsilon), the epsilon the party claims and the accountant it used, the party's
running total and its budget. The ledger keeper adds the chain fields: `seq` and
the SHA-256 of the previous line. The signature covers the body only, so that a
party can sign an entry that someone else appends.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_mor.crypto.signing import SignatureError, Signer, canonical_json, verify

GENESIS_HASH = "0" * 64
DP_EVENT_MODULE = "dp_accounting.dp_event"

KIND_DP_TRAINING = "dp_sgd_training"
KIND_REWARD_RELEASE = "fused_reward_release"
KIND_ROUTER_GRADIENT_RELEASE = "router_gradient_release"
KIND_STEP_SKIPPED = "step_skipped"
KINDS = (KIND_DP_TRAINING, KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE, KIND_STEP_SKIPPED)

CHAIN_FIELDS = ("seq", "prev_hash", "signature")


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
    return hashlib.sha256(canonical_json(dict(line))).hexdigest()


def signed_body(line: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k not in CHAIN_FIELDS}


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta}


class Ledger:
    """One ledger file. Appends are serialised with an advisory file lock, so
    several processes on one machine (Flower's simulation workers) may share it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        """All lines, parsed; raises LedgerError on a line that is not JSON."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    out.append(json.loads(raw))
                except json.JSONDecodeError as err:
                    raise LedgerError(f"line {number}: not valid JSON ({err.msg})") from err
        return out

    def entries_of(self, party: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e.get("party") == party]

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
        with self._locked():
            existing = self.entries()
            party_seq = sum(1 for e in existing if e.get("party") == signer.party)
            body = {
                "party": signer.party,
                "party_seq": party_seq,
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
            }
            line = {
                **body,
                "signature": signer.sign(canonical_json(body)).hex(),
                "seq": len(existing),
                "prev_hash": line_hash(existing[-1]) if existing else GENESIS_HASH,
            }
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(canonical_json(line).decode() + "\n")
        return line


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    head_hash: str
    error_line: int | None = None  # 1-based line number of the first bad line
    reason: str = ""


def verify_ledger(path: Path | str, registry: Mapping[str, str], expected_head: str | None = None) -> VerifyResult:
    """Check the hash chain, each party's sequence and every signature against
    `registry` ({party: Ed25519 public key hex}). `expected_head`, when the auditor
    holds it from an earlier verification or a receipt, also detects truncation."""
    path = Path(path)
    prev = GENESIS_HASH
    next_party_seq: dict[str, int] = {}
    count = 0
    raw_lines = path.read_bytes().split(b"\n") if path.exists() else []
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    elif raw_lines:
        return VerifyResult(False, len(raw_lines) - 1, prev, len(raw_lines), "last line is truncated")

    def fail(number: int, reason: str) -> VerifyResult:
        return VerifyResult(False, number - 1, prev, number, reason)

    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return fail(number, "not valid JSON (damaged, truncated or nested too deep)")
        if not isinstance(line, dict):
            return fail(number, "not a JSON object")
        if line.get("seq") != number - 1:
            return fail(number, f"sequence number {line.get('seq')!r}, expected {number - 1} (deleted or reordered)")
        if line.get("prev_hash") != prev:
            return fail(number, "previous-hash link broken (an earlier line was changed, deleted or reordered)")
        party = line.get("party")
        if party not in registry:
            return fail(number, f"unknown signer {party!r} (not in the registry)")
        if line.get("public_key") != registry[party]:
            return fail(number, f"public key of {party!r} does not match the registry")
        expected_seq = next_party_seq.get(party, 0)
        if line.get("party_seq") != expected_seq:
            return fail(number, f"{party!r} entry number {line.get('party_seq')!r}, expected {expected_seq}")
        try:
            verify(registry[party], bytes.fromhex(line.get("signature", "")), canonical_json(signed_body(line)))
        except (SignatureError, ValueError, TypeError):
            return fail(number, f"signature by {party!r} does not verify (entry altered)")
        next_party_seq[party] = expected_seq + 1
        prev = line_hash(line)
        count += 1
    if expected_head is not None and prev != expected_head:
        return VerifyResult(False, count, prev, count + 1, "head hash differs from the expected head (truncated)")
    return VerifyResult(True, count, prev)

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

import fcntl
import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def _is_int(value: Any) -> bool:
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
        if not _is_int(line.get(key)):
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

    def _raw_lines(self) -> list[bytes]:
        return _split_lines(self.path.read_bytes()) if self.path.exists() else []

    def entries(self) -> list[dict[str, Any]]:
        """All lines, parsed strictly (`parse_line`); LedgerError names the first bad line."""
        out = []
        for number, raw in enumerate(self._raw_lines(), start=1):
            try:
                out.append(parse_line(raw))
            except LedgerError as err:
                raise LedgerError(f"line {number}: {err}") from err
        return out

    def entries_of(self, party: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e.get("party") == party]

    def head(self) -> Anchor:
        """The anchor of the ledger as it is now (record it, e.g. in results.json)."""
        lines = self._raw_lines()
        return Anchor(len(lines), hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS_HASH)

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
            existing = self.entries()  # never extend a damaged ledger
            raw = self._raw_lines()
            line = {
                "party": signer.party,
                "party_seq": sum(1 for e in existing if e["party"] == signer.party),
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
                "seq": len(existing),
                "prev_hash": hashlib.sha256(raw[-1]).hexdigest() if raw else GENESIS_HASH,
            }
            line["signature"] = signer.sign(signed_part(line)).hex()
            with open(self.path, "ab") as f:
                f.write(canonical_json(line) + b"\n")
        return line


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
        if _is_int(entries) and entries > 0 and isinstance(head, str):
            anchors.append(Anchor(entries, head))
        elif isinstance(result, dict) and released_anything(result):
            problems.append(f"{name} reports releases but records no ledger head (an empty ledger cannot hold them)")
    return anchors, problems


def results_files(run_dir: Path) -> list[Path]:
    """Where a run directory's results.json files are (the demo's summary and one per fusion)."""
    return [p for p in [run_dir / "results.json", *sorted(run_dir.glob("align/*/results.json"))] if p.is_file()]

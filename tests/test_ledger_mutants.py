"""Mutants of a ledger made by the project's API: against an anchor, every one is detected.

The adversary edits the bytes (bit flips, insertions, deletions), the structure (deleted,
reordered, duplicated, truncated or appended lines, with and without recomputing the chain
fields), the spelling (duplicate keys, whitespace, escapes, other spellings of a number,
CRLF, a BOM), and, holding one party's signing key, re-signs that party's own entries with
new content and re-chains what it can. The ledger is built once; each mutant is one
`verify_ledger` call against the honest ledger's head."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_mor.audits.verify import verify_ledger
from secure_mor.crypto.signing import Signer, canonical_json
from secure_mor.ledger import (
    GENESIS_HASH,
    KIND_DP_TRAINING,
    KIND_REWARD_RELEASE,
    KIND_ROUTER_GRADIENT_RELEASE,
    KIND_STEP_SKIPPED,
    Anchor,
    Budget,
    Ledger,
    dp_sgd_event,
    no_privacy_cost_event,
)

PARTIES = ("client-0", "client-1", "authority", "server")


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Signer]]:
    """Two clients' DP trainings, the authority's releases, a skipped round: 9 lines."""
    signers = {p: Signer.generate(p) for p in PARTIES}
    ledger = Ledger(tmp_path_factory.mktemp("ledger") / "ledger.jsonl")

    def training(party: str, steps: int, total: float) -> None:
        ledger.append(signers[party], KIND_DP_TRAINING, mechanism=dp_sgd_event(1.1, 0.05, steps), epsilon=2.0,
                      delta=1e-5, accountant="prv", total_epsilon=total, budget=Budget(8.0, 1e-5),
                      details={"client_id": int(party[-1]), "pairs": 800})  # fmt: skip

    def release(kind: str, step: int) -> None:
        ledger.append(signers["authority"], kind, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
                      accountant="none (post-processing)", total_epsilon=0.0,
                      details={"run_id": "mor-s0", "step": step, "contributors": ["client-0", "client-1"]})  # fmt: skip

    training("client-0", 100, 2.0)
    training("client-1", 120, 2.0)
    release(KIND_REWARD_RELEASE, 0)
    release(KIND_ROUTER_GRADIENT_RELEASE, 0)
    training("client-0", 100, 3.1)
    ledger.append(signers["server"], KIND_STEP_SKIPPED, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
                  accountant="none (nothing released)", total_epsilon=0.0,
                  details={"run_id": "mor-s0", "step": 1, "present": ["client-0"]})  # fmt: skip
    release(KIND_REWARD_RELEASE, 2)
    release(KIND_REWARD_RELEASE, 3)
    training("client-1", 50, 2.9)
    return ledger.path.read_bytes(), signers


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def _join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _resign(line: dict, signer: Signer) -> dict:
    line = {k: v for k, v in line.items() if k != "signature"}
    return {**line, "signature": signer.sign(canonical_json(line)).hex()}


def _rechain(entries: list[dict], signer: Signer | None) -> bytes:
    """Recompute seq, party_seq and prev_hash of every line (the keeper's re-chaining); re-sign
    the lines of `signer`'s party (a party that holds only its own key)."""
    out, prev, per_party = [], GENESIS_HASH, Counter()
    for index, entry in enumerate(entries):
        line = {**entry, "seq": index, "prev_hash": prev, "party_seq": per_party[entry["party"]]}
        per_party[entry["party"]] += 1
        if signer is not None and line["party"] == signer.party:
            line = _resign(line, signer)
        raw = canonical_json(line)
        out.append(raw)
        prev = hashlib.sha256(raw).hexdigest()
    return _join(out)


def _respellings(raw: bytes) -> Iterator[bytes]:
    """The same object, spelled differently: every one parses to the same content (or, for
    duplicate keys, to what a lenient parser keeps)."""
    text = raw.decode()
    yield b'{"epsilon":-1.0,' + raw[1:]  # a duplicate key the parser would overwrite
    yield raw[:-1] + b',"epsilon":' + json.dumps(json.loads(raw)["epsilon"]).encode() + b"}"
    yield text.replace(":", ": ", 1).encode()
    yield text.replace(",", ", ", 1).encode()
    yield b" " + raw
    yield raw + b" "
    yield raw + b"\r"  # CRLF line ending
    yield json.dumps(json.loads(raw), sort_keys=True, indent=1).encode().replace(b"\n", b"")
    yield json.dumps(json.loads(raw)).encode()  # insertion order, default separators
    yield text.replace('"party"', '"\\u0070arty"', 1).encode()
    yield text.replace("client", "\\u0063lient", 1).encode() if "client" in text else raw + b"\t"
    seq = json.loads(raw)["seq"]
    yield text.replace(f'"seq":{seq}', f'"seq":{seq}.0').encode()
    yield text.replace(f'"seq":{seq}', f'"seq":{seq}e0').encode()
    yield text.replace('"delta":1e-05', '"delta":0.00001').replace('"delta":0.0', '"delta":0.00').encode()
    yield text.replace('"epsilon":', '"epsilon":+', 1).encode()
    yield text.replace('"epsilon":2.0', '"epsilon":2').replace('"epsilon":0.0', '"epsilon":0').encode()
    yield text.replace('"time":', '"time":1e400,"tim":', 1).encode()


def _content_edits(entry: dict) -> Iterator[dict]:
    """What a party might like its own entry to say instead."""
    yield {**entry, "epsilon": entry["epsilon"] / 4}
    yield {**entry, "total_epsilon": 0.5}
    yield {**entry, "time": entry["time"] - 86400}
    yield {**entry, "details": {**entry["details"], "step": 99}}
    if entry["kind"] == KIND_DP_TRAINING:
        mechanism = json.loads(json.dumps(entry["mechanism"]))
        mechanism["event"]["event"]["noise_multiplier"] *= 2  # "I added more noise" ...
        yield {**entry, "mechanism": mechanism, "epsilon": entry["epsilon"] / 2}  # ... "so I spent less"


def mutants(honest: bytes, signers: dict[str, Signer], seed: int = 0) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    lines = _lines(honest)
    entries = [json.loads(line) for line in lines]
    n = len(lines)
    # bytes
    for _ in range(1000):
        data = bytearray(honest)
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
        yield "bit flip", bytes(data)
    for _ in range(250):
        position = rng.randrange(len(honest))
        yield "byte deleted", honest[:position] + honest[position + 1 :]
    for _ in range(250):
        position = rng.randrange(len(honest) + 1)
        yield "byte inserted", honest[:position] + bytes([rng.randrange(256)]) + honest[position:]
    for _ in range(100):
        start = rng.randrange(len(honest))
        end = min(len(honest), start + rng.randrange(1, 9))
        yield "span repeated", honest[:end] + honest[start:end] + honest[end:]
    # structure: the keeper re-chains (no key), or one party re-chains and re-signs its own lines
    adversaries: list[Signer | None] = [None, *signers.values()]
    for i in range(n):
        yield "line deleted", _join(lines[:i] + lines[i + 1 :])
        yield "line duplicated", _join(lines[: i + 1] + lines[i:])
        yield "line moved to the end", _join(lines[:i] + lines[i + 1 :] + lines[i : i + 1])
        for adversary in adversaries:
            yield "line deleted, re-chained", _rechain(entries[:i] + entries[i + 1 :], adversary)
            yield "line duplicated, re-chained", _rechain(entries[: i + 1] + entries[i:], adversary)
            if i + 1 < n:
                swapped = entries[:i] + [entries[i + 1], entries[i]] + entries[i + 2 :]
                yield "lines swapped, re-chained", _rechain(swapped, adversary)
        if i + 1 < n:
            yield "lines swapped", _join(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2 :])
    for keep in range(n):
        yield "truncated at a line", _join(lines[:keep])
        for adversary in signers.values():
            yield "truncated, tail re-signed", _rechain(entries[:keep], adversary)
    for _ in range(40):
        yield "truncated mid-line", honest[: rng.randrange(1, len(honest))]
    yield "empty file", b""
    yield "final newline removed", honest[:-1]
    yield "byte order mark", b"\xef\xbb\xbf" + honest
    yield "all lines CRLF", honest.replace(b"\n", b"\r\n")
    for party, signer in signers.items():  # a new, validly signed last entry
        extra = {**entries[-1], "party": party, "public_key": signer.public_key_hex, "details": {}}
        yield "entry appended", _rechain([*entries, extra], signer)
    # spelling: the same content, other bytes
    for i in range(n):
        for spelled in _respellings(lines[i]):
            yield "respelled", _join(lines[:i] + [spelled] + lines[i + 1 :])
        yield "blank line inserted", _join(lines[:i] + [b""] + lines[i:])
        # beyond Python's int-to-str limit (4,300 digits): json raises ValueError, not JSONDecodeError
        huge = lines[i].replace(b'"seq":%d' % entries[i]["seq"], b'"seq":' + b"9" * 5000)
        yield "5,000-digit integer", _join(lines[:i] + [huge] + lines[i + 1 :])
    # a party re-signs its own entries: in place, or re-chaining and re-signing what it can
    for i, entry in enumerate(entries):
        owner = signers[entry["party"]]
        for edited in _content_edits(entry):
            resigned = canonical_json(_resign(edited, owner))
            yield "own entry re-signed in place", _join(lines[:i] + [resigned] + lines[i + 1 :])
            yield "own entry re-signed, re-chained", _rechain(entries[:i] + [edited] + entries[i + 1 :], owner)
            yield "own entry re-signed, later lines dropped", _rechain(entries[:i] + [edited], owner)
        impostor = Signer.generate(entry["party"])
        forged = _resign({**entry, "public_key": impostor.public_key_hex}, impostor)
        yield "entry signed by an impostor key", _join(lines[:i] + [canonical_json(forged)] + lines[i + 1 :])
        renumbered = _resign({**entry, "party_seq": entry["party_seq"] + 1}, owner)
        yield "own party_seq changed, re-signed", _join(lines[:i] + [canonical_json(renumbered)] + lines[i + 1 :])


def test_every_mutant_is_detected_against_an_anchor(honest, tmp_path: Path) -> None:
    """Against the head (`audit verify --head`) every mutant fails. Against a results.json anchor
    (the first 9 lines), lines may follow it, so a mutant that only appends validly signed lines
    verifies, and those lines are reported UNANCHORED; every other mutant fails. One
    verification per mutant answers both."""
    data, signers = honest
    registry = {p: s.public_key_hex for p, s in signers.items()}
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(data)
    reference = verify_ledger(path, registry)
    assert reference.ok and reference.entries == 9 and reference.unanchored == 9  # unanchored on its own
    anchor = [Anchor(9, reference.head_hash)]
    counts, against_head, against_anchor, extensions = Counter(), [], [], []
    for kind, mutant in mutants(data, signers):
        if mutant == data:
            continue  # an edit that wrote back the same bytes
        counts[kind] += 1
        path.write_bytes(mutant)
        result = verify_ledger(path, registry, anchors=anchor)
        if result.ok and result.head_hash == reference.head_hash:  # what --head would accept
            against_head.append(f"{kind}: {mutant[:200]!r}")
        if result.ok and not result.unanchored:
            against_anchor.append(f"{kind}: {mutant[:200]!r}")
        elif result.ok:
            extensions.append(mutant)
    total = sum(counts.values())
    assert total >= 2000, counts
    assert against_head == [], f"{len(against_head)} of {total} mutants undetected: {against_head[:5]}"
    assert against_anchor == [], against_anchor[:5]
    assert len(extensions) >= counts["entry appended"]
    assert all(m.startswith(data) and m.count(b"\n") == 10 for m in extensions)  # the anchored 9 lines, intact

import json
import os
import stat

import pytest

from secure_mor.audits.verify import verify_ledger
from secure_mor.crypto.signing import SignatureError, Signer, load_or_create_signer, load_signer, read_registry
from secure_mor.ledger import (
    KIND_DP_TRAINING,
    KIND_REWARD_RELEASE,
    Budget,
    Ledger,
    LedgerError,
    dp_sgd_event,
    no_privacy_cost_event,
)


@pytest.fixture
def ledger_and_registry(tmp_path):
    client, authority = Signer.generate("client-0"), Signer.generate("authority")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for run in range(3):
        ledger.append(
            client,
            KIND_DP_TRAINING,
            mechanism=dp_sgd_event(1.2, 0.02, 100 * (run + 1)),
            epsilon=1.0,
            delta=1e-5,
            accountant="prv",
            total_epsilon=1.0 + run,
            budget=Budget(8.0, 1e-5),
        )
        ledger.append(
            authority,
            KIND_REWARD_RELEASE,
            mechanism=no_privacy_cost_event(),
            epsilon=0.0,
            delta=0.0,
            accountant="none",
            total_epsilon=0.0,
            details={"step": run},
        )
    registry = {"client-0": client.public_key_hex, "authority": authority.public_key_hex}
    return ledger, registry


def test_an_honest_ledger_verifies(ledger_and_registry):
    ledger, registry = ledger_and_registry
    result = verify_ledger(ledger.path, registry)
    assert result.ok and result.entries == 6
    assert verify_ledger(ledger.path, registry, expected_head=result.head_hash).ok
    entry = ledger.entries()[0]
    assert entry["mechanism"]["class_name"] == "SelfComposedDpEvent"
    assert entry["mechanism"]["event"]["event"]["noise_multiplier"] == 1.2


def _lines(path):
    return path.read_text().splitlines(keepends=True)


def test_a_flipped_byte_is_detected_at_its_line(ledger_and_registry):
    ledger, registry = ledger_and_registry
    lines = _lines(ledger.path)
    lines[2] = lines[2].replace('"total_epsilon":2.0', '"total_epsilon":0.5')
    ledger.path.write_text("".join(lines))
    result = verify_ledger(ledger.path, registry)
    assert not result.ok and result.error_line == 3 and "signature" in result.reason


def test_deleted_reordered_and_truncated_lines_are_detected(ledger_and_registry):
    ledger, registry = ledger_and_registry
    original = _lines(ledger.path)
    head = verify_ledger(ledger.path, registry).head_hash

    ledger.path.write_text("".join(original[:1] + original[2:]))
    deleted = verify_ledger(ledger.path, registry)
    assert not deleted.ok and deleted.error_line == 2

    ledger.path.write_text("".join([original[1], original[0]] + original[2:]))
    reordered = verify_ledger(ledger.path, registry)
    assert not reordered.ok and reordered.error_line == 1

    ledger.path.write_text("".join(original)[:-20])
    cut = verify_ledger(ledger.path, registry)
    assert not cut.ok and cut.error_line == 6 and "truncated" in cut.reason

    ledger.path.write_text("".join(original[:-1]))
    dropped_tail = verify_ledger(ledger.path, registry, expected_head=head)
    assert not dropped_tail.ok and "truncated" in dropped_tail.reason


def test_unknown_signer_and_wrong_key_are_detected(ledger_and_registry):
    ledger, registry = ledger_and_registry
    result = verify_ledger(ledger.path, {"client-0": registry["client-0"]})
    assert not result.ok and result.error_line == 2 and "unknown signer" in result.reason
    impostor = Signer.generate("authority")
    result = verify_ledger(ledger.path, {**registry, "authority": impostor.public_key_hex})
    assert not result.ok and "does not match the registry" in result.reason


def test_a_forged_entry_with_a_valid_chain_is_refused(ledger_and_registry):
    ledger, registry = ledger_and_registry
    forger = Signer.generate("client-0")  # right name, wrong key
    entries = ledger.entries()
    forged = dict(entries[-1])
    ledger.path.unlink()
    rebuilt = Ledger(ledger.path)
    for entry in entries[:-1]:
        with open(rebuilt.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
    forged_line = rebuilt.append(
        forger,
        KIND_REWARD_RELEASE,
        mechanism=no_privacy_cost_event(),
        epsilon=0,
        delta=0,
        accountant="none",
        total_epsilon=0,
    )
    assert forged_line["seq"] == forged["seq"]
    result = verify_ledger(rebuilt.path, registry)
    assert not result.ok and result.error_line == 6


def test_unknown_kind_and_bad_json_raise(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    with pytest.raises(LedgerError, match="unknown ledger entry kind"):
        ledger.append(Signer.generate("x"), "gift", mechanism={}, epsilon=0, delta=0, accountant="", total_epsilon=0)
    assert not ledger.path.exists()  # nothing written
    ledger.path.write_text("{not json\n")
    with pytest.raises(LedgerError, match="line 1"):
        ledger.entries()


def test_signing_keys_at_rest(tmp_path):
    signer = load_or_create_signer("client-1", tmp_path / "keys", passphrase="correct horse")
    key_file = tmp_path / "keys" / "client-1.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert b"ENCRYPTED" in key_file.read_bytes()
    again = load_signer("client-1", tmp_path / "keys", passphrase="correct horse")
    assert again.public_key_hex == signer.public_key_hex
    assert read_registry(tmp_path / "keys") == {"client-1": signer.public_key_hex}
    with pytest.raises(SignatureError, match="wrong passphrase"):
        load_signer("client-1", tmp_path / "keys", passphrase="wrong")
    with pytest.raises(SignatureError, match="no signing key"):
        load_signer("client-9", tmp_path / "keys")

"""The auditor's CLI: `verify` finds tampering, `recompute` finds wrong epsilons
(even when honestly signed), budget overruns and malformed mechanisms."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import dp_event
from typer.testing import CliRunner

from secure_mor.audits.cli import audit_app
from secure_mor.audits.recompute import UNBOUNDED_EPSILON, RecomputeError, event_from_json, recompute
from secure_mor.audits.verify import verify_ledger
from secure_mor.crypto.signing import Signer, canonical_json, load_signer, read_registry, save_signer
from secure_mor.ledger import (
    KIND_DP_TRAINING,
    KIND_REWARD_RELEASE,
    Budget,
    Ledger,
    dp_sgd_event,
    no_privacy_cost_event,
    non_private_event,
    signed_part,
)

DELTA = 1e-5
RUNS = [(1.0, 0.125, 16), (1.5, 0.1, 20)]  # (noise multiplier, sample rate, steps) of client-0
PRV_RUN = (1.1, 0.05, 30)  # client-1, claimed by Opacus' PRV accountant
runner = CliRunner()


def _pld(*events) -> float:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_event.ComposedDpEvent([event_from_json(e) for e in events]))
    return acc.get_epsilon(DELTA)


# Opacus' PRV accountant (opacus 1.6.0) on PRV_RUN at DELTA:
#   a = opacus.accountants.create_accountant(mechanism="prv"); a.history = [PRV_RUN]; a.get_epsilon(DELTA)
# Hard-coded because importing Opacus (torch) alone takes longer than this whole module.
PRV_CLAIM = 1.821625091991917


@pytest.fixture(scope="module")
def claims():
    """Honest claims: client-0's per-run and running totals by dp-accounting's PLD,
    client-1's by Opacus' PRV."""
    first, second = (dp_sgd_event(*r) for r in RUNS)
    return {
        "c0": [_pld(first), _pld(second)],
        "c0_total": [_pld(first), _pld(first, second)],
        "prv": PRV_CLAIM,
        "prv_accountant": "prv",
    }


def build(tmp_path: Path, claims, *, doctor: float | None = None, budget: float = 8.0, extra=None) -> Path:
    """A ledger in tmp_path/ledger.jsonl with keys in tmp_path/keys.

    Line 1-2: client-0's two DP-SGD runs (line 2's epsilon replaced by `doctor`,
    still validly signed). Line 3: client-1's PRV-claimed run. Line 4: an
    ablation client's non-private run under an unbounded budget. Line 5: a
    post-processing release (NoOp). `extra`: (signer name, mechanism) appended last."""
    keys = tmp_path / "keys"
    signers = {name: Signer.generate(name) for name in ("client-0", "client-1", "client-9", "server")}
    for signer in signers.values():
        save_signer(signer, keys)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for i, run in enumerate(RUNS):
        eps = claims["c0"][i] if doctor is None or i == 0 else doctor
        ledger.append(
            signers["client-0"], KIND_DP_TRAINING, mechanism=dp_sgd_event(*run), epsilon=eps, delta=DELTA,
            accountant="pld", total_epsilon=claims["c0_total"][i], budget=Budget(budget, DELTA),
        )  # fmt: skip
    ledger.append(
        signers["client-1"], KIND_DP_TRAINING, mechanism=dp_sgd_event(*PRV_RUN), epsilon=claims["prv"],
        delta=DELTA, accountant=claims["prv_accountant"], total_epsilon=claims["prv"], budget=Budget(8.0, DELTA),
    )  # fmt: skip
    ledger.append(
        signers["client-9"], KIND_DP_TRAINING, mechanism=non_private_event(), epsilon=UNBOUNDED_EPSILON,
        delta=DELTA, accountant="rdp", total_epsilon=UNBOUNDED_EPSILON, budget=Budget(UNBOUNDED_EPSILON, DELTA),
        details={"non_private": True},
    )  # fmt: skip
    ledger.append(
        signers["server"], KIND_REWARD_RELEASE, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=DELTA,
        accountant="none", total_epsilon=0.0,
    )  # fmt: skip
    if extra is not None:
        name, mechanism, *claimed = extra
        eps = claimed[0] if claimed else 0.0
        ledger.append(
            signers[name], KIND_REWARD_RELEASE, mechanism=mechanism, epsilon=eps, delta=DELTA,
            accountant="none", total_epsilon=eps,
        )  # fmt: skip
    return ledger.path


def invoke(*args: str):
    result = runner.invoke(audit_app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a test failure
    return result


def test_unbounded_epsilon_is_what_clients_log():
    assert UNBOUNDED_EPSILON == sys.float_info.max


def test_verify_honest_ledger_then_tampering_names_the_line(tmp_path, claims):
    path = build(tmp_path, claims)
    result = invoke("verify", path)  # keys default to LEDGER's dir / keys
    assert result.exit_code == 3, result.output  # verified, but nothing anchors it
    assert "OK" in result.output and "5 entries" in result.output and "UNANCHORED lines 1-5" in result.output
    head = result.output.split("head ")[1].split()[0]
    result = invoke("verify", path, "--head", head)
    assert result.exit_code == 0 and "UNANCHORED" not in result.output, result.output

    lines = path.read_bytes().split(b"\n")
    at = lines[1].index(b'"time":') + len(b'"time":') + 1  # second digit: stays valid JSON
    lines[1] = lines[1][:at] + bytes([lines[1][at] ^ 1]) + lines[1][at + 1 :]  # flip a bit of a digit
    path.write_bytes(b"\n".join(lines))
    result = invoke("verify", path, "--keys", tmp_path / "keys")
    assert result.exit_code == 1
    assert "line 2" in result.output and "signature" in result.output


def test_verify_detects_truncation_with_head_and_missing_keys(tmp_path, claims):
    path = build(tmp_path, claims)
    head = invoke("verify", path).output.split("head ")[1].split()[0]
    assert invoke("verify", path, "--head", head).exit_code == 0
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    result = invoke("verify", path, "--head", head)
    assert result.exit_code == 1 and "line 5" in result.output and "truncated" in result.output
    result = invoke("verify", path, "--keys", tmp_path / "nowhere")
    assert result.exit_code == 1 and "no key directory" in result.output


def _results(tmp_path: Path, ledger: Ledger, rounds: int = 2) -> None:
    head = ledger.head()
    record = {"entries": head.entries, "head": head.head if head.entries else None}
    (tmp_path / "align" / "mor").mkdir(parents=True, exist_ok=True)
    (tmp_path / "align" / "mor" / "results.json").write_text(
        json.dumps({"ledger": record, "grpo": {"rounds": rounds, "skipped_rounds": 0}, "router": None})
    )


def test_verify_is_anchored_by_the_runs_results_and_catches_a_party_rewriting_its_last_entry(tmp_path, claims):
    path = build(tmp_path, claims)
    _results(tmp_path, Ledger(path))
    result = invoke("verify", path)
    assert result.exit_code == 0 and "UNANCHORED" not in result.output, result.output
    # the server owns the last line: it re-signs it with another delta; the chain and its signature hold
    lines = path.read_bytes().split(b"\n")[:-1]
    last = json.loads(lines[-1])
    last["delta"] = 0.0
    key = load_signer("server", tmp_path / "keys")
    last["signature"] = key.sign(signed_part(last)).hex()
    path.write_bytes(b"\n".join([*lines[:-1], canonical_json(last)]) + b"\n")
    assert verify_ledger(path, read_registry(tmp_path / "keys")).ok  # without an anchor it would pass
    result = invoke("verify", path)
    assert result.exit_code == 1 and "line 5 is not the anchored head" in result.output, result.output
    # more lines than results.json records: those are unanchored, and said so
    path.write_bytes(b"\n".join(lines) + b"\n")
    Ledger(path).append(key, KIND_REWARD_RELEASE, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
                        accountant="none", total_epsilon=0.0)  # fmt: skip
    result = invoke("verify", path)
    assert result.exit_code == 3 and "UNANCHORED lines 6-6" in result.output, result.output


def test_an_empty_ledger_of_a_run_that_released_fails(tmp_path, claims):
    path = build(tmp_path, claims)
    _results(tmp_path, Ledger(path))
    path.write_bytes(b"")
    result = invoke("verify", path)
    assert result.exit_code == 1 and "line 5 is not the anchored head" in result.output, result.output
    _results(tmp_path, Ledger(path))  # a results.json that reports rounds but records no head
    result = invoke("verify", path)
    assert result.exit_code == 1 and "reports releases but records no ledger head" in result.output, result.output


def test_an_emptied_ledger_with_no_anchor_at_all_is_unanchored(tmp_path, claims):
    """With neither --head nor a results.json head, an emptied ledger looks like an honest empty one."""
    path = build(tmp_path, claims)
    path.write_bytes(b"")
    result = invoke("verify", path)
    assert result.exit_code == 3 and "0 entries" in result.output and "UNANCHORED" in result.output, result.output
    result = invoke("verify", path, "--head", "0" * 64)  # an auditor's record of an empty ledger
    assert result.exit_code == 0 and "UNANCHORED" not in result.output, result.output


def test_a_5000_digit_integer_is_a_clean_failure(tmp_path, claims):
    """Python refuses to parse integers of more than 4,300 digits (ValueError): a failure, never a traceback."""
    path = build(tmp_path, claims)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"seq":1', b'"seq":' + b"9" * 5000)
    path.write_bytes(b"\n".join(lines))
    result = invoke("verify", path)
    assert result.exit_code == 1 and "line 2" in result.output and "not valid JSON" in result.output, result.output
    result = invoke("recompute", path)
    assert result.exit_code == 1 and "line 2" in result.output, result.output


def test_recompute_honest_ledger_agrees(tmp_path, claims):
    path = build(tmp_path, claims)
    result = invoke("recompute", path)
    assert result.exit_code == 0, result.output
    assert "client-0" in result.output and "client-1" in result.output and "inf" in result.output

    report = recompute(Ledger(path).entries())
    assert report.ok, report.problems
    c0_second, prv, non_private, noop = report.entries[1:]
    assert c0_second.pld <= c0_second.rdp and c0_second.recomputed == c0_second.pld
    assert prv.claimed == pytest.approx(prv.pld, abs=0.05)  # PRV matches PLD
    assert math.isinf(non_private.recomputed) and math.isinf(non_private.claimed)
    assert noop.recomputed == 0.0
    parties = {p.party: p for p in report.parties}
    assert parties["client-0"].total == pytest.approx(claims["c0_total"][1], abs=0.01)
    assert claims["c0"][1] < parties["client-0"].total < sum(claims["c0"])
    assert math.isinf(parties["client-9"].total) and math.isinf(parties["client-9"].budget_epsilon)
    assert parties["server"].budget_epsilon is None


def test_recompute_flags_a_validly_signed_but_wrong_claim(tmp_path, claims):
    path = build(tmp_path, claims, doctor=claims["c0"][1] / 2)  # under-report line 2
    assert "OK" in invoke("verify", path).output  # the signatures are fine...
    result = invoke("recompute", path)  # ...the arithmetic is not
    assert result.exit_code == 1
    assert "line 2 (client-0): under-claimed" in result.output

    report = recompute(Ledger(path).entries())
    assert [e.line for e in report.entries if not e.ok] == [2]


def test_recompute_flags_a_budget_overrun(tmp_path, claims):
    path = build(tmp_path, claims, budget=1.0)  # honest claims, but client-0 spent ~5 of 1
    result = invoke("recompute", path)
    assert result.exit_code == 1
    assert "client-0: over budget" in result.output
    assert [p.party for p in recompute(Ledger(path).entries()).parties if not p.ok] == ["client-0"]


def test_a_non_private_run_under_a_finite_budget_is_over_budget(tmp_path, claims):
    path = build(tmp_path, claims, extra=("client-0", non_private_event(), UNBOUNDED_EPSILON))  # honest claims
    report = recompute(Ledger(path).entries())
    (bad,) = [p for p in report.parties if not p.ok]
    assert bad.party == "client-0" and bad.status == "over budget" and math.isinf(bad.total)


@pytest.mark.parametrize(
    "mechanism",
    [
        {"module_name": "os", "class_name": "system", "command": "echo pwned"},
        {"module_name": "dp_accounting.dp_event", "class_name": "Evil"},
        {"module_name": "dp_accounting.dp_event", "class_name": "GaussianDpEvent", "noise_multiplier": "1.0"},
        {"module_name": "dp_accounting.dp_event", "class_name": "GaussianDpEvent"},
        {"module_name": "dp_accounting.dp_event", "class_name": "GaussianDpEvent", "noise_multiplier": 1, "x": 2},
        {"module_name": "dp_accounting.dp_event", "class_name": "SelfComposedDpEvent", "event": 3, "count": 2},
        {"module_name": "dp_accounting.dp_event", "class_name": "ComposedDpEvent", "events": "abc"},
    ],
)
def test_malformed_mechanism_is_a_clean_error(tmp_path, claims, mechanism):
    with pytest.raises(RecomputeError):
        event_from_json(mechanism)
    path = build(tmp_path, claims, extra=("server", mechanism))
    result = invoke("recompute", path)
    assert result.exit_code == 1
    assert "line 6" in result.output and "malformed" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["GaussianDpEvent", [1, 2], None, 3.0])
def test_non_object_mechanism_is_refused(value):
    with pytest.raises(RecomputeError, match="expected a DpEvent object"):
        event_from_json(value)


def test_event_from_json_round_trips_nested_events():
    event = event_from_json(
        {
            "module_name": "dp_accounting.dp_event",
            "class_name": "ComposedDpEvent",
            "events": [dp_sgd_event(1.0, 0.1, 10), no_privacy_cost_event()],
        }
    )
    assert event == dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 10),
            dp_event.NoOpDpEvent(),
        ]
    )


def test_delta_zero_is_pure_dp(tmp_path, claims):
    """The key authority logs its post-processing releases at delta 0 (real ledgers do): they
    recompute to 0; a Gaussian claimed at delta 0 recomputes to inf and is flagged."""
    signer = Signer.generate("authority")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(
        signer,
        KIND_REWARD_RELEASE,
        mechanism=no_privacy_cost_event(),
        epsilon=0.0,
        delta=0.0,
        accountant="none (post-processing)",
        total_epsilon=0.0,
    )
    report = recompute(ledger.entries())
    assert report.ok, report.problems
    ledger.append(
        signer,
        KIND_REWARD_RELEASE,
        mechanism=dp_sgd_event(*PRV_RUN),
        epsilon=1.0,
        delta=0.0,
        accountant="rdp",
        total_epsilon=1.0,
    )
    (bad,) = [e for e in recompute(ledger.entries()).entries if not e.ok]
    assert bad.line == 2 and bad.status == "under-claimed" and math.isinf(bad.recomputed)

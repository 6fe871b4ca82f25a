"""Budget, composition and the ledger: reported epsilons agree with an independent
accountant (dp-accounting) on the logged mechanism, over-budget runs are refused
before anything is written, ledger entries are signed and verifiable."""

from __future__ import annotations

import hashlib
import json
import math
import stat
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import dp_event
from opacus.accountants.rdp import RDPAccountant

from secure_mor.audits.verify import verify_ledger
from secure_mor.clients.client import UNBOUNDED_EPSILON, ClientConfig, RewardClient, train_client
from secure_mor.clients.training import PRIVACY_UNIT, BudgetExceeded, TrainConfig
from secure_mor.crypto.signing import SignatureError, canonical_json, load_signer, read_registry
from secure_mor.data import SplitConfig, build_federated_data
from secure_mor.ledger import KIND_DP_TRAINING, Ledger

torch.set_num_threads(1)
DELTA = 1e-5
# Tiny runs: the accounting does not depend on how well the model learns. RDP
# calibrates in well under a second; Opacus' PRV takes seconds (tested once).
TINY = {"epochs": 2, "batch_size": 8, "delta": DELTA}
FAST = {**TINY, "accountant": "rdp"}


@pytest.fixture(scope="module")
def pairs():
    data = build_federated_data(SplitConfig(pairs_per_client=64, eval_per_family=10, calibration_pairs=30))
    return data.clients[0]


def _config(budget: float = 8.0, arch: str = "minilm-head") -> ClientConfig:
    return ClientConfig(client_id=0, arch=arch, family="color", style="word", budget_epsilon=budget, budget_delta=DELTA)


def to_dp_event(state):
    """dp-accounting's named-tuple JSON form (the ledger's mechanism) -> a DpEvent."""
    if isinstance(state, dict) and "class_name" in state:
        fields = {k: to_dp_event(v) for k, v in state.items() if k not in ("module_name", "class_name")}
        return getattr(dp_event, state["class_name"])(**fields)
    return state


def pld_epsilon(events, delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_event.ComposedDpEvent([to_dp_event(e) for e in events]))
    return accountant.get_epsilon(delta)


def rdp_epsilon(events, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    accountant.compose(dp_event.ComposedDpEvent([to_dp_event(e) for e in events]))
    return accountant.get_epsilon(delta)


def _snapshot(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_prv_epsilon_matches_an_independent_pld_accountant(tmp_path, pairs):
    client, result = train_client(tmp_path, _config(), pairs, TrainConfig(epsilon=2.0, **TINY))
    (entry,) = Ledger(tmp_path / "ledger.jsonl").entries()
    assert entry["kind"] == KIND_DP_TRAINING and entry["accountant"] == "prv"
    assert entry["epsilon"] == pytest.approx(pld_epsilon([entry["mechanism"]], entry["delta"]), abs=0.05)
    assert entry["epsilon"] <= 2.0 + 0.01  # calibrated to the request
    assert entry["total_epsilon"] == pytest.approx(entry["epsilon"], abs=0.02)  # the first run
    assert entry["budget"] == {"epsilon": 8.0, "delta": DELTA}
    assert entry["details"]["privacy_unit"] == PRIVACY_UNIT
    assert entry["details"]["annotations"] == len(pairs)


def test_runs_compose_and_match_dp_accounting_rdp(tmp_path, pairs):
    client, first = train_client(tmp_path, _config(), pairs, TrainConfig(epsilon=2.0, **FAST))
    client, second = train_client(tmp_path, _config(), pairs, TrainConfig(epsilon=1.5, **FAST))
    entries = Ledger(tmp_path / "ledger.jsonl").entries()
    assert [e["accountant"] for e in entries] == ["rdp", "rdp"]
    for entry in entries:
        assert entry["epsilon"] == pytest.approx(rdp_epsilon([entry["mechanism"]], DELTA), abs=0.05)
    total = rdp_epsilon([e["mechanism"] for e in entries], DELTA)
    assert entries[1]["total_epsilon"] == pytest.approx(total, abs=0.05)
    assert entries[1]["total_epsilon"] == pytest.approx(second.total_epsilon)
    assert max(first.epsilon, second.epsilon) < second.total_epsilon < first.epsilon + second.epsilon
    # The composition state is persisted next to the model and read back.
    history = json.loads((client.directory / "privacy.json").read_text())["history"]
    assert [tuple(h) for h in history] == [first.mechanism, second.mechanism]
    assert RewardClient.load(tmp_path, 0).privacy.history == [first.mechanism, second.mechanism]


def test_request_over_the_budget_is_refused_and_nothing_is_written(tmp_path, pairs):
    # A fresh client: the run alone exceeds the budget.
    with pytest.raises(BudgetExceeded, match="over the budget"):
        train_client(tmp_path, _config(budget=1.0), pairs, TrainConfig(epsilon=2.0, **FAST))
    assert not any(tmp_path.iterdir())

    # After spending 1.5 of 2.0, another 1.5 fits by itself but not once composed.
    client, _ = train_client(tmp_path, _config(budget=2.0), pairs, TrainConfig(epsilon=1.5, **FAST))
    before = _snapshot(tmp_path)
    weights = {k: v.clone() for k, v in client.model.state_dict().items()}
    with pytest.raises(BudgetExceeded, match="total epsilon"):
        client.train(pairs, TrainConfig(epsilon=1.5, **FAST))
    assert _snapshot(tmp_path) == before  # no model, state, key or ledger change
    assert all(torch.equal(v, client.model.state_dict()[k]) for k, v in weights.items())
    assert len(Ledger(tmp_path / "ledger.jsonl").entries()) == 1


def test_ledger_entries_verify_and_tampering_is_detected(tmp_path, pairs):
    client, _ = train_client(tmp_path, _config(), pairs, TrainConfig(epsilon=2.0, **FAST))
    ledger = tmp_path / "ledger.jsonl"
    registry = read_registry(tmp_path / "keys")
    assert set(registry) == {"client-0"}
    assert verify_ledger(ledger, registry).ok

    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["epsilon"] = 0.5  # under-report the spend
    ledger.write_text(canonical_json(entry).decode() + "\n")
    result = verify_ledger(ledger, registry)
    assert not result.ok and "signature" in result.reason


def test_signing_key_is_private_and_can_be_passphrase_protected(tmp_path, pairs):
    client, _ = train_client(tmp_path, _config(), pairs, TrainConfig(epsilon=2.0, **FAST), passphrase="s3cret")
    key = client.directory / "keys" / "client-0.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED" in key.read_bytes()
    with pytest.raises(SignatureError):
        load_signer("client-0", key.parent, passphrase="wrong")
    assert (tmp_path / "keys" / "client-0.pub").read_text().strip() == client.signer("s3cret").public_key_hex


def test_non_private_run_has_a_serializable_ledger_entry(tmp_path, pairs):
    # Non-private training contradicts a finite budget...
    with pytest.raises(BudgetExceeded):
        train_client(tmp_path, _config(budget=8.0), pairs, TrainConfig(epsilon=math.inf, **FAST))
    assert not any(tmp_path.iterdir())
    # ...and is allowed for an ablation client whose budget is unbounded.
    client, result = train_client(tmp_path, _config(budget=math.inf), pairs, TrainConfig(epsilon=math.inf, **FAST))
    assert result.mechanism is None and result.epsilon == math.inf
    (entry,) = Ledger(tmp_path / "ledger.jsonl").entries()
    assert entry["mechanism"]["class_name"] == "NonPrivateDpEvent"
    assert entry["epsilon"] == entry["total_epsilon"] == UNBOUNDED_EPSILON
    assert entry["details"]["non_private"] is True
    assert verify_ledger(tmp_path / "ledger.jsonl", read_registry(tmp_path / "keys")).ok
    assert math.isinf(pld_epsilon([entry["mechanism"]], DELTA))
    reloaded = RewardClient.load(tmp_path, 0)
    assert reloaded.privacy.non_private and reloaded.privacy.budget.epsilon == math.inf

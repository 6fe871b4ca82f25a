"""What a SuperNode's node config points a node at: a client's own preference data (`data-dir`)
and the signing key the institution made beforehand, encrypted (`key-dir`), never one the node
makes itself; the registry (`registry`, `ca-cert`) whose authority key a client verifies the
relayed CKKS context with; and where the key authority's passphrase may not be: beside its key."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from secure_mor.authority.node import AuthorityNode
from secure_mor.clients.node import ClientNode
from secure_mor.config import DataSpec
from secure_mor.crypto.context import create_secret_context, public_context_of, sign_public_context
from secure_mor.crypto.pki import init_pki, party_keys, register_party
from secure_mor.crypto.signing import (
    KEY_PASSPHRASE_ENV,
    SECRETS_DIR_ENV,
    SignatureError,
    Signer,
    load_signer,
    publish_public_key,
    save_signer,
)
from secure_mor.data import DatasetError, directory_digest, load_annotations, save_annotations
from secure_mor.protocol import ProtocolError


@pytest.fixture(scope="module")
def data():
    return DataSpec.of_run(num_clients=3, seed=0, pairs_per_client=40, calibration_pairs=60).load()


def _signed_setup(authority: Signer, spec: DataSpec) -> dict:
    """A client's setup: a public context signed by `authority` (what the server relays)."""
    pub = public_context_of(create_secret_context())
    signature = sign_public_context(authority, pub)
    return {"context": pub.data, "fingerprint": pub.fingerprint, "context_signature": signature,
            "data_spec": json.dumps(spec.to_json())}  # fmt: skip


def _set_up(node: ClientNode, spec: DataSpec) -> None:
    authority = Signer.generate("authority")
    publish_public_key(authority, node.state_dir / "keys")  # the simulation's registry: what the parties publish
    node.setup(_signed_setup(authority, spec))


def test_a_client_node_trains_on_its_data_dir_and_signs_with_its_key_dir(tmp_path, data, monkeypatch):
    spec = DataSpec.of_run(num_clients=3, seed=0, pairs_per_client=40, calibration_pairs=60)
    own = data.clients[1].select(range(24))  # not the split's share: the node must read its own
    save_annotations(own, tmp_path / "data")
    party_keys(tmp_path / "keys", "client-1", "its own passphrase")  # the institution makes its keys
    signer = load_signer("client-1", tmp_path / "keys", "its own passphrase")
    node = ClientNode(tmp_path / "state", 1, data_dir=tmp_path / "data", key_dir=tmp_path / "keys")
    with pytest.raises(ProtocolError, match="encrypted: set SECURE_MOR_KEY_PASSPHRASE"):
        node.identify({})
    monkeypatch.setenv(KEY_PASSPHRASE_ENV, "its own passphrase")

    assert node.identify({})["public_key"] == signer.public_key_hex
    _set_up(node, spec)
    reply = node.train({"epsilon": 4.0, "delta": 1e-5, "epochs": 1})
    stored = json.loads((tmp_path / "state" / "clients" / "client-1" / "client.json").read_text())
    assert stored["split"] == {"private_data_sha256": directory_digest(tmp_path / "data"), "annotations": 24}
    ledger = [json.loads(line) for line in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["details"]["annotations"] == 24 and ledger[-1]["party"] == "client-1"
    assert ledger[-1]["public_key"] == signer.public_key_hex
    assert not (tmp_path / "state" / "clients" / "client-1" / "keys").exists()  # no key of its own making
    assert reply["total_epsilon"] <= 4.0


def test_a_missing_or_unencrypted_key_or_bad_data_is_refused_before_any_work(tmp_path, data, monkeypatch):
    node = ClientNode(tmp_path / "state", 0, key_dir=tmp_path / "no-keys")
    with pytest.raises(ProtocolError, match="no signing key client-0.key in key-dir"):
        node.identify({})
    assert not (tmp_path / "no-keys").exists()
    authority = AuthorityNode(tmp_path / "authority", key_dir=tmp_path / "no-keys")
    with pytest.raises(ProtocolError, match="no signing key authority.key in key-dir"):
        authority.handle("identify", {})
    save_signer(Signer.generate("client-0"), tmp_path / "plain")  # a key-dir's key must be encrypted
    monkeypatch.setenv(KEY_PASSPHRASE_ENV, "a passphrase")
    with pytest.raises(SignatureError, match="wrong passphrase or damaged key"):
        ClientNode(tmp_path / "state", 0, key_dir=tmp_path / "plain").identify({})

    with pytest.raises(DatasetError, match="no annotation data"):
        load_annotations(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="missing"):
        save_annotations(data.clients[0].remove_columns("chosen_text"), tmp_path / "bad")
    data.clients[0].remove_columns("rejected_texts").save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DatasetError, match=r"missing \['rejected_texts'\]"):
        load_annotations(tmp_path / "bad")
    empty = data.clients[0].select(range(3)).map(lambda row, i: {"rejected_texts": [] if i == 1 else
                                                                 row["rejected_texts"]}, with_indices=True)
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="row 1 ranks no answer"):
        load_annotations(tmp_path / "empty")


def test_an_operators_registry_is_never_read_without_its_ca(tmp_path):
    with pytest.raises(ProtocolError, match="needs the operator's CA certificate"):
        AuthorityNode(tmp_path / "state", registry=tmp_path / "registry")


def test_a_deployed_client_takes_only_the_context_its_registrys_authority_signed(tmp_path, monkeypatch):
    """In a deployment a client reads the key authority's payload key from the operator's registry
    (node config `registry`, its entries signed by the CA `ca-cert`), never from the server: the
    authority's context is taken, one signed by another key or under a registry entry the CA did
    not sign is refused and not stored."""
    spec = DataSpec.of_run(num_clients=3, seed=0, pairs_per_client=40, calibration_pairs=60)
    pki = init_pki(tmp_path / "pki")
    for party in ("authority", "server"):  # each makes its keys where it runs; the operator registers them
        party_keys(tmp_path / party, party, "a passphrase", supernode=party != "server")
        register_party(pki.directory, party, tmp_path / party)
    monkeypatch.setenv(KEY_PASSPHRASE_ENV, "a passphrase")
    setup = AuthorityNode(tmp_path / "authority-state", registry=pki.registry, ca_cert=pki.ca_cert,
                          key_dir=tmp_path / "authority").handle("setup", {})  # fmt: skip
    relayed = {**{k: setup[k] for k in ("context", "fingerprint", "context_signature")},
               "data_spec": json.dumps(spec.to_json())}  # fmt: skip
    with pytest.raises(ProtocolError, match="needs the operator's CA certificate"):
        ClientNode(tmp_path / "client", 0, registry=pki.registry)
    stranger = Signer.generate("authority")
    forged = tmp_path / "forged-registry"  # the authority's entry replaced, the CA's signature kept
    shutil.copytree(pki.registry, forged)
    publish_public_key(stranger, forged)
    for registry, why in ((pki.registry, "not signed by the key authority"),
                          (forged, "registry entry 'authority' .* is not signed by the operator's CA")):  # fmt: skip
        node = ClientNode(tmp_path / "client", 0, registry=registry, ca_cert=pki.ca_cert)
        with pytest.raises(ProtocolError, match=why):
            node.setup(_signed_setup(stranger, spec))
        assert not (tmp_path / "client").exists()  # nothing stored
    node = ClientNode(tmp_path / "client", 0, registry=pki.registry, ca_cert=pki.ca_cert)
    node.setup(relayed)
    assert node._public_context().fingerprint == setup["fingerprint"]


def test_each_authority_directory_is_a_context_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "secrets"))
    state = tmp_path / "state"
    publish_public_key(Signer.generate("server"), state / "keys")
    first = AuthorityNode(state, authority_dir=state / "fusion-a").handle("setup", {})
    second = AuthorityNode(state, authority_dir=state / "fusion-b").handle("setup", {})
    assert first["fingerprint"] != second["fingerprint"] and first["k_min"] == 2
    assert (state / "fusion-a" / "secret.key").exists() and not (state / "authority" / "secret.key").exists()
    assert not (state / "fusion-a" / "keys").exists() and (state / "authority" / "keys" / "authority.key").exists()
    assert (
        AuthorityNode(state, authority_dir=state / "fusion-a").handle("setup", {})["fingerprint"]
        == first["fingerprint"]
    )


def test_the_authoritys_passphrase_is_never_beside_its_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SECURE_MOR_AUTHORITY_PASSPHRASE", raising=False)
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "secrets"))
    state = tmp_path / "state"
    authority = AuthorityNode(state)
    publish_public_key(Signer.generate("server"), state / "keys")
    authority.handle("setup", {})
    assert (state / "authority" / "secret.key").exists()
    stored = list((tmp_path / "secrets").iterdir())
    assert len(stored) == 1 and stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    assert not any(p.name.endswith("passphrase") for p in state.rglob("*"))  # nothing beside the key
    fingerprint = AuthorityNode(state).handle("setup", {})["fingerprint"]  # a restart opens it again
    assert [p.name for p in stored] == [f"authority-{fingerprint[:32]}.passphrase"]  # named by its context
    moved = tmp_path / "moved"  # ... not by the state directory's path: a moved state still opens
    state.rename(moved)
    assert AuthorityNode(moved).handle("setup", {})["fingerprint"] == fingerprint
    moved.rename(state)
    for inside in (state / "secrets", state / "authority" / "secrets"):  # a secrets directory inside the state
        monkeypatch.setenv(SECRETS_DIR_ENV, str(inside))
        with pytest.raises(ProtocolError, match="lies inside"):
            AuthorityNode(state, authority_dir=state / "authority").authority()
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "secrets"))
    (state / "authority" / "passphrase").write_text("the old layout")
    with pytest.raises(ProtocolError, match="lies beside the key it protects"):
        AuthorityNode(state).authority()

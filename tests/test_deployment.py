"""Secure MoR on Flower's deployment runtime, as real processes on 127.0.0.1 (docs/deployment.md).

A SuperLink with TLS and SuperNode authentication, a SuperNode per client institution and
one for the key authority, each in a directory of its own, and `flwr run`. The default suite
runs the PKI, the refusals of strangers (no full run) and one tiny secure alignment end to
end in which client SuperNodes are lost; the faults that each need a full run of their own
are marked slow.
"""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest

from secure_mor.audits.verify import verify_ledger
from secure_mor.crypto.pki import AUTH_KEY, PkiError, init_pki, party_keys, read_registry_signed, register_party
from secure_mor.crypto.signing import Signer, load_signer, publish_public_key, read_registry, save_signer
from secure_mor.data import directory_digest
from secure_mor.deployment import TINY_RUN, LocalDeployment
from secure_mor.federation import FederationError
from secure_mor.ledger import KIND_REWARD_RELEASE, KIND_STEP_SKIPPED, Ledger
from secure_mor.server.pipeline import AlignError, trusted_keys


def _processes_of(root: Path, command: str = "") -> list[int]:
    """Live processes started by the deployment under `root` (they inherit its FLWR_HOME),
    those whose command line holds `command` if given."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get("FLWR_HOME", "").startswith(str(root)) and command in " ".join(process.cmdline()):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _results(deployment: LocalDeployment) -> dict:
    return json.loads((deployment.run_dir / "align" / "mor" / "results.json").read_text())


def _wait_for_grpo_step(deployment: LocalDeployment, step: int, timeout: float = 1800.0) -> None:
    """Block until the ServerApp reports GRPO step `step` done (its progress file, on the server's disk)."""
    progress = deployment.run_dir / "align" / "mor" / "progress.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("stage") == "GRPO" and state.get("done", 0) >= step:
            return
        time.sleep(1.0)
    raise TimeoutError(f"GRPO step {step} not reached after {timeout:.0f} s")


def test_each_party_makes_its_keys_and_the_operator_sees_only_public_halves(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    pki = init_pki(tmp_path / "pki", hosts=("link.example.org", "127.0.0.1"))
    party = tmp_path / "client-0" / "keys"  # on the institution's machine
    public = party_keys(party, "client-0", "its passphrase")
    register_party(pki.directory, "client-0", party)
    cert = x509.load_pem_x509_certificate(pki.superlink_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    assert try_load_public_key(pki.auth_public_key("client-0"))  # what `flwr supernode register` reads
    assert load_ssh_private_key((party / AUTH_KEY).read_bytes(), None).curve.name == "secp384r1"
    for key in (pki.ca_key, pki.superlink_key, party / AUTH_KEY, party / "client-0.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert party.stat().st_mode & 0o777 == 0o700 and b"ENCRYPTED" in (party / "client-0.key").read_bytes()
    assert sorted(p.name for p in public) == ["client-0.pub", "supernode-auth.pub"]
    # the operator holds no private key of the party
    held = {p.name for p in pki.directory.rglob("*") if p.is_file()}
    assert "client-0.key" not in held and AUTH_KEY not in held
    signed = read_registry_signed(pki.registry, pki.ca_cert)
    assert signed["client-0"] == load_signer("client-0", party, "its passphrase").public_key_hex
    with pytest.raises(PkiError):
        init_pki(pki.directory)
    with pytest.raises(PkiError):
        party_keys(party, "client-0", "again")
    with pytest.raises(PkiError, match="registered already"):
        register_party(pki.directory, "client-0", party)
    # a key slipped into the registry without the CA's signature is not trusted
    publish_public_key(Signer.generate("client-1"), pki.registry)
    with pytest.raises(PkiError, match="'client-1' .* not signed by the operator's CA"):
        read_registry_signed(pki.registry, pki.ca_cert)


def test_the_server_trusts_only_the_registry_keys(tmp_path):
    pki = init_pki(tmp_path / "pki")
    party_keys(tmp_path / "client-0", "client-0", "its passphrase")
    register_party(pki.directory, "client-0", tmp_path / "client-0")
    keys = read_registry(pki.registry)
    assert trusted_keys(pki.registry, ["client-0"], keys, pki.ca_cert) == keys
    with pytest.raises(AlignError, match="presents a key"):
        trusted_keys(pki.registry, ["client-0"], {"client-0": Signer.generate("client-0").public_key_hex})
    with pytest.raises(AlignError, match="not in the registry"):
        trusted_keys(pki.registry, ["client-0", "client-1"], {**keys, "client-1": "00"})
    (pki.registry / "client-0.pub").write_text(Signer.generate("client-0").public_key_hex)  # swapped by someone
    with pytest.raises(AlignError, match="refused by the key registry: .*not signed"):
        trusted_keys(pki.registry, ["client-0"], keys, pki.ca_cert)


def test_the_superlink_refuses_unregistered_nodes_and_plaintext(tmp_path):
    deployment = LocalDeployment(tmp_path, num_clients=1)
    try:
        deployment.prepare()
        deployment.start_superlink()
        party_keys(tmp_path / "stranger", "stranger", "x")  # a well-formed key the operator never registered
        stranger = deployment.start_node("client-0", auth_key=tmp_path / "stranger" / AUTH_KEY, max_retries=2)
        plaintext = deployment.start_node("authority", authenticate=False, tls=False, max_retries=2)
        assert stranger.wait(timeout=120) != 0 and plaintext.wait(timeout=120) != 0
        assert "No SuperNode found with the given public key" in deployment.log("superlink")
        assert deployment.online_nodes() == 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port
            urllib.request.urlopen(f"http://{deployment.address}/", timeout=10)
    finally:
        deployment.stop()
    assert not _processes_of(tmp_path)


def test_stop_also_ends_the_deployments_orphans(tmp_path):
    """What a dead SuperNode left behind (its SuperExec, once the SuperLink refused it) is stopped too."""
    deployment = LocalDeployment(tmp_path, num_clients=1)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "client-0" / "flwr-home")}
    subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 &"], env=env, check=True)  # the shell exits: an orphan
    # the orphan may still be mid-exec when the shell returns (its /proc entry then shows no command
    # line or environment: CI once saw none), so wait until it is the sleep it will be
    deadline = time.monotonic() + 30.0
    while not _processes_of(tmp_path, "sleep 600") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_of(tmp_path, "sleep 600")
    deployment.stop()
    assert not _processes_of(tmp_path)


@pytest.mark.timeout(3600)  # a fresh ClientApp process per message: minutes on a busy 2-core runner
def test_secure_alignment_on_the_deployment_runtime_survives_lost_client_nodes_and_leaves_no_process(tmp_path):
    """One tiny run: 3 clients (K_min 2) and the authority; client-2's SuperNode is killed after
    GRPO step 1 (the run goes on with the other two), client-1's after step 2 (too few: the
    round is skipped, in the ledger), and the run still finishes."""
    deployment = LocalDeployment(tmp_path, num_clients=3, k_min=2)
    try:
        deployment.start()
        # no answer-prior rounds: the nodes are lost at chosen GRPO steps
        # a lost node costs its round the whole reply timeout (the grid has no answer to give): 60 s is
        # 3x what a live node's fresh ClientApp process took to score on a busy 2-core runner
        run_id = deployment.submit({**TINY_RUN, "grpo-max-steps": 3, "reply-timeout": 60.0, "router-steps": 1,
                                    "answer-prior-questions": 0})
        _wait_for_grpo_step(deployment, 1)
        deployment.stop_node("client-2")
        _wait_for_grpo_step(deployment, 2)
        deployment.stop_node("client-1")
        result = deployment.wait(run_id, timeout=2400)
    finally:
        deployment.stop()
    assert not _processes_of(tmp_path)
    assert result.status == "finished:completed", result.logs[-4000:]

    results = _results(deployment)
    assert results["config"]["registry"] == str(deployment.registry("server"))
    assert results["grpo"]["steps"] == 3 and results["grpo"]["rounds"] == 3 and results["router"]["steps"] == 1
    assert {c["arch"] for c in results["clients"].values()} == {"cnn-gru", "vit-xattn", "minilm-head"}
    # each institution kept its state on its own disk, and only there; no passphrase beside a key
    assert (deployment.state_dir("authority") / "authority" / "secret.key").exists()
    assert not [p for p in tmp_path.rglob("*passphrase*") if "secrets" not in p.parts]
    assert not [p for p in deployment.pki.directory.rglob("*.key") if p.name not in ("ca.key", "superlink.key")]
    assert not (deployment.run_dir / "authority").exists() and not (deployment.run_dir / "clients").exists()
    for k in range(3):
        own = deployment.state_dir(f"client-{k}") / "clients" / f"client-{k}"
        assert (own / "node.json").exists()
        # trained on the pairs in its node config's data-dir, signing with the key in its key-dir
        split = json.loads((own / "client.json").read_text())["split"]
        assert split["private_data_sha256"] == directory_digest(deployment.data_dir(f"client-{k}"))
        assert not (own / "keys").exists()
    # every party's ledger verifies against the operator's registry
    registry = read_registry(deployment.pki.registry)
    for party in ("client-0", "client-1", "client-2", "authority"):
        check = verify_ledger(deployment.state_dir(party) / "ledger.jsonl", registry)
        assert check.ok, (party, check)
    assert verify_ledger(deployment.run_dir / "ledger.jsonl", registry).ok
    # the authority released the scoring rounds the clients could make: all three, then the others
    releases = [
        e for e in Ledger(deployment.state_dir("authority") / "ledger.jsonl").entries()
        if e["kind"] == KIND_REWARD_RELEASE and e["details"]["run_id"] == results["run_id"]
    ]  # fmt: skip
    contributors = [e["details"]["contributors"] for e in releases]
    assert contributors[0] == ["client-0", "client-1", "client-2"]
    assert contributors[-1] == ["client-0", "client-1"]
    # the round with client-0 alone was skipped, and the server's ledger says so
    skipped = [e for e in Ledger(deployment.run_dir / "ledger.jsonl").entries() if e["kind"] == KIND_STEP_SKIPPED]
    assert results["grpo"]["skipped_rounds"] == len(skipped) >= 1
    assert skipped[-1]["details"]["present"] == ["client-0"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_payload_key_not_in_the_registry_is_refused(tmp_path):
    deployment = LocalDeployment(tmp_path, num_clients=2)
    try:
        deployment.start()
        # client-1's node signs with another key than the one the operator registered
        (deployment.key_dir("client-1") / "client-1.key").unlink()
        passphrase = deployment.secret("client-1", "signing-key")
        save_signer(Signer.generate("client-1"), deployment.key_dir("client-1"), passphrase)
        with pytest.raises(FederationError, match="refused by the key registry"):
            deployment.run(TINY_RUN, timeout=1200)
    finally:
        deployment.stop()
    assert not _processes_of(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_the_serverapp_killed_mid_grpo_resumes_without_losing_or_repeating_a_ledger_entry(tmp_path):
    deployment = LocalDeployment(tmp_path, num_clients=3)
    try:
        deployment.start()
        run_id = deployment.submit({**TINY_RUN, "grpo-max-steps": 3})
        _wait_for_grpo_step(deployment, 1)
        serverapps = _processes_of(tmp_path, "flwr-serverapp")
        assert serverapps
        for pid in serverapps:
            os.kill(pid, signal.SIGKILL)
        deployment.flwr("stop", run_id)  # the operator's part: a killed ServerApp reports nothing
        assert deployment.wait(run_id, timeout=600).status != "finished:completed"
        deployment.run({**TINY_RUN, "grpo-max-steps": 3, "resume": True}, timeout=2400)
    finally:
        deployment.stop()
    assert not _processes_of(tmp_path)
    results = _results(deployment)
    assert results["grpo"]["steps"] == 3 and results["grpo"]["resumed_from"]
    registry = read_registry(deployment.pki.registry)
    for party in ("client-0", "client-1", "client-2", "authority"):
        check = verify_ledger(deployment.state_dir(party) / "ledger.jsonl", registry)
        assert check.ok, (party, check)  # hash chain and per-party sequence numbers: nothing lost
    releases = Ledger(deployment.state_dir("authority") / "ledger.jsonl").entries()
    keys = Counter((e["details"]["run_id"], e["details"]["purpose"], e["details"]["step"]) for e in releases)
    assert max(keys.values()) == 1  # nothing released twice
    for k in range(3):  # the clients' reward models were trained once: the resumed run reused them
        assert len(Ledger(deployment.state_dir(f"client-{k}") / "ledger.jsonl").entries()) == 1

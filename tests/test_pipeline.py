"""The main job in-process (server.pipeline over LocalTransport): real client nodes, real key
authority, real CKKS; what the server receives; dropouts, late replies, K_min; resume."""

from __future__ import annotations

import io
import json
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import own_families_vqa
from PIL import Image, PngImagePlugin

from secure_mor.audits.verify import verify_ledger
from secure_mor.authority.node import AuthorityNode
from secure_mor.clients.client import ClientConfig, RewardClient
from secure_mor.clients.models import architecture
from secure_mor.clients.node import CONTEXT_FILE, NODE_FILE, ClientNode
from secure_mor.clients.text import CharTokenizer
from secure_mor.clients.training import PrivacyState
from secure_mor.config import DataSpec, RunDir
from secure_mor.crypto.blinding import MaskKey
from secure_mor.crypto.fusion import renormalise
from secure_mor.crypto.params import DEFAULT_W_MIN
from secure_mor.crypto.signing import Signer, load_or_create_signer, publish_public_key, read_registry
from secure_mor.crypto.wire import parse_reply, parse_response
from secure_mor.data import normalize_text
from secure_mor.ledger import (
    KIND_DP_TRAINING,
    KIND_REWARD_RELEASE,
    KIND_ROUTER_GRADIENT_RELEASE,
    KIND_ROUTER_SETUP,
    KIND_STEP_SKIPPED,
    Budget,
    Ledger,
)
from secure_mor.policy import SFTSettings
from secure_mor.protocol import (
    AUTHORITY_PARTY,
    SERVER_PARTY,
    ClientTrainingSettings,
    ProtocolError,
    array_bytes,
    png_bytes,
    score_request,
)
from secure_mor.routing import GradientQuery, Router, RouterQueryError, RouterSetup, encode_gradient_query
from secure_mor.server.grpo import GRPOSettings, run_grpo
from secure_mor.server.pipeline import (
    AlignConfig,
    AlignError,
    RouterInputs,
    align,
    connect,
    gated_families,
    prepare_data,
    prepare_policy,
    style_only_families,
    train_router,
)
from secure_mor.server.reward import FederatedReward, prompt_key
from secure_mor.server.router_training import RouterTrainingConfig
from secure_mor.server.secure_round import RoundRefused
from secure_mor.server.session import SecureSession
from secure_mor.server.transport import LocalTransport, payload_for

CLIENTS = ["client-0", "client-1", "client-2"]
CLIENT_ACTIONS = ("margins", "router_gradient", "score")


def tiny(fusion: str = "mor", **kw) -> AlignConfig:
    settings = {
        "fusion": fusion,
        "grpo": GRPOSettings(max_steps=2, batch_size=8, steps_per_generation=1, save_steps=1, max_completion_length=6),
        "router": RouterTrainingConfig(steps=2, batch_size=96),
        "sft": SFTSettings(examples=64, epochs=1.0, vision_epochs=1),
        "client_training": ClientTrainingSettings(epochs=2, public_epochs=1),
        "eval_per_family": 8,
        "pairs_per_client": 100,
        "calibration_pairs": 300,
        "answer_prior_questions": 0,  # the tiny_run fixture turns it on
        "validation_per_family": 4,
        **kw,
    }
    return AlignConfig(**settings)


class RecordingTransport(LocalTransport):
    """LocalTransport that keeps everything the server got back, by action."""

    def __init__(self, nodes, **kw) -> None:
        super().__init__(nodes, **kw)
        self.received: list[tuple[str, str, dict]] = []  # (party, action, reply)
        self.sent: list[dict] = []  # the payload of each received reply, same order

    def ask(self, parties, action, payloads, timeout=None):
        replies = super().ask(parties, action, payloads, timeout)
        for party, reply in replies.items():
            if isinstance(reply, dict):
                self.received.append((party, action, reply))
                self.sent.append(payload_for(payloads, party, parties))
        return replies


def nodes_of(run: Path, context: str | None = None, **authority) -> dict:
    """The nodes over `run`; `context` names an authority directory (a CKKS context) of its own."""
    authority_dir = run / f"authority-{context}" if context else None
    return {**{c: ClientNode(run, k) for k, c in enumerate(CLIENTS)},
            AUTHORITY_PARTY: AuthorityNode(run, authority_dir=authority_dir, **authority)}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("align")
    transport = RecordingTransport(nodes_of(run))
    results = align(transport, run, tiny(answer_prior_questions=3), log=lambda m: None)
    return run, transport, results


def test_tiny_alignment_writes_results_and_a_verifiable_ledger(tiny_run):
    run, _, results = tiny_run
    assert results["schema"] == "secure-mor/results/v2"
    for stage in ("sft", "aligned"):
        assert set(results["accuracy"][stage]["per_family"]) == {"color", "shape", "presence"}
    assert set(results["clients"]) == set(CLIENTS)
    for c in results["clients"].values():
        assert 0 < c["total_epsilon"] <= 4.0 and c["budget_epsilon"] == 4.0 and not c["reused"]
        assert set(c["reward_model"]) == {"top1", "image_dependence", "pairwise"}
        assert all(set(v) == {"color", "shape", "presence"} for v in c["reward_model"].values())
    assert results["config"]["w_min"] == DEFAULT_W_MIN  # the key authority's floor, announced at setup
    assert results["router"]["steps"] == 2 and results["grpo"]["steps"] == 2
    assert results["router"]["features"] == "family"  # the default route-by
    router = results["router"]["held_out_weights"]
    assert set(router) == {"correctness", "sentences"} and set(router["correctness"]) == {"color", "shape", "presence"}
    assert all(abs(sum(w) - 1) < 3e-4 for w in router["correctness"].values())  # each mean rounded to 4 places
    curve = results["grpo"]["held_out_curve"]
    assert [p["step"] for p in curve] == [0, 2] and all(0 <= p["accuracy"] <= 1 for p in curve)
    assert results["grpo"]["reward_first_quarter"] is not None
    # the answer prior: 3 questions per family (at least one per true answer), every answer in both styles
    prior = results["answer_prior"]
    assert prior["released"] == (8 * 8 + 3 * 3 + 4 * 2) * 2 and set(prior["families"]) == {"color", "shape", "presence"}
    for family in prior["families"].values():
        assert family["shrinkage"] in (0.0, 0.25, 0.5, 0.75, 1.0) and set(family["fused_top1"]) == {
            "0.0", "0.25", "0.5", "0.75", "1.0"}
        assert abs(sum(family["offsets"].values())) < 1e-9  # centred: only the preference between answers moves
        assert 0.0 <= family["policy_accuracy"] <= 1.0 and len(family["rows"]) == family["questions"]
    # GRPO trains on the gated families (every family when none passes); it keeps the step best on validation
    assert results["grpo"]["families"] == (gated_families(prior) or ["color", "shape", "presence"])
    best = curve[0]  # a later point replaces the kept one only by beating it by more than the margin
    for point in curve[1:]:
        if point["validation_score"] > best["validation_score"] + GRPOSettings().min_validation_gain:
            best = point
    assert results["grpo"]["selected"] == {"step": best["step"], "metric": "validation_score",
                                           "value": best["validation_score"]}
    assert results["grpo"]["rounds"] == 2 + 2 and results["grpo"]["skipped_rounds"] == 0  # GRPO, answer prior
    assert (run / "align" / "mor" / "grpo_log.json").exists()

    check = verify_ledger(run / "ledger.jsonl", read_registry(run / "keys"), expected_head=results["ledger"]["head"])
    assert check.ok, check
    kinds = Counter(e["kind"] for e in Ledger(run / "ledger.jsonl").entries())
    # 3 DP trainings; the router's setup; per router step one margin and one gradient release; one
    # release per answer-prior round (162 items in rounds of 128) and per GRPO round
    assert kinds == {KIND_DP_TRAINING: 3, KIND_ROUTER_SETUP: 1, KIND_ROUTER_GRADIENT_RELEASE: 2,
                     KIND_REWARD_RELEASE: 2 + 2 + 2}  # fmt: skip


def test_the_server_never_holds_a_client_plaintext_score(tiny_run):
    run, transport, _ = tiny_run
    federation = connect(transport, RunDir(run), RunDir(run).data_spec(), CLIENTS)
    seen = [(p, a, r) for p, a, r in transport.received if a in CLIENT_ACTIONS]
    assert {a for _, a, _ in seen} == set(CLIENT_ACTIONS)
    for party, action, reply in seen:
        # only a signed ciphertext, a timing, and for scores the digests of the prompts as its model read them
        assert set(reply) == {"reply", "seconds", *(["items"] if action == "score" else [])}, (action, set(reply))
        parsed = parse_reply(reply["reply"], federation.pub, federation.registry, expected=None)
        assert parsed.client_id == party
        with pytest.raises(ValueError):  # the server's context holds no secret key
            parsed.ciphertexts[0].decrypt()
    # The client's real scores of a request appear nowhere in what it sent back.
    request = score_request(*_items(run, 8))
    node = ClientNode(run, 0)
    scores = node._client().score([(i, q, a) for i, q, a in zip(*_items(run, 8), strict=True)])
    fields = {"run_id": "probe", "step": 0, "nonce": "0" * 32, "mask_key": MaskKey().public_hex}
    reply = node.handle("score", {**request, **fields})["reply"]
    for value in scores:
        assert np.float32(value).tobytes() not in reply and np.float64(value).tobytes() not in reply
    # What the key authority released to the server was masked at the source: far outside [-R, R].
    decrypted = [
        (sent["request"], reply["response"])
        for (p, a, reply), sent in zip(transport.received, transport.sent, strict=True)
        if p == AUTHORITY_PARTY and a == "decrypt"
    ]
    assert len(decrypted) == 2 + 2 + 2 + 2  # router margins, router gradients, answer prior, GRPO rounds
    for request, response in decrypted:
        assert np.max(np.abs(parse_response(response, federation.authority_key, request))) > 1e6


def _items(run: Path, n: int, offset: int = 0):
    data = RunDir(run).data_spec().load()
    rows = data.prompt_pool.select(range(offset, offset + n))
    return list(rows["image"]), list(rows["question"]), ["yes"] * n


def _session(run: Path, transport, federation, run_id: str, **kw) -> SecureSession:
    return SecureSession(
        transport=transport,
        pub=federation.pub,
        signer=load_or_create_signer(SERVER_PARTY, run / SERVER_PARTY / "keys"),
        registry={c: federation.registry[c] for c in CLIENTS},
        clients=CLIENTS,
        authority_key=federation.authority_key,
        run_id=run_id,
        state_dir=run / "sessions" / run_id,
        ledger=Ledger(run / "ledger.jsonl"),
        w_min=federation.w_min,
        **kw,
    )


def test_dropouts_late_replies_and_k_min(tiny_run):
    """Each case on prompts of its own: the authority keeps one row per prompt for its context."""
    run, _, _ = tiny_run
    nodes = nodes_of(run)
    answers = ["yes", "no", "red", "circle", "blue", "yes", "no", "green"]
    weights = np.tile([0.5, 0.3, 0.2], (8, 1))
    federation = connect(LocalTransport(nodes), RunDir(run), RunDir(run).data_spec(), CLIENTS)

    def case(offset: int):
        images, questions, _ = _items(run, 8, offset)
        scores = np.stack([nodes[c]._client().score(list(zip(images, questions, answers, strict=True)))
                           for c in CLIENTS], axis=1)  # fmt: skip
        return score_request(images, questions, answers), scores

    request, scores = case(100)
    full = _session(run, LocalTransport(nodes), federation, "dropout-full").fused_rewards(request, weights)
    np.testing.assert_allclose(full, (scores * weights).sum(axis=1), atol=1e-4)

    request, scores = case(200)
    dropped = LocalTransport(nodes, unavailable={"client-2"})
    fused = _session(run, dropped, federation, "dropout-one").fused_rewards(request, weights)
    present = renormalise(weights, [True, True, False])
    np.testing.assert_allclose(fused, (scores[:, :2] * present).sum(axis=1), atol=1e-4)

    request, scores = case(300)
    late = LocalTransport(nodes, delays={"client-0": 100.0})
    session = _session(run, late, federation, "late-one", reply_timeout=50.0)
    fused = session.fused_rewards(request, weights)
    np.testing.assert_allclose(
        fused, (scores[:, 1:] * renormalise(weights, [False, True, True])).sum(axis=1), atol=1e-4
    )

    before = len(Ledger(run / "ledger.jsonl").entries())
    alone = _session(run, LocalTransport(nodes, unavailable={"client-1", "client-2"}), federation, "below-k-min")
    assert alone.fused_rewards(case(400)[0], weights) is None and alone.timings.skipped == 1
    entries = Ledger(run / "ledger.jsonl").entries()
    assert len(entries) == before + 1
    skipped = entries[-1]
    assert skipped["kind"] == KIND_STEP_SKIPPED and skipped["party"] == SERVER_PARTY
    assert skipped["details"]["present"] == ["client-0"] and skipped["details"]["run_id"] == "below-k-min"
    assert verify_ledger(run / "ledger.jsonl", read_registry(run / "keys")).ok


def test_on_sentences_the_families_left_out_by_the_gate_get_the_style_alone(tiny_run):
    run, _, _ = tiny_run
    results = align(LocalTransport(nodes_of(run, "sentences")), run,
                    tiny(objective="sentences", answer_prior_questions=3), log=lambda m: None)
    prior = results["answer_prior"]
    assert all(set(f["style_levels"]) == {"word", "sentence"} for f in prior["families"].values())
    assert results["grpo"]["style_only"] == sorted(set(prior["families"]) - set(gated_families(prior)))
    assert results["grpo"]["families"] == ["color", "shape", "presence"]  # every family: answers or style
    assert results["grpo"]["selected"]["metric"] == "validation_score"


def test_the_key_authoritys_w_min_is_the_one_floor(tiny_run):
    run, _, _ = tiny_run
    nodes = nodes_of(run, "floor", w_min=0.05)
    federation = connect(LocalTransport(nodes), RunDir(run), RunDir(run).data_spec(), CLIENTS)
    assert federation.w_min == 0.05
    session = _session(run, LocalTransport(nodes), federation, "floor")
    request = score_request(*_items(run, 4))
    with pytest.raises(RoundRefused, match="below the floor w_min=0.05"):
        session.fused_rewards(request, np.tile([0.96, 0.02, 0.02], (4, 1)))
    assert len(session.fused_rewards(request, np.tile([0.9, 0.05, 0.05], (4, 1)))) == 4


class Crash(Exception):
    pass


def test_a_killed_alignment_resumes_without_losing_or_duplicating_ledger_entries(tiny_run):
    run, _, _ = tiny_run
    config = tiny(
        "uniform",
        grpo=GRPOSettings(max_steps=4, batch_size=8, steps_per_generation=1, save_steps=1, max_completion_length=6),
        answer_prior_questions=3,
    )
    calls = []

    def crash_on_third_round(party, action, payload):
        if action == "score" and party == "client-0":
            calls.append(payload["step"])
            if len(calls) == 2 + 3:  # after the answer prior's 2 rounds, GRPO's third
                raise Crash

    # another fusion over the same prompts: a key-authority context of its own (the mor run's rows are
    # not this fusion's)
    transport = LocalTransport(nodes_of(run, "uniform"), on_call=crash_on_third_round)
    with pytest.raises(Crash):
        align(transport, run, config, log=lambda m: None)
    with pytest.raises(Exception, match="interrupted run"):
        align(LocalTransport(nodes_of(run, "uniform")), run, config, log=lambda m: None)

    results = align(
        LocalTransport(nodes_of(run, "uniform")),
        run,
        replace(config, resume=True),
        log=lambda m: None,
    )
    assert results["grpo"]["steps"] == 4 and results["grpo"]["resumed_from"].endswith("checkpoint-2")
    assert all(c["reused"] for c in results["clients"].values())  # no second DP training, no new spending
    releases = [
        e["details"]
        for e in Ledger(run / "ledger.jsonl").entries()
        if e["kind"] == KIND_REWARD_RELEASE and e["details"]["run_id"] == results["run_id"]
    ]
    steps = [d["step"] for d in releases]
    # rounds 0, 1: the answer prior; 2, 3: GRPO; round 4 crashed before any release (its number is
    # never reused); the resumed run keeps the answer prior it measured and scores rounds 5 and 6
    assert steps == [0, 1, 2, 3, 5, 6]
    assert results["answer_prior"]["released"] == (8 * 8 + 3 * 3 + 4 * 2) * 2
    assert len({d["nonce"] for d in releases}) == len(releases)
    assert verify_ledger(run / "ledger.jsonl", read_registry(run / "keys")).ok
    assert Counter(e["kind"] for e in Ledger(run / "ledger.jsonl").entries())[KIND_DP_TRAINING] == 3


class SaysYesNode(ClientNode):
    """A client whose reward model is a rule (1 for "yes" to a yes/no question, else 0), so the
    test knows what signal the secure path must deliver. Everything else is the real node."""

    class _Rule:
        def __init__(self, node) -> None:
            self.node = node

        def score(self, items):
            return np.array([1.0 if normalize_text(a) == "yes" else 0.0 for _, _, a in items], dtype=np.float32)

        encoder = CharTokenizer()  # what its digests of the prompts are made with

        def signer(self):
            return load_or_create_signer(self.node.party, self.node.directory / "keys")

    def _client(self):
        return self._Rule(self)


def test_grpo_on_the_encrypted_fused_reward_raises_it(tmp_path, warm_policy, federated):
    nodes = {**{c: SaysYesNode(tmp_path, k) for k, c in enumerate(CLIENTS)}, AUTHORITY_PARTY: AuthorityNode(tmp_path)}
    transport = RecordingTransport(nodes)
    federation = connect(transport, RunDir(tmp_path), DataSpec(), CLIENTS)
    session = _session(tmp_path, transport, federation, "grpo-secure")
    config = AlignConfig(fusion="uniform")
    reward = FederatedReward(session, config, None, None, {}, federated.answers)
    settings = GRPOSettings(
        num_generations=4,
        batch_size=16,
        steps_per_generation=2,
        max_steps=30,
        learning_rate=1e-3,
        beta=0.04,
        max_completion_length=8,
        save_steps=0,
        seed=0,
    )
    presence = federated.prompt_pool.filter(lambda r: r["family"] == "presence").shuffle(seed=0).select(range(256))
    result = run_grpo(warm_policy, presence, reward, settings, tmp_path / "grpo")
    rewards = [h["reward"] for h in result["history"] if "reward" in h]
    assert len(rewards) == session.timings.rounds == 15
    assert statistics.mean(rewards[-4:]) > statistics.mean(rewards[:4]) + 0.2, rewards
    assert {a for _, a, _ in transport.received} >= {"score", "decrypt"}
    releases = [e for e in Ledger(tmp_path / "ledger.jsonl").entries() if e["kind"] == KIND_REWARD_RELEASE]
    assert len(releases) == 15
    assert json.loads((tmp_path / "grpo" / "grpo_log.json").read_text())["settings"]["beta"] == 0.04


def test_the_server_key_the_authority_trusts_comes_from_the_registry_not_the_server(tmp_path):
    nodes = nodes_of(tmp_path)
    transport = LocalTransport(nodes)
    for party in CLIENTS + [AUTHORITY_PARTY]:
        transport.ask([party], "identify", {})
    replies = transport.ask([AUTHORITY_PARTY], "setup", {"clients": ["client-9=" + "00" * 32]})
    assert "server" in str(replies[AUTHORITY_PARTY].reason)  # no server key published yet: refused
    publish_public_key(load_or_create_signer(SERVER_PARTY, tmp_path / "server" / "keys"), tmp_path / "keys")
    setup = transport.ask([AUTHORITY_PARTY], "setup", {"clients": ["client-9=" + "00" * 32]})[AUTHORITY_PARTY]
    assert setup["clients"] == CLIENTS  # the payload's "client-9" is ignored


class DeviatingServer(LocalTransport):
    """A server that relays to the clients at their setup what `relay` makes of it, not the key
    authority's context."""

    def __init__(self, nodes, relay) -> None:
        super().__init__(nodes)
        self.relay = relay

    def ask(self, parties, action, payloads, timeout=None):
        if action == "setup" and AUTHORITY_PARTY not in parties:
            payloads = self.relay(dict(payloads))
        return super().ask(parties, action, payloads, timeout)


def _servers_own_authority(tmp_path: Path) -> dict:
    """The setup of a key authority the server runs itself: a CKKS context whose secret key the
    server holds, signed by a key of its own (not the registry's authority key)."""
    state = tmp_path / "the-servers-own"
    publish_public_key(Signer.generate(SERVER_PARTY), state / "keys")
    return AuthorityNode(state).handle("setup", {})


@pytest.mark.parametrize("signed_by", ["the authority (its signature relayed)", "the server's own authority key"])
def test_attack_clients_refuse_a_context_the_server_made(tmp_path, signed_by):
    """Review: the server relays the public context (and its fingerprint) to the clients. A deviating
    server hands out a context of its own, with the fingerprint of its bytes, and reads every reply.
    The clients take only a context the registry's authority key signed, and store nothing else."""
    own = _servers_own_authority(tmp_path)

    def relay(payload):
        payload.update(context=own["context"], fingerprint=own["fingerprint"])  # a matching fingerprint
        if signed_by.startswith("the server"):
            payload["context_signature"] = own["context_signature"]
        return payload

    nodes = nodes_of(tmp_path)
    with pytest.raises(AlignError, match="client setup failed on 3 node") as refused:
        connect(DeviatingServer(nodes, relay), RunDir(tmp_path), DataSpec(), CLIENTS)
    assert str(refused.value).count("not signed by the key authority") == 3, refused.value
    for client in CLIENTS:
        assert not (nodes[client].directory / CONTEXT_FILE).exists()
        assert not (nodes[client].directory / NODE_FILE).exists()
    # The honest relay of the same authority's setup is taken.
    federation = connect(LocalTransport(nodes), RunDir(tmp_path), DataSpec(), CLIENTS)
    for client in CLIENTS:
        assert ClientNode(tmp_path, int(client[-1]))._public_context().fingerprint == federation.pub.fingerprint
    # ... and a deviating setup later leaves the stored context as it was.
    with pytest.raises(AlignError, match="not signed by the key authority"):
        connect(DeviatingServer(nodes, relay), RunDir(tmp_path), DataSpec(), CLIENTS)
    assert ClientNode(tmp_path, 0)._public_context().fingerprint == federation.pub.fingerprint


def test_unknown_fusion_and_objective_are_refused_before_any_work(tmp_path):
    with pytest.raises(Exception, match="fusion"):
        align(LocalTransport({}), tmp_path, tiny("best"), log=lambda m: None)
    with pytest.raises(Exception, match="objective"):
        align(LocalTransport({}), tmp_path, tiny(objective="speed"), log=lambda m: None)
    with pytest.raises(AlignError, match="answer-prior-questions must be >= 0"):
        align(LocalTransport({}), tmp_path, tiny(answer_prior_questions=-1), log=lambda m: None)
    with pytest.raises(AlignError, match="policy-threads must be >= 0"):
        align(LocalTransport({}), tmp_path, tiny(policy_threads=-1), log=lambda m: None)
    with pytest.raises(AlignError, match="unknown route-by 'image'"):
        align(LocalTransport({}), tmp_path, tiny(route_by="image"), log=lambda m: None)
    deployment = {"registry": str(tmp_path / "registry"), "ca_cert": str(tmp_path / "ca.crt")}
    for fusion in ("single:1", "by-family"):  # in a deployment, only when the run config allows it
        with pytest.raises(AlignError, match="reveals one client's scores.*allow-single-client=true"):
            align(LocalTransport({}), tmp_path, tiny(fusion, **deployment), log=lambda m: None)
    with pytest.raises(AlignError, match="set ca-cert with registry"):  # a registry is trusted only through its CA
        align(LocalTransport({}), tmp_path, tiny(registry=str(tmp_path / "registry")), log=lambda m: None)
    assert not (tmp_path / "policy").exists()


def test_a_router_trained_on_other_inputs_or_sharpness_is_not_reused(tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    (server / "router.npz").write_bytes(b"not read")
    (server / "router.json").write_text(json.dumps({"features": "prompt", "sharpness": 10.0}))
    family = RouterInputs("family", policy=None, families=("color", "shape"))
    with pytest.raises(AlignError, match="'route-by': 'prompt'.*'route-by': 'family'"):
        train_router(None, None, RunDir(tmp_path), None, family, AlignConfig(), log=lambda m: None)
    (server / "router.json").write_text(json.dumps({"features": "family", "sharpness": 1.0}))
    with pytest.raises(AlignError, match="'router-sharpness': 1.0.*'router-sharpness': 10.0"):
        train_router(None, None, RunDir(tmp_path), None, family, AlignConfig(), log=lambda m: None)


class Unanswered:
    """A node that fails the given actions (a client that is gone) and answers the others."""

    def __init__(self, node, actions: tuple[str, ...]) -> None:
        self.node, self.actions = node, actions

    def handle(self, action, payload):
        if action in self.actions:
            raise ConnectionError(f"{action}: no answer")
        return self.node.handle(action, payload)


def test_the_server_keeps_to_the_authoritys_k_min(tiny_run):
    """The server's k_min is 2, the authority announces 3: a round with one client gone is skipped
    (signed step_skipped), not sent to an authority that would refuse it and abort the run."""
    run, _, _ = tiny_run
    nodes = nodes_of(run, "k-min-3", k_min=3)
    nodes["client-2"] = Unanswered(nodes["client-2"], ("score",))
    grpo = GRPOSettings(max_steps=1, batch_size=8, steps_per_generation=1, save_steps=1, max_completion_length=6)
    results = align(LocalTransport(nodes), run, tiny("single:0", k_min=2, grpo=grpo), log=lambda m: None)
    assert results["grpo"]["rounds"] == results["grpo"]["skipped_rounds"] == 1
    (skipped,) = [e["details"] for e in Ledger(run / "ledger.jsonl").entries()
                  if e["kind"] == KIND_STEP_SKIPPED and e["details"]["run_id"] == results["run_id"]]  # fmt: skip
    assert skipped["k_min"] == 3 and skipped["present"] == ["client-0", "client-1"]


def test_router_setup_and_item_uses_are_pinned_for_the_context(tiny_run):
    """Each client pinned the router setup the server logged; another setup, calibration items of the
    router training under another run id, or a query off the pinned setup (review e5) are refused."""
    run, _, _ = tiny_run
    connect(LocalTransport(nodes_of(run)), RunDir(run), RunDir(run).data_spec(), CLIENTS)  # the mor context
    (logged,) = [e["details"] for e in Ledger(run / "ledger.jsonl").entries() if e["kind"] == KIND_ROUTER_SETUP]
    setup = RouterSetup.from_bytes((run / SERVER_PARTY / "router_setup.npz").read_bytes())
    assert logged["setup_sha256"] == setup.digest
    node = ClientNode(run, 0)
    assert node.handle("router_setup", {"setup": setup.to_bytes()})["setup_sha256"] == setup.digest  # the same: no-op
    shifted = Router(setup.config).fit_input_projection(setup.features + 1.0)
    with pytest.raises(ProtocolError, match="router setup is pinned"):
        node.handle("router_setup", {"setup": RouterSetup.of(shifted, setup.features + 1.0,
                                                             setup.objective_ids).to_bytes()})  # fmt: skip
    state = json.loads((node.directory / "router_contexts.json").read_text())[node._node_state()["fingerprint"]]
    used = state["steps"][0][2]
    fields = {"run_id": "another:router", "step": 0, "nonce": "0" * 32, "mask_key": MaskKey().public_hex}
    with pytest.raises(RouterQueryError, match="already used"):
        node.handle("margins", {**fields, "items": array_bytes(np.asarray(used[:32]))})
    fresh = sorted(set(range(len(setup.features))) - {i for _, _, batch in state["steps"] for i in batch})[:96]
    crafted = Router(setup.config)  # the server's own normalisation: identity projection, zero mean
    query = GradientQuery(1, "1" * 32, crafted.state(), np.asarray(fresh), setup.features[fresh],
                          setup.objective_ids[fresh], np.full(96, -0.5 / 96), 1.0)  # fmt: skip
    with pytest.raises(RouterQueryError, match="not the pinned setup's"):
        node.handle("router_gradient", {**fields, **encode_gradient_query(query)})


class ModelNode(ClientNode):
    """A client with a real, untrained reward model of its architecture, built in memory: scoring,
    digests and replies are the real node's (no DP training needed to score)."""

    ARCHS = ("cnn-gru", "vit-xattn", "cnn-gru")

    def _client(self):
        if self._loaded is None:
            name = self.ARCHS[self.client_id]
            arch = architecture(name)
            encoder = arch.build_encoder(["what color is the shape", "what shape is it", "red", "circle"] * 2)
            torch.manual_seed(self.client_id)
            config = ClientConfig(self.client_id, name, "color", "word")
            self._loaded = RewardClient(self.state_dir, config, arch.build_model(encoder), encoder,
                                        PrivacyState(Budget(1.0, 1e-5)))  # fmt: skip
        return self._loaded


@pytest.fixture
def model_nodes(tmp_path):
    nodes = {**{c: ModelNode(tmp_path, k) for k, c in enumerate(CLIENTS)}, AUTHORITY_PARTY: AuthorityNode(tmp_path)}
    federation = connect(LocalTransport(nodes), RunDir(tmp_path), DataSpec(), CLIENTS)
    return tmp_path, nodes, federation


def _png(image: Image.Image, level: int, comment: str | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if comment:
        info.add_text("Comment", comment)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=level, pnginfo=info)
    return out.getvalue()


def test_attack_a_reencoded_png_and_a_respelled_question_are_one_prompt(model_nodes):
    """Review e1: three PNG encodings of one image's pixels and three spellings of one question that every
    model reads alike, under K different rows, would give the server every client's exact score. The
    clients digest the prompt as their models read it: one prompt, one row, or the round is left out."""
    run, nodes, federation = model_nodes
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pngs = [png_bytes(image), _png(image, 1), _png(image, 9, "x")]
    assert len(set(pngs)) == 3
    questions = ["What color is the shape?", "what color is the shape?", "WHAT  COLOR IS THE SHAPE?"]
    request = {"images": pngs, "image_index": [0, 1, 2], "questions": questions, "answers": ["red"] * 3}
    rows = np.full((3, 3), 0.02) + np.eye(3) * 0.94
    session = _session(run, LocalTransport(nodes), federation, "png")
    assert session.fused_rewards(request, rows) is None  # left out: nothing released
    entries = Ledger(run / "ledger.jsonl").entries()
    assert [e["kind"] for e in entries] == [KIND_STEP_SKIPPED]
    reason = entries[0]["details"]["reason"]
    assert "left the round out" in reason and "another W row" in reason
    same = session.fused_rewards(request, np.tile(rows[0], (3, 1)))  # one row: one equation, released
    assert same is not None and np.ptp(same) < 1e-4
    # A spelling that the char tokenizer (client-1) keeps apart and the word tokenizers do not: refused too.
    apart = {**request, "questions": ["What color is the shape?", "What color is the shape ?", questions[0]]}
    assert session.fused_rewards(apart, np.tile(rows[0], (3, 1))) is None
    assert "as another item" in Ledger(run / "ledger.jsonl").entries()[-1]["details"]["reason"]


def test_clients_score_only_under_a_verified_context(model_nodes):
    """Scoring, margins and router gradients run only under a context the registry's authority key
    signed, verified again whenever a node loads it: a context stored without its signature (an
    older version's setup) or whose signer is no longer the registry's authority key is refused
    before any work."""
    run, nodes, federation = model_nodes
    node = nodes["client-0"]
    request = {**score_request(*_items_of_one_image(2)), "run_id": "verified", "step": 0, "nonce": "0" * 32,
               "mask_key": MaskKey().public_hex}  # fmt: skip
    reply = node.handle("score", request)["reply"]
    assert parse_reply(reply, federation.pub, federation.registry).client_id == "client-0"
    state_path = node.directory / NODE_FILE
    stored = json.loads(state_path.read_text())
    unsigned = {k: v for k, v in stored.items() if k != "context_signature"}
    state_path.write_text(json.dumps(unsigned))
    for action in ("score", "margins", "router_gradient"):
        with pytest.raises(ProtocolError, match="no verified public context"):
            ClientNode(run, 0).handle(action, request)
    state_path.write_text(json.dumps(stored))
    authority_key = run / "keys" / f"{AUTHORITY_PARTY}.pub"
    authority_key.write_text(Signer.generate(AUTHORITY_PARTY).public_key_hex + "\n")  # another authority key
    for action in ("score", "margins", "router_gradient"):
        with pytest.raises(ProtocolError, match="not signed by the key authority"):
            ClientNode(run, 0).handle(action, request)
    authority_key.unlink()
    with pytest.raises(ProtocolError, match="key authority's public key is not in the registry"):
        ClientNode(run, 0).handle("score", request)


def _items_of_one_image(n: int):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return [image] * n, ["What shape is it?"] * n, ["circle"] * n


def test_a_dropout_on_a_recurring_prompt_skips_the_round_within_one_run(model_nodes):
    """Review M2: a prompt seen with all clients recurs in a round one client misses; the renormalised
    row would be a second row (and give the dropped client's score): the round is skipped, not fatal."""
    run, nodes, federation = model_nodes
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    request = score_request([image] * 2, ["What shape is it?"] * 2, ["circle", "red"])
    weights = np.tile([0.5, 0.3, 0.2], (2, 1))
    assert _session(run, LocalTransport(nodes), federation, "grpo").fused_rewards(request, weights) is not None
    dropped = _session(run, LocalTransport(nodes, unavailable={"client-2"}), federation, "grpo")
    assert dropped.fused_rewards(request, weights) is None and dropped.timings.skipped == 1
    skipped = Ledger(run / "ledger.jsonl").entries()[-1]
    assert skipped["kind"] == KIND_STEP_SKIPPED and skipped["details"]["run_id"] == "grpo"
    assert (
        skipped["details"]["present"] == ["client-0", "client-1"]
        and "left the round out" in skipped["details"]["reason"]
    )
    assert len(_session(run, LocalTransport(nodes), federation, "grpo").fused_rewards(request, weights)) == 2
    # ... and under another run id the prompt keeps its row too (review H1)
    assert _session(run, LocalTransport(nodes), federation, "other").fused_rewards(request, weights[:, ::-1]) is None
    steps = [e["details"]["step"] for e in Ledger(run / "ledger.jsonl").entries() if e["details"]["run_id"] == "grpo"]
    assert steps == [0, 1, 2]  # one run, its own step numbers: released, skipped, released


class _RuleSession:
    """A stand-in for SecureSession whose fused reward is a known rule of the answer text."""

    w_min = DEFAULT_W_MIN

    def __init__(self, rule) -> None:
        self.rule, self.released = rule, 0

    def fused_rewards(self, request, weights):
        self.released += len(request["answers"])
        return np.array([self.rule(q, a) for q, a in zip(request["questions"], request["answers"], strict=True)])


def test_the_answer_prior_is_what_the_reward_pays_whatever_the_image_and_is_taken_out():
    from datasets import Dataset

    from secure_mor.data import styled_answer

    answers = {"shape": ["circle", "rectangle", "triangle"], "presence": ["no", "yes"]}
    bias = {"circle": 0.2, "rectangle": 0.9, "triangle": -0.5, "no": -0.3, "yes": 0.1}
    rows = [(f, a) for f, values in answers.items() for a in values for _ in range(6)]
    questions = {"shape": "What shape is in the image?", "presence": "Is there a circle in the image?"}
    labelled = Dataset.from_dict({
        "image": [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(rows))],
        "question": [f"{questions[f]} #{a}" for f, a in rows], "answer": [a for _, a in rows],
        "family": [f for f, _ in rows], "image_id": [f"public/{i}" for i in range(len(rows))],
    })  # fmt: skip

    def rule(question, answer):  # right answer + a prior per answer + a level for sentences
        word = next(w for w in normalize_text(answer).split() if w in bias)
        return float(question.endswith(f"#{word}")) + bias[word] + 0.5 * (answer != word)

    session = _RuleSession(rule)
    reward = FederatedReward(session, AlignConfig(fusion="uniform"), None, None, {}, answers)
    report = reward.learn_answer_prior(labelled, per_family=6, seed=0)
    assert report["released"] == session.released == 6 * 3 * 2 + 6 * 2 * 2  # every answer, both styles
    # shape: the prior outweighs the right-answer bonus ("rectangle" beats a true "triangle"); half the
    # correction is the least that ranks every true answer first. presence: the raw reward already does.
    shape, presence = report["families"]["shape"], report["families"]["presence"]
    assert [shape["fused_top1"][x] for x in ("0.0", "0.25", "0.5", "1.0")] == pytest.approx([2 / 3, 2 / 3, 1, 1])
    assert shape["shrinkage"] == 0.5 and presence["shrinkage"] == 0.0
    centre = np.mean([bias[a] for a in answers["shape"]])  # the true answers are balanced: the bonus is level
    assert all(abs(shape["offsets"][a] - 0.5 * (bias[a] - centre)) < 1e-9 for a in answers["shape"])
    assert presence["offsets"] == {"no": 0.0, "yes": 0.0}
    # the style level: a sentence is paid 0.5 above its one-word twin, so +-0.25 around the family's mean
    assert shape["style_levels"] == pytest.approx({"word": -0.25, "sentence": 0.25})

    # GRPO's rewards: the prior is gone, the style level and the image-dependent part stay
    q = questions["shape"]
    completions = [[{"role": "assistant", "content": t}] for t in
                   ("rectangle", "triangle", styled_answer("circle", "shape", "sentence"), ".")]
    images = [labelled[0]["image"]] * 4
    values = reward(None, completions, images, [q] * 4, ["shape"] * 4, ["public/0"] * 4)
    assert values[0] - values[1] == pytest.approx(0.5 * (bias["rectangle"] - bias["triangle"]))  # half the prior left
    assert values[2] == pytest.approx(bias["circle"] - shape["offsets"]["circle"] + 0.5)  # the sentence level stays
    assert values[3] == pytest.approx(min(values[:3]))  # a non-answer: the worst answer of its prompt


def test_grpo_rewards_only_where_the_reward_ranks_better_than_the_policy_answers():
    def family(fused, policy):
        return {"shrinkage": 0.5, "fused_top1": {"0.0": 0.0, "0.5": fused}, "policy_accuracy": policy}

    prior = {"families": {"color": family(0.96, 0.96), "shape": family(0.62, 0.78), "presence": family(0.69, 0.59)}}
    assert gated_families(prior) == ["presence"]  # a tie teaches nothing; only the chosen shrinkage counts

    # the other families stay in GRPO's prompts, their answers unscored (no release) and all paid 0: advantage 0
    session = _RuleSession(lambda question, answer: 1.0 + float(answer == "yes"))
    answers = {"shape": ["circle", "rectangle", "triangle"], "presence": ["no", "yes"]}
    reward = FederatedReward(session, AlignConfig(fusion="uniform"), None, None, {}, answers)
    reward.families = ["presence"]
    texts = ["circle", "triangle", "yes", "no"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    questions = ["What shape is in the image?"] * 2 + ["Is there a circle in the image?"] * 2
    image = Image.new("RGB", (8, 8))
    values = reward(None, completions, [image] * 4, questions, ["shape", "shape", "presence", "presence"],
                    ["public/0"] * 2 + ["public/1"] * 2)
    assert values == [0.0, 0.0, 2.0, 1.0] and session.released == 2

    # an objective with a style: the families left out get the fused reward's style level alone, unscored
    prior["families"]["shape"]["style_levels"] = {"word": -0.1, "sentence": 0.3}
    prior["families"]["color"]["style_levels"] = {"word": 0.0, "sentence": 0.0}
    assert style_only_families(prior) == {"color": {"word": 0.0, "sentence": 0.0},
                                          "shape": {"word": -0.1, "sentence": 0.3}}
    reward.families, reward.style_only = None, style_only_families(prior)
    texts = ["circle", "The shape is a triangle.", ".", "yes"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    values = reward(None, completions, [image] * 4, questions, ["shape", "shape", "shape", "presence"],
                    ["public/0"] * 3 + ["public/1"])
    assert values == [-0.1, 0.3, -0.1, 2.0] and session.released == 3  # only the presence answer was sent
    # with the SFT policy's own answer to the prompt, the style is paid to that answer only
    reward.reference_answers = {prompt_key("public/0", questions[0]): "circle"}
    texts = ["The shape is a circle.", "The shape is a triangle.", "circle"]
    values = reward(None, [[{"role": "assistant", "content": t}] for t in texts], [image] * 3, questions[:1] * 3,
                    ["shape"] * 3, ["public/0"] * 3)
    assert values == [0.3, -0.1, -0.1]


def test_the_sentences_objective_is_refused_on_a_dataset_whose_answers_are_sentences(tmp_path):
    source = own_families_vqa(tmp_path, {"train": 60, "test": 9}, long_answers=True)
    with pytest.raises(AlignError, match="answers are already sentences"):
        align(LocalTransport({}), tmp_path / "run", tiny(dataset=str(source), objective="sentences"),
              log=lambda m: None)
    assert not (tmp_path / "run" / "policy").exists()


def test_a_bad_model_is_refused_before_any_work(tmp_path):
    with pytest.raises(AlignError, match="no saved VLM at '/nonexistent/vlm': no such directory"):
        align(LocalTransport({}), tmp_path, tiny(model="/nonexistent/vlm"), log=lambda m: None)
    assert not (tmp_path / "policy").exists() and not (tmp_path / "data.json").exists()


def test_the_sft_evaluation_is_reused_only_for_the_same_policy_and_questions(tiny_run):
    run, _, _ = tiny_run
    runs = RunDir(run)
    config = tiny(answer_prior_questions=3)
    data = prepare_data(runs, config)
    said = []
    prepare_policy(runs, data, config, log=said.append)  # what align evaluated: reused
    assert said == []
    first = json.loads(runs.eval_path("sft").read_text())
    assert first["evaluated"]["n"] == 3 * 8
    prepare_policy(runs, data, replace(config, eval_per_family=5), log=said.append)  # other questions: evaluated
    again = json.loads(runs.eval_path("sft").read_text())
    assert said == ["evaluating the SFT policy"] and again["overall"]["n"] == again["evaluated"]["n"] == 3 * 5
    assert again["evaluated"]["policy"] == first["evaluated"]["policy"]
    prepare_policy(runs, data, config, log=said.append)  # back: the key differs from the file's again
    assert said == ["evaluating the SFT policy"] * 2 and json.loads(runs.eval_path("sft").read_text()) == {
        **first, "seconds": json.loads(runs.eval_path("sft").read_text())["seconds"]}


def test_the_results_printout_names_the_kept_step_and_the_rewarded_families(tiny_run):
    from secure_mor.cli import console, print_results

    _, _, results = tiny_run
    with console.capture() as captured:
        print_results(results)
    text = " ".join(captured.get().split())
    kept = results["grpo"]["selected"]
    assert f"GRPO rewarded the families {', '.join(results['grpo']['families'])}" in text
    assert f"the aligned policy is step {kept['step']}" in text and "held-out accuracy: SFT vs aligned" in text


def test_torch_threads_sets_them_inside_the_block_and_restores_them():
    import torch

    from secure_mor.server.pipeline import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: torch's default, untouched
        assert torch.get_num_threads() == before

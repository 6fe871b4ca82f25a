"""Training the router on calibration preferences: the plaintext reference, and the secure
protocol with real CKKS, signed replies, blinding and the key authority."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch

from secure_mor.audits.verify import verify_ledger
from secure_mor.authority.key_authority import AuthorityPolicy, KeyAuthority
from secure_mor.crypto.context import PublicContext, create_secret_context, public_context_of
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import parse_reply, seal_reply
from secure_mor.ledger import KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE, Ledger
from secure_mor.protocol import calibration_digests
from secure_mor.routing import (
    GradientQuery,
    ItemUseLimiter,
    QueryLimits,
    Router,
    RouterConfig,
    RouterSetup,
    RouterState,
    answer_gradient_query,
    bt_coefficients,
    flatten_gradients,
    parameter_count,
)
from secure_mor.server.router_training import (
    RouterTrainingConfig,
    RouterTrainingError,
    batch_schedule,
    released_budget,
    train_router_plaintext,
    train_router_securely,
)
from secure_mor.server.secure_round import SecureRound

torch.set_num_threads(1)
R = 10.0
W_MIN = 0.02
K = 3
OBJECTIVES = ("correctness", "style")
STYLE_CLIENT = 1


def synthetic(n: int, objectives: tuple[str, ...] = ("correctness",), seed: int = 0):
    """Features: one-hot family + noise, plus noise dimensions. Client k's margins are right
    (positive) on family k for "correctness" and random elsewhere; for "style" only client 1 is right."""
    rng = np.random.default_rng(seed)
    family = rng.integers(0, K, n)
    objective = rng.integers(0, len(objectives), n)
    x = np.concatenate([np.eye(K)[family] + 0.3 * rng.normal(size=(n, K)), rng.normal(size=(n, 3))], axis=1)
    d = rng.normal(0.0, 2.0, size=(n, K))
    right = np.where(objective == 0, family, STYLE_CLIENT)
    d[np.arange(n), right] = np.abs(rng.normal(2.0, 0.5, n))
    return x, objective, np.clip(d, -R, R), family


def make_router(x: np.ndarray, objectives: tuple[str, ...], **kw) -> Router:
    config = RouterConfig(
        feature_dim=x.shape[1],
        objectives=objectives,
        num_clients=K,
        w_min=W_MIN,
        **{"hidden": 8, "input_dim": None, **kw},
    )
    return Router(config).fit_input_projection(x)


# ---------------------------------------------------------------- simulated federation


@dataclass
class SimulatedClient:
    """What a client does in the protocol (the real one lives in secure_mor.clients)."""

    signer: Signer
    pub: PublicContext
    column: int
    margins: np.ndarray  # private: its clipped margin for every calibration pair
    limiter: ItemUseLimiter = field(default_factory=ItemUseLimiter)
    setup: RouterSetup | None = None  # pinned at the router training's setup

    def seal(self, fields: dict, purpose: str, values: np.ndarray, items=None, query=None) -> bytes:
        return seal_reply(self.signer, self.pub, run_id=fields["run_id"], step=fields["step"], nonce=fields["nonce"],
                          purpose=purpose, scores=values, mask_key=fields["mask_key"], items=items,
                          query=query)  # fmt: skip

    def pin(self, setup: RouterSetup) -> None:
        setup.validate(len(self.margins))
        self.setup = setup

    def margin_reply(self, fields: dict, items: np.ndarray) -> bytes:
        self.limiter.admit(fields["run_id"], fields["step"], items.tolist())
        return self.seal(fields, "reward", self.margins[items], calibration_digests(items.tolist()))

    def gradient_reply(self, fields: dict, query: GradientQuery) -> bytes:
        self.limiter.admit(fields["run_id"], query.step, query.items.tolist())
        values = answer_gradient_query(query, self.margins, self.column, value_bound=R, setup=self.setup)
        return self.seal(fields, "router_gradient", values, calibration_digests(query.items.tolist()), query.digest)


@dataclass
class Federation:
    pub: PublicContext
    server: Signer
    authority: KeyAuthority
    clients: list[SimulatedClient]
    ledger_path: Path
    received: list[bytes] = field(default_factory=list)  # everything the server-side function got
    queries: list[GradientQuery] = field(default_factory=list)

    def margins(self, fields: dict, items: np.ndarray) -> dict[str, bytes]:
        replies = {c.signer.party: c.margin_reply(fields, items) for c in self.clients}
        self.received += replies.values()
        return replies

    def gradients(self, fields: dict, query: GradientQuery) -> dict[str, bytes]:
        self.queries.append(query)
        replies = {c.signer.party: c.gradient_reply(fields, query) for c in self.clients}
        self.received += replies.values()
        return replies

    def decrypt(self, request: bytes) -> bytes:
        response = self.authority.decrypt(request)
        self.received.append(response)
        return response

    def train(
        self,
        router: Router,
        x: np.ndarray,
        o: np.ndarray,
        config: RouterTrainingConfig,
        run_id: str,
        margins=None,
        gradients=None,
    ):
        rounds = SecureRound(
            self.pub, self.server, {c.signer.party: c.signer.public_key_hex for c in self.clients},
            [c.signer.party for c in self.clients], self.authority.signer.public_key_hex, run_id, W_MIN, self.decrypt,
        )  # fmt: skip
        for client in self.clients:
            client.pin(RouterSetup.of(router, x, o))
        return train_router_securely(router, x, o, rounds=rounds, get_encrypted_margins=margins or self.margins,
                                     get_encrypted_gradients=gradients or self.gradients, config=config)  # fmt: skip


@pytest.fixture(scope="module")
def secret() -> ts.Context:
    return create_secret_context()


def make_federation(secret: ts.Context, margins: np.ndarray, state_dir: Path) -> Federation:
    pub = public_context_of(secret)
    server, authority_signer = Signer.generate("server"), Signer.generate("authority")
    clients = [SimulatedClient(Signer.generate(f"client-{k}"), pub, k, margins[:, k]) for k in range(K)]
    ledger_path = state_dir / "ledger.jsonl"
    authority = KeyAuthority(
        secret,
        authority_signer,
        clients={c.signer.party: c.signer.public_key_hex for c in clients},
        server_public_key=server.public_key_hex,
        state_dir=state_dir,
        policy=AuthorityPolicy(w_min=W_MIN),
        ledger=Ledger(ledger_path),
    )
    return Federation(pub, server, authority, clients, ledger_path)


def exact_router(state: RouterState) -> Router:
    return Router.from_state(state)


# ---------------------------------------------------------------- plaintext reference


def test_router_learns_family_routing_plaintext_reference() -> None:
    x, o, d, family = synthetic(30 * 128)
    router = make_router(x, ("correctness",))
    before = router.weights(x, o)
    result = train_router_plaintext(router, x, o, d, RouterTrainingConfig(steps=30, batch_size=128, learning_rate=0.1))
    assert len(result.history) == 30 and result.losses[-1] < 0.7 * result.losses[0]
    after = router.weights(x, o)
    for f in range(K):
        assert abs(before[family == f, f].mean() - 1 / 3) < 0.02  # starts near uniform
        right = after[family == f]
        assert right[:, f].mean() > 0.6, f"family {f}: {right.mean(axis=0)}"
        assert np.all(right[:, f].mean() > right.mean(axis=0)[np.arange(K) != f] + 0.4)


def scale_trap(n: int, seed: int = 0):
    """One family. Client 0 ranks 90 % of the pairs right with small margins (+-0.3); client 1 ranks 75 %
    right with large ones (+-2); client 2 is noise. A pair is ranked right when its fused margin is > 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    d = np.stack([np.where(rng.random(n) < 0.9, 0.3, -0.3), np.where(rng.random(n) < 0.75, 2.0, -2.0),
                  rng.normal(0.0, 1.0, n)], axis=1)
    return x, np.zeros(n, dtype=np.int64), d


def test_sharpness_makes_the_router_prefer_pairs_ranked_right_over_large_margins() -> None:
    x, o, d = scale_trap(30 * 128)
    preferred = {}
    for sharpness in (1.0, 10.0):
        router = make_router(x, ("correctness",))
        train_router_plaintext(router, x, o, d, RouterTrainingConfig(steps=30, batch_size=128, learning_rate=0.1,
                                                                     sharpness=sharpness))
        w = router.weights(x, o)
        preferred[sharpness] = (int(np.argmax(w.mean(axis=0))), float(((w * d).sum(axis=1) > 0).mean()))
    assert preferred[1.0][0] == 1 and preferred[10.0][0] == 0, preferred
    assert preferred[10.0][1] > preferred[1.0][1] + 0.05, preferred


# ---------------------------------------------------------------- the secure protocol


@pytest.fixture(scope="module")
def secure_run(secret: ts.Context, tmp_path_factory: pytest.TempPathFactory):
    """30 secure steps, two objectives, Adam, an MLP router."""
    x, o, d, family = synthetic(30 * 128, OBJECTIVES, seed=1)
    federation = make_federation(secret, d, tmp_path_factory.mktemp("authority"))
    router = make_router(x, OBJECTIVES)
    config = RouterTrainingConfig(steps=30, batch_size=128, learning_rate=0.1)
    result = federation.train(router, x, o, config, "run-1:router")
    return federation, router, result, (x, o, d, family)


def test_secure_training_learns_objective_dependent_routing(secure_run) -> None:
    _, router, result, (x, o, _, family) = secure_run
    assert result.steps_taken == 30 and result.losses[-1] < 0.7 * result.losses[0]
    w = router.weights(x, o)
    by_objective = {}
    for objective in (0, 1):
        by_objective[objective] = np.stack([w[(family == f) & (o == objective)].mean(axis=0) for f in range(K)])
    correctness, style = by_objective[0], by_objective[1]
    assert np.all(np.diag(correctness) > 0.6), correctness  # family f -> client f
    assert np.all(style[:, STYLE_CLIENT] > 0.6), style  # style -> client 1 whatever the family
    # Same prompts, other objective: the routing differs measurably where the right client differs.
    for f in (0, 2):
        same = np.flatnonzero(family == f)
        w_correct = router.weights(x[same], np.zeros(len(same), dtype=np.int64))
        w_style = router.weights(x[same], np.ones(len(same), dtype=np.int64))
        assert np.mean(np.abs(w_correct - w_style).sum(axis=1)) > 0.8


def test_secure_training_with_sharpness_follows_the_plaintext_gradient(secret: ts.Context, tmp_path: Path) -> None:
    x, o, d = scale_trap(4 * 128)
    federation = make_federation(secret, d, tmp_path)
    config = RouterTrainingConfig(steps=4, batch_size=128, learning_rate=0.1, sharpness=10.0)
    result = federation.train(make_router(x, ("correctness",)), x, o, config, "sharp:router")
    assert result.steps_taken == 4
    for record, query in zip(result.history, federation.queries, strict=True):
        router = exact_router(query.state)
        fused = (router(x[record.items], o[record.items]) * torch.as_tensor(d[record.items])).sum(dim=1)
        torch.nn.functional.softplus(-10.0 * fused).mean().backward()
        assert np.max(np.abs(record.gradient - flatten_gradients(router))) < 1e-3


def test_secure_releases_equal_the_exact_fused_values(secure_run) -> None:
    federation, _, result, (x, o, d, _) = secure_run
    assert len(federation.queries) == 30
    worst_margin = worst_gradient = 0.0
    for record, query in zip(result.history, federation.queries, strict=True):
        router = exact_router(query.state)  # theta_t as the server sent it to the clients
        items = record.items
        assert np.array_equal(query.items, items) and np.array_equal(query.features, x[items])
        weights = router(x[items], o[items])
        fused = (weights * torch.as_tensor(d[items])).sum(dim=1)
        worst_margin = max(worst_margin, float(np.max(np.abs(record.fused_margins - fused.detach().numpy()))))
        assert np.array_equal(query.coefficients, bt_coefficients(record.fused_margins))
        torch.nn.functional.softplus(-fused).mean().backward()
        worst_gradient = max(worst_gradient, float(np.max(np.abs(record.gradient - flatten_gradients(router)))))
    assert worst_margin < 1e-4 and worst_gradient < 1e-4, (worst_margin, worst_gradient)


def test_server_receives_only_ciphertexts_and_fused_releases(secure_run) -> None:
    federation, router, result, (_, _, d, _) = secure_run
    p = parameter_count(router.config)
    replies = [m for m in federation.received if m[:4] == b"SMRC"]
    responses = [m for m in federation.received if m[:4] == b"SMRA"]
    assert len(replies) + len(responses) == len(federation.received)  # nothing else reached the server
    assert len(replies) == 30 * 2 * K and len(responses) == 30 * 2
    registry = {c.signer.party: c.signer.public_key_hex for c in federation.clients}
    purposes = {"reward": 0, "router_gradient": 0}
    for payload in replies:
        reply = parse_reply(payload, federation.pub, registry)
        purposes[reply.statement.purpose] += 1
        assert reply.statement.n_scores in (128, p)
        assert all(not v.context().is_private() for v in reply.ciphertexts)
    assert purposes == {"reward": 30 * K, "router_gradient": 30 * K}
    # No client's plaintext margins appear in what the server received, in any encoding.
    blob = b"".join(federation.received)
    for k in range(K):
        first = result.history[0].items[:4]
        for encoding in ("<f8", "<f4"):
            assert np.asarray(d[first, k], dtype=encoding).tobytes() not in blob
    # What was decrypted was fused: every margin release is a router-weighted sum, not a column.
    record = result.history[0]
    for k in range(K):
        assert np.max(np.abs(record.fused_margins - d[record.items, k])) > 0.5
    # The authority logged every release, alternating margins and gradient sums, all three contributing.
    entries = Ledger(federation.ledger_path).entries()
    assert [e["kind"] for e in entries] == [KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE] * 30
    assert all(e["details"]["contributors"] == ["client-0", "client-1", "client-2"] for e in entries)
    assert {e["details"]["count"] for e in entries} == {128, p}
    assert all(e["details"]["items_sha256"] for e in entries if e["kind"] == KIND_REWARD_RELEASE)
    registry_keys = {federation.authority.signer.party: federation.authority.signer.public_key_hex}
    assert verify_ledger(federation.ledger_path, registry_keys).ok
    # Each calibration item took part in one step only (default release budget).
    used = np.concatenate([r.items for r in result.history])
    assert len(np.unique(used)) == len(used)


def test_secure_path_reaches_the_plaintext_parameters(secret: ts.Context, tmp_path: Path) -> None:
    x, o, d, _ = synthetic(20 * 128, seed=2)
    config = RouterTrainingConfig(steps=20, batch_size=128, optimizer="sgd", learning_rate=2.0, momentum=0.5)
    plain = make_router(x, ("correctness",))
    secure = make_router(x, ("correctness",))
    assert np.array_equal(plain.flat_parameters(), secure.flat_parameters())
    reference = train_router_plaintext(plain, x, o, d, config)
    result = make_federation(secret, d, tmp_path).train(secure, x, o, config, "run-2:router")
    assert result.steps_taken == 20
    moved = np.max(np.abs(plain.flat_parameters() - make_router(x, ("correctness",)).flat_parameters()))
    gap = np.max(np.abs(plain.flat_parameters() - secure.flat_parameters()))
    assert moved > 0.5 and gap < 5e-3, (moved, gap)  # CKKS release noise ~1e-5 per value and step
    assert np.max(np.abs(plain.weights(x, o) - secure.weights(x, o))) < 2e-3
    assert np.allclose(reference.losses, result.losses, atol=1e-3)


def test_dropped_or_forged_replies_skip_the_step(secret: ts.Context, tmp_path: Path) -> None:
    x, o, d, _ = synthetic(5 * 128, seed=3)
    federation = make_federation(secret, d, tmp_path)
    impostor = Signer.generate("client-2")

    def margins(fields: dict, items: np.ndarray) -> dict[str, bytes]:
        replies = federation.margins(fields, items)
        if fields["step"] == 1:  # client-2 drops out of step 1
            del replies["client-2"]
        return replies

    def gradients(fields: dict, query: GradientQuery) -> dict[str, bytes]:
        replies = federation.gradients(fields, query)
        if fields["step"] == 3:  # an outsider replaces client-2's gradient term
            outsider = SimulatedClient(impostor, federation.pub, 2, np.zeros(len(x)))
            replies["client-2"] = outsider.seal(fields, "router_gradient", np.ones(len(query.state.theta)))
        return replies

    router = make_router(x, ("correctness",))
    config = RouterTrainingConfig(steps=5, batch_size=128)
    result = federation.train(router, x, o, config, "run-3:router", margins=margins, gradients=gradients)
    skipped = {r.step: r.skipped for r in result.history if r.skipped}
    assert set(skipped) == {1, 3}
    assert "margin round: missing ['client-2']" in skipped[1]
    assert "gradient round" in skipped[3] and "signature of client 'client-2'" in skipped[3]
    assert result.steps_taken == 3
    kinds = [(e["details"]["step"], e["kind"]) for e in Ledger(federation.ledger_path).entries()]
    assert (1, KIND_REWARD_RELEASE) not in kinds  # nothing was decrypted for the dropped step
    assert (3, KIND_REWARD_RELEASE) in kinds and (3, KIND_ROUTER_GRADIENT_RELEASE) not in kinds


def test_schedule_respects_the_release_budget() -> None:
    x, o, _, _ = synthetic(1000)
    router = make_router(x, ("correctness",), hidden=0)
    p = parameter_count(router.config)
    config = RouterTrainingConfig(steps=100, batch_size=100)
    batches = batch_schedule(1000, config, p, K)
    assert len(batches) == 10  # one pass: the item budget, not `steps`, ends the run
    assert len(np.unique(np.concatenate(batches))) == 1000
    twice = RouterTrainingConfig(steps=100, batch_size=200, limits=QueryLimits(item_uses=2, max_release_ratio=0.8))
    counts = np.bincount(np.concatenate(batch_schedule(1000, twice, p, K)), minlength=1000)
    assert counts.max() == 2 and len(batch_schedule(1000, twice, p, K)) == 10
    budget = released_budget(config, router)
    assert budget["ratio"] == (100 + p) / 300
    big = make_router(x, ("correctness",), hidden=64)
    with pytest.raises(RouterTrainingError, match="release budget"):
        batch_schedule(1000, config, parameter_count(big.config), K)
    with pytest.raises(RouterTrainingError, match="cannot fill"):
        batch_schedule(50, config, p, K)


def test_secure_training_on_the_tiny_policys_prompt_features(secret: ts.Context, tmp_path: Path) -> None:
    """Real features: the frozen tiny LLaVA's pooled prompt states of ~1,500 easy-VQA calibration
    pairs, the default (linear, PCA-32) router, synthetic clients each right on one family."""
    from secure_mor.data import FAMILIES, SplitConfig, build_federated_data, column
    from secure_mor.server.router import prompt_features
    from secure_mor.vlm import build_tiny_vlm

    rows = build_federated_data(SplitConfig(calibration_pairs=1500, calibration_image_fraction=0.1)).calibration
    model, processor = build_tiny_vlm(column(rows, "question"))
    features = prompt_features(model, processor, rows, batch_size=64)
    family = np.array([FAMILIES.index(f) for f in column(rows, "family")])
    rng = np.random.default_rng(4)
    d = np.clip(rng.normal(0.0, 2.0, size=(len(rows), K)), -R, R)
    d[np.arange(len(rows)), family] = np.abs(rng.normal(2.0, 0.5, len(rows)))
    objective = np.zeros(len(rows), dtype=np.int64)
    router = Router(
        RouterConfig(feature_dim=features.shape[1], objectives=("correctness",), num_clients=K, w_min=W_MIN)
    ).fit_input_projection(features)
    config = RouterTrainingConfig(batch_size=96, learning_rate=0.1)
    result = make_federation(secret, d, tmp_path).train(router, features, objective, config, "run-4:router")
    assert result.steps_taken == len(rows) // 96  # one pass: each pair used once
    w = router.weights(features, objective)
    right = [w[family == f, f].mean() for f in range(K)]
    assert min(right) > 0.6, right

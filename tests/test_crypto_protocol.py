"""One GRPO step's cryptography: packing, signed replies, fusion, blinding, the key authority."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from secure_mor.audits.ledger import KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE, Ledger, verify_ledger
from secure_mor.crypto import authority as authority_module
from secure_mor.crypto.authority import AuthorityPolicy, KeyAuthority, PolicyError, measure_decryption_error
from secure_mor.crypto.blinding import Blinder
from secure_mor.crypto.context import (
    PublicContext,
    ScryptParams,
    create_secret_context,
    public_context_of,
    save_secret_context,
)
from secure_mor.crypto.fusion import (
    WeightError,
    fuse,
    insecure_plaintext_fusion,
    renormalise,
    validate_weights,
)
from secure_mor.crypto.packing import decrypt_packed, encrypt_packed, pack, unpack
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.signing import Signer, canonical_json
from secure_mor.crypto.wire import (
    ClientReply,
    Expected,
    PayloadError,
    WireLimits,
    _frame,
    build_request,
    new_nonce,
    parse_reply,
    parse_response,
    parse_statement,
    seal_reply,
)

R = 10.0
RUN = "run-1"


@pytest.fixture(scope="module")
def secret() -> ts.Context:
    return create_secret_context()


@pytest.fixture(scope="module")
def pub(secret: ts.Context) -> PublicContext:
    return public_context_of(secret)


@dataclass
class World:
    """Three clients, a server and a key authority sharing one CKKS context."""

    pub: PublicContext
    authority: KeyAuthority
    server: Signer
    clients: list[Signer]
    state_dir: Path
    step: int = 0
    nonce: str = field(default_factory=new_nonce)
    n: int = 0

    @property
    def registry(self) -> dict[str, str]:
        return {c.party: c.public_key_hex for c in self.clients}

    def next_step(self) -> None:
        self.step += 1
        self.nonce = new_nonce()

    def expected(self, n: int, purpose: str = "reward") -> Expected:
        return Expected(RUN, self.step, self.nonce, purpose, n)

    def payloads(self, scores: list[np.ndarray], purpose: str = "reward", clients=None) -> list[bytes]:
        self.n = len(scores[0])
        return [
            seal_reply(
                c, self.pub, run_id=RUN, step=self.step, nonce=self.nonce, purpose=purpose, scores=s, value_bound=R
            )
            for c, s in zip(clients or self.clients, scores, strict=True)
        ]

    def replies(self, payloads: list[bytes], purpose: str = "reward") -> list[ClientReply]:
        return [parse_reply(p, self.pub, self.registry, self.expected(self.n, purpose)) for p in payloads]

    def build(
        self,
        statements: list[bytes],
        weights: np.ndarray | None,
        fused: list[ts.CKKSVector],
        purpose: str = "reward",
        nonce: str | None = None,
        payloads: list[bytes] | None = None,
    ) -> bytes:
        return build_request(
            self.server,
            self.pub,
            run_id=RUN,
            step=self.step,
            nonce=nonce or self.nonce,
            purpose=purpose,
            n_scores=self.n,
            statements=statements,
            weights=weights,
            fused=fused,
            client_payloads=payloads,
        )

    def request(
        self, payloads: list[bytes], weights: np.ndarray | None, purpose: str = "reward", rederive: bool = False
    ) -> tuple[bytes, np.ndarray | None]:
        """What the server does: verify replies, fuse, blind (unless re-derive), ask."""
        replies = self.replies(payloads, purpose)
        fused = fuse(self.pub.context, [r.ciphertexts for r in replies], weights, w_min=0.01)
        mask = None
        if not rederive:
            fused, mask = Blinder(self.pub).blind(fused)
        statements = [r.statement.raw for r in replies]
        return self.build(statements, weights, fused, purpose, payloads=payloads if rederive else None), mask

    def release(self, request: bytes, mask: np.ndarray | None) -> np.ndarray:
        response = self.authority.decrypt(request)
        values = parse_response(response, self.authority.signer.public_key_hex, request)
        return values if mask is None else Blinder.unblind(values, mask)


def _statement_len(payload: bytes) -> int:
    return 9 + int.from_bytes(payload[5:9], "big") + 64


def _make_authority(
    secret: ts.Context,
    world_server: Signer,
    clients: list[Signer],
    state_dir: Path,
    ledger: Ledger | None = None,
    **policy,
) -> KeyAuthority:
    return KeyAuthority(
        secret,
        Signer("authority", _AUTHORITY_KEY.private_key),
        clients={c.party: c.public_key_hex for c in clients},
        server_public_key=world_server.public_key_hex,
        state_dir=state_dir,
        policy=AuthorityPolicy(**policy),
        ledger=ledger,
    )


_AUTHORITY_KEY = Signer.generate("authority")


@pytest.fixture
def world(secret: ts.Context, pub: PublicContext, tmp_path: Path) -> World:
    server = Signer.generate("server")
    clients = [Signer.generate(f"client-{i}") for i in range(3)]
    authority = _make_authority(secret, server, clients, tmp_path, Ledger(tmp_path / "ledger.jsonl"))
    return World(pub, authority, server, clients, tmp_path)


def _weights(rng: np.random.Generator, n: int, k: int, w_min: float = 0.02) -> np.ndarray:
    return w_min + rng.dirichlet(np.ones(k), size=n) * (1 - k * w_min)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 12289])
def test_pack_unpack_round_trip(n: int) -> None:
    values = np.random.default_rng(n).normal(size=n)
    chunks = pack(values, 4096)
    assert len(chunks) == -(-n // 4096) and all(len(c) <= 4096 for c in chunks)
    assert np.array_equal(unpack(chunks, n), values)
    with pytest.raises(ValueError):
        unpack(chunks, n + 1)


def test_encrypted_packing_round_trip_100k(secret: ts.Context, pub: PublicContext) -> None:
    values = np.random.default_rng(0).uniform(-R, R, 100_000)
    vectors = encrypt_packed(pub.context, values)
    assert len(vectors) == 25  # ceil(100000 / 4096)
    restored = decrypt_packed([ts.ckks_vector_from(secret, v.serialize()) for v in vectors], len(values))
    assert np.max(np.abs(restored - values)) < 1e-6


# ---------------------------------------------------------------- fusion


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        (np.full((4, 3), 1 / 3), "shape"),
        (np.where(np.eye(4, 2) > 0, np.nan, 0.5), "NaN"),
        (np.full((4, 2), 0.6), "sum to 1"),
        (np.tile([0.95, 0.05], (4, 1)), "below the floor"),
        (np.tile([1.2, -0.2], (4, 1)), "below the floor"),
    ],
)
def test_weight_validation(weights: np.ndarray, reason: str) -> None:
    assert validate_weights(np.full((4, 2), 0.5), 4, 2, 0.1).shape == (4, 2)
    with pytest.raises(WeightError, match=reason):
        validate_weights(weights, 4, 2, 0.1)


def test_missing_client_renormalisation(world: World) -> None:
    rng = np.random.default_rng(1)
    n = 300
    weights = _weights(rng, n, 3)
    present = [True, False, True]
    kept = renormalise(weights, present)
    assert np.allclose(kept.sum(axis=1), 1.0) and np.all(kept >= weights[:, [0, 2]])
    scores = [rng.uniform(-R, R, n) for _ in range(2)]
    payloads = world.payloads(scores, clients=[world.clients[0], world.clients[2]])
    released = world.release(*world.request(payloads, kept))
    assert np.max(np.abs(released - insecure_plaintext_fusion(scores, kept))) < 1e-4
    with pytest.raises(WeightError, match="no client"):
        renormalise(weights, [False] * 3)
    with pytest.raises(WeightError, match="no weight left"):
        renormalise(np.tile([1.0, 0.0, 0.0], (2, 1)), [False, True, True])


# ---------------------------------------------------------------- signed replies


def test_reply_round_trip_and_statement(world: World) -> None:
    scores = np.linspace(-2 * R, 2 * R, 5000)  # clipped to [-R, R] by the client
    (payload,) = world.payloads([scores], clients=[world.clients[0]])
    reply = parse_reply(payload, world.pub, world.registry, world.expected(5000))
    assert reply.client_id == "client-0" and len(reply.ciphertexts) == 2
    assert all(not v.context().is_private() for v in reply.ciphertexts)
    statement = parse_statement(reply.statement.raw, world.registry, world.pub.fingerprint, world.expected(5000))
    assert statement == reply.statement and len(statement.raw) < 1000
    assert payload.startswith(statement.raw)


def test_forged_reply_signature_is_refused(world: World) -> None:
    (payload,) = world.payloads([np.zeros(10)], clients=[Signer.generate("client-0")])  # impostor key
    with pytest.raises(PayloadError, match="signature of client 'client-0' does not verify"):
        parse_reply(payload, world.pub, world.registry)
    (payload,) = world.payloads([np.zeros(10)], clients=[Signer.generate("mallory")])
    with pytest.raises(PayloadError, match="unknown client"):
        parse_reply(payload, world.pub, world.registry)


def test_tampered_reply_is_refused(world: World) -> None:
    (payload,) = world.payloads([np.zeros(10)], clients=[world.clients[0]])
    ct_byte = bytearray(payload)
    ct_byte[-100] ^= 0x01
    with pytest.raises(PayloadError, match="does not match its digest"):
        parse_reply(bytes(ct_byte), world.pub, world.registry)
    header = payload.replace(b'"step":0', b'"step":7')
    with pytest.raises(PayloadError, match="signature"):
        parse_reply(header, world.pub, world.registry)
    with pytest.raises(PayloadError, match="body is"):
        parse_reply(payload + b"\x00", world.pub, world.registry)


def test_reply_for_another_step_or_nonce_is_refused(world: World) -> None:
    (payload,) = world.payloads([np.zeros(10)], clients=[world.clients[0]])
    for other in (
        Expected(RUN, world.step + 1, world.nonce, "reward", 10),
        Expected(RUN, world.step, new_nonce(), "reward", 10),
        Expected("run-2", world.step, world.nonce, "reward", 10),
        Expected(RUN, world.step, world.nonce, "router_gradient", 10),
        Expected(RUN, world.step, world.nonce, "reward", 11),
    ):
        with pytest.raises(PayloadError, match="expected"):
            parse_reply(payload, world.pub, world.registry, other)


def test_foreign_context_is_refused(world: World) -> None:
    foreign = public_context_of(create_secret_context())
    payload = seal_reply(
        world.clients[0],
        foreign,
        run_id=RUN,
        step=0,
        nonce=world.nonce,
        purpose="reward",
        scores=np.zeros(10),
        value_bound=R,
    )
    with pytest.raises(PayloadError, match="foreign context"):
        parse_reply(payload, world.pub, world.registry)


def test_oversized_and_wrongly_sized_replies_are_refused(world: World) -> None:
    (payload,) = world.payloads([np.zeros(5000)], clients=[world.clients[0]])
    with pytest.raises(PayloadError, match="oversized message"):
        parse_reply(payload, world.pub, world.registry, limits=WireLimits(max_message_bytes=len(payload) - 1))
    with pytest.raises(PayloadError, match="oversized header"):
        parse_reply(payload, world.pub, world.registry, limits=WireLimits(max_header_bytes=100))
    client = world.clients[0]
    vectors = encrypt_packed(world.pub.context, np.zeros(10))
    header = {
        "client_id": client.party,
        "context": world.pub.fingerprint,
        "n_scores": 20,
        "nonce": world.nonce,
        "purpose": "reward",
        "run_id": RUN,
        "step": 0,
    }
    short = _frame(client, b"SMRC", header, [v.serialize() for v in vectors])  # claims 20 values, holds 10
    with pytest.raises(PayloadError, match="holds 10 values"):
        parse_reply(short, world.pub, world.registry)
    two = _frame(client, b"SMRC", {**header, "n_scores": 10}, [vectors[0].serialize()] * 2)
    with pytest.raises(PayloadError, match="expected 1 body sections"):
        parse_reply(two, world.pub, world.registry)
    garbage = _frame(client, b"SMRC", {**header, "n_scores": 10}, [b"\x00" * 1000])  # signed garbage
    with pytest.raises(PayloadError, match="does not deserialize"):
        parse_reply(garbage, world.pub, world.registry)


def _signed_raw(signer: Signer, raw_header: bytes, body: bytes = b"") -> bytes:
    signed = b"SMRC\x01" + len(raw_header).to_bytes(4, "big") + raw_header
    return signed + signer.sign(signed) + body


@pytest.mark.parametrize(
    ("raw_header", "reason"),
    [
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        (b'{"a":1,"a":2}', "not valid JSON"),
        (b'{"a":NaN}', "not valid JSON"),
        (b'{"a":1e400}', "not canonical"),
        (b'{"b":1, "a":2}', "not canonical"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"a":1}', "header fields differ"),
    ],
)
def test_malformed_signed_headers_are_refused(world: World, raw_header: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        parse_reply(_signed_raw(world.clients[0], raw_header), world.pub, world.registry)


def test_mistyped_header_fields_are_refused(world: World) -> None:
    header = {
        "client_id": "client-0",
        "context": world.pub.fingerprint,
        "n_scores": 1,
        "nonce": world.nonce,
        "purpose": "reward",
        "run_id": RUN,
        "sections": [],
        "step": 0,
    }
    for key, value in [
        ("step", True),
        ("step", -1),
        ("n_scores", 0),
        ("nonce", "XYZ"),
        ("purpose", "other"),
        ("client_id", "../etc"),
        ("sections", [[1, "nothex"]]),
        ("n_scores", 1.0),
    ]:
        raw = canonical_json({**header, key: value})
        with pytest.raises(PayloadError, match=f"field '{key}'"):
            parse_reply(_signed_raw(world.clients[0], raw), world.pub, world.registry)


# ---------------------------------------------------------------- key authority


def test_blinded_release_precision_and_ledger(world: World) -> None:
    rng = np.random.default_rng(2)
    n = 5000
    scores = [rng.uniform(-R, R, n) for _ in range(3)]
    scores[0][:10] = R
    scores[1][:10] = -R
    weights = _weights(rng, n, 3)
    request, mask = world.request(world.payloads(scores), weights)
    raw = parse_response(world.authority.decrypt(request), world.authority.signer.public_key_hex, request)
    assert np.array_equal(raw * 2**17, np.rint(raw * 2**17))  # rounded to the documented grid
    assert np.max(np.abs(raw)) > 1e6  # the authority only saw masked values
    error = Blinder.unblind(raw, mask) - insecure_plaintext_fusion(scores, weights)
    assert np.max(np.abs(error)) < 1e-4
    assert 2e-6 < np.std(error) < 3e-5  # flooded, not raw
    (entry,) = Ledger(world.state_dir / "ledger.jsonl").entries()
    assert entry["kind"] == KIND_REWARD_RELEASE and entry["epsilon"] == 0.0
    assert entry["details"]["contributors"] == ["client-0", "client-1", "client-2"]
    assert entry["details"]["count"] == n and entry["details"]["precision"] == 2.0**-17
    assert entry["details"]["mode"] == "blinded" and entry["accountant"] == "none (post-processing)"
    assert verify_ledger(world.state_dir / "ledger.jsonl", {"authority": _AUTHORITY_KEY.public_key_hex}).ok


def test_rederive_release_and_router_gradient_sum(world: World) -> None:
    rng = np.random.default_rng(3)
    scores = [rng.uniform(-R, R, 700) for _ in range(3)]
    weights = _weights(rng, 700, 3)
    released = world.release(*world.request(world.payloads(scores), weights, rederive=True))
    assert np.max(np.abs(released - insecure_plaintext_fusion(scores, weights))) < 1e-4
    world.next_step()
    payloads = world.payloads(scores, purpose="router_gradient")
    released = world.release(*world.request(payloads, None, purpose="router_gradient"))
    assert np.max(np.abs(released - insecure_plaintext_fusion(scores, None))) < 1e-4
    kinds = [e["kind"] for e in Ledger(world.state_dir / "ledger.jsonl").entries()]
    assert kinds == [KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE]


def test_replayed_nonce_is_refused_even_after_restart(world: World, secret: ts.Context) -> None:
    scores = [np.ones(50)] * 3
    request, mask = world.request(world.payloads(scores), np.full((50, 3), 1 / 3))
    world.release(request, mask)
    with pytest.raises(PolicyError, match="replayed nonce"):
        world.authority.decrypt(request)
    key = save_secret_context(secret, world.state_dir / "authority.ckks", "pw", ScryptParams(n=2**12))
    restarted = KeyAuthority.open(
        key,
        "pw",
        world.authority.signer,
        clients=world.registry,
        server_public_key=world.server.public_key_hex,
        state_dir=world.state_dir,
    )
    with pytest.raises(PolicyError, match="replayed nonce"):
        restarted.decrypt(request)
    world.nonce = new_nonce()  # a fresh nonce for the same step: stale
    request, _ = world.request(world.payloads(scores), np.full((50, 3), 1 / 3))
    with pytest.raises(PolicyError, match="stale step"):
        restarted.decrypt(request)


def test_too_few_or_duplicate_contributors_are_refused(world: World, secret: ts.Context) -> None:
    payloads = world.payloads([np.ones(20)] * 2, clients=world.clients[:2])
    strict = _make_authority(secret, world.server, world.clients, world.state_dir / "strict", k_min=3)
    request, _ = world.request(payloads, np.full((20, 2), 0.5))
    with pytest.raises(PolicyError, match="too few contributors: 2 < k_min=3"):
        strict.decrypt(request)
    request, _ = world.request([payloads[0], payloads[0]], np.full((20, 2), 0.5))
    with pytest.raises(PolicyError, match="duplicate contributors"):
        world.authority.decrypt(request)


def test_invalid_weights_are_refused(world: World) -> None:
    replies = world.replies(world.payloads([np.ones(20)] * 3))
    statements = [r.statement.raw for r in replies]
    fused = fuse(world.pub.context, [r.ciphertexts for r in replies], np.full((20, 3), 1 / 3))
    for weights, reason in [
        (np.tile([0.995, 0.0025, 0.0025], (20, 1)), "below the floor"),
        (np.full((20, 3), 0.4), "sum to 1"),
        (np.where(np.eye(20, 3) > 0, np.inf, 1 / 3), "NaN or infinity"),
    ]:
        with pytest.raises(PolicyError, match=reason):
            world.authority.decrypt(world.build(statements, weights, fused))
    with pytest.raises(PolicyError, match="needs the router weights"):
        world.authority.decrypt(world.build(statements, None, replies[0].ciphertexts))
    gradient = world.replies(world.payloads([np.ones(20)] * 3, purpose="router_gradient"), "router_gradient")
    statements = [r.statement.raw for r in gradient]
    request = world.build(statements, np.full((20, 3), 1 / 3), fused, "router_gradient")
    with pytest.raises(PolicyError, match="takes no weights"):
        world.authority.decrypt(request)


def test_forged_or_mismatched_statements_are_refused(world: World) -> None:
    payloads = world.payloads([np.ones(20)] * 3)
    forged = bytearray(payloads[2])
    forged[_statement_len(payloads[2]) - 1] ^= 1  # last signature byte
    replies = world.replies(payloads)
    statements = [r.statement.raw for r in replies]
    weights = np.full((20, 3), 1 / 3)
    fused = fuse(world.pub.context, [r.ciphertexts for r in replies], weights)
    with pytest.raises(PolicyError, match="statement 2 does not verify: signature"):
        forged_statement = bytes(forged[: _statement_len(payloads[2])])
        world.authority.decrypt(world.build([*statements[:2], forged_statement], weights, fused))
    with pytest.raises(PolicyError, match="statement 0 does not verify: .*nonce"):
        world.authority.decrypt(world.build(statements, weights, fused, nonce=new_nonce()))


def test_requests_from_outsiders_or_other_contexts_are_refused(world: World) -> None:
    payloads = world.payloads([np.ones(20)] * 3)
    world.server = Signer.generate("server")  # not the key the authority knows
    request, _ = world.request(payloads, np.full((20, 3), 1 / 3))
    with pytest.raises(PayloadError, match="signature of the server"):
        world.authority.decrypt(request)
    world.pub = public_context_of(create_secret_context())
    vectors = encrypt_packed(world.pub.context, np.ones(20))
    request = world.build([p[: _statement_len(p)] for p in payloads], np.full((20, 3), 1 / 3), vectors)
    with pytest.raises(PayloadError, match="foreign context"):
        world.authority.decrypt(request)


def test_rederive_refuses_a_submission_that_is_not_the_fusion(world: World) -> None:
    scores = [np.full(30, 1.0), np.full(30, 2.0), np.full(30, 3.0)]
    payloads = world.payloads(scores)
    replies = world.replies(payloads)
    claimed = np.full((30, 3), 1 / 3)
    mostly_first = np.tile([0.98, 0.01, 0.01], (30, 1))
    fused = fuse(world.pub.context, [r.ciphertexts for r in replies], mostly_first)
    request = world.build([r.statement.raw for r in replies], claimed, fused, payloads=payloads)
    with pytest.raises(PolicyError, match=r"not sum_k W ct_k"):
        world.authority.decrypt(request)


def test_out_of_range_decryption_is_not_released(world: World) -> None:
    replies = world.replies(world.payloads([np.ones(20)] * 3))
    weights = np.full((20, 3), 1 / 3)
    crafted = fuse(world.pub.context, [encrypt_packed(world.pub.context, np.full(20, 1e12))] * 3, weights)
    request = world.build([r.statement.raw for r in replies], weights, crafted)
    with pytest.raises(PolicyError, match="out of range"):
        world.authority.decrypt(request)
    with pytest.raises(PolicyError, match="replayed"):  # the nonce was burned before decryption
        world.authority.decrypt(request)


def test_response_is_bound_to_its_request_and_the_authority(world: World) -> None:
    request, _ = world.request(world.payloads([np.ones(20)] * 3), np.full((20, 3), 1 / 3))
    response = world.authority.decrypt(request)
    with pytest.raises(PayloadError, match="different request"):
        parse_response(response, _AUTHORITY_KEY.public_key_hex, request + b"x")
    with pytest.raises(PayloadError, match="signature of the key authority"):
        parse_response(response, Signer.generate("authority").public_key_hex, request)


# ---------------------------------------------------------------- noise flooding and blinding


def test_flooding_dominates_the_measured_decryption_error() -> None:
    config = ReleaseConfig()
    fresh, fused, masked = measure_decryption_error(n=4096)
    assert fused.max_abs < 1e-7 and config.flood_sigma > 1000 * fused.std  # >> secret-dependent error
    assert config.flood_sigma > 5 * masked.std
    worst = masked.max_abs + config.flood_clip * config.flood_sigma + config.precision / 2
    assert worst < 1e-4, f"worst-case release error {worst:.3g} exceeds the 1e-4 budget"
    assert fresh.max_abs < 1e-7


def test_blinded_view_is_independent_of_the_rewards(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = pytest.importorskip("scipy.stats")
    seen: list[np.ndarray] = []  # exactly what the authority decrypts, before flooding
    flood = authority_module.flood_and_round

    def spy(values: np.ndarray, config: ReleaseConfig) -> np.ndarray:
        seen.append(values.copy())
        return flood(values, config)

    monkeypatch.setattr(authority_module, "flood_and_round", spy)
    n, trials = 2048, 5
    constant = [np.full(n, R)] * 2  # fused value R everywhere
    ramp = [np.linspace(-R, R, n)] * 2  # fused values spread over [-R, R]
    views = {}
    for name, scores in (("constant", constant), ("ramp", ramp)):
        start = len(seen)
        for _ in range(trials):
            world.next_step()
            payloads = world.payloads(scores, clients=world.clients[:2])
            world.release(*world.request(payloads, np.full((n, 2), 0.5)))
        views[name] = np.concatenate(seen[start:])
    a, b = views["constant"], views["ramp"]
    assert stats.ks_2samp(a, b).pvalue > 1e-4
    # What the authority saw is uncorrelated with the rewards and centred like the mask.
    rewards = np.tile(ramp[0], trials)
    assert abs(np.corrcoef(b, rewards)[0, 1]) < 5 / np.sqrt(len(b))
    spread = ReleaseConfig().mask_bound / np.sqrt(3 * len(a))
    assert abs(a.mean()) < 5 * spread and abs(b.mean()) < 5 * spread
    # Control: without the mask the same test tells the two reward vectors apart at once.
    assert stats.ks_2samp(np.full(len(a), R), rewards).pvalue < 1e-10

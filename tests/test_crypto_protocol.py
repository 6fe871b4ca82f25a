"""One GRPO step's cryptography: packing, signed masked replies, the key authority's own
fusion, its policy, and the attacks it must refuse (crafted ciphertexts, two W rows for one
item, replies of another step, mismatched items)."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from secure_mor.audits.verify import verify_ledger
from secure_mor.authority import key_authority as authority_module
from secure_mor.authority.key_authority import STATE_FILE, AuthorityPolicy, KeyAuthority, PolicyError, RowConflict
from secure_mor.crypto.blinding import MaskKey
from secure_mor.crypto.context import (
    ContextError,
    PublicContext,
    ScryptParams,
    context_statement,
    create_secret_context,
    public_context_of,
    save_secret_context,
    sign_public_context,
    verify_public_context,
)
from secure_mor.crypto.fusion import (
    WeightError,
    insecure_plaintext_fusion,
    renormalise,
    validate_weights,
)
from secure_mor.crypto.packing import decrypt_packed, encrypt_packed, pack, unpack
from secure_mor.crypto.params import ReleaseConfig, min_score_half_width, score_half_width
from secure_mor.crypto.release import measure_decryption_error
from secure_mor.crypto.signing import Signer, canonical_json
from secure_mor.crypto.wire import (
    VERSION,
    ClientReply,
    Expected,
    PayloadError,
    WireLimits,
    _frame,
    build_request,
    items_digest,
    new_nonce,
    parse_reply,
    parse_response,
    seal_reply,
)
from secure_mor.ledger import KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE, Ledger
from secure_mor.server.secure_round import RoundRefused, SecureRound

R = 10.0
RUN = "run-1"


@pytest.fixture(scope="module")
def secret() -> ts.Context:
    return create_secret_context()


@pytest.fixture(scope="module")
def pub(secret: ts.Context) -> PublicContext:
    return public_context_of(secret)


def digests(n: int, tag: str = "item") -> list[bytes]:
    """n distinct item digests (stand-ins for the prompts' digests)."""
    return [hashlib.sha256(f"{tag} {i}".encode()).digest() for i in range(n)]


def per_reply(items, replies: list) -> list[list[bytes]]:
    """Each contributor's item digests: one list for all (as every client saw the items alike),
    or already one per contributor."""
    return [list(items)] * len(replies) if isinstance(items[0], bytes) else [list(i) for i in items]


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
    mask_key: MaskKey = field(default_factory=MaskKey)

    @property
    def registry(self) -> dict[str, str]:
        return {c.party: c.public_key_hex for c in self.clients}

    def next_step(self) -> None:
        self.step += 1
        self.nonce = new_nonce()

    def expected(self, n: int, purpose: str = "reward") -> Expected:
        return Expected(RUN, self.step, self.nonce, purpose, n)

    def payloads(self, scores, purpose="reward", clients=None, items=None, run=RUN, query=None) -> list[bytes]:
        """What the clients send: masked with the round key, committing to the items (one list for
        all clients, or one per client) and, for a router gradient, to the query."""
        if items is None and purpose == "reward":
            items = digests(len(scores[0]))
        clients = clients or self.clients
        lists = [None] * len(clients) if items is None else per_reply(items, clients)
        return [
            seal_reply(c, self.pub, run_id=run, step=self.step, nonce=self.nonce, purpose=purpose, scores=s,
                       mask_key=self.mask_key.public_hex, items=i, query=query)
            for c, s, i in zip(clients, scores, lists, strict=True)
        ]  # fmt: skip

    def replies(self, payloads: list[bytes], purpose: str = "reward", run: str = RUN) -> list[ClientReply]:
        n = parse_reply(payloads[0], self.pub, self.registry).statement.n_scores
        expected = Expected(run, self.step, self.nonce, purpose, n)
        return [parse_reply(p, self.pub, self.registry, expected) for p in payloads]

    def rounds(self, run: str = RUN) -> SecureRound:
        """The server's side, as GRPO scoring and router training use it."""
        return SecureRound(self.pub, self.server, self.registry, [c.party for c in self.clients],
                           self.authority.signer.public_key_hex, run, self.authority.policy.w_min,
                           self.authority.decrypt, mask_key=self.mask_key)  # fmt: skip

    def release(self, payloads, weights, purpose="reward", items=None, run=RUN) -> np.ndarray:
        replies = self.replies(payloads, purpose, run)
        n = replies[0].statement.n_scores
        if items is None and purpose == "reward":
            items = digests(n)
        lists = None if weights is None else per_reply(items, replies)
        return self.rounds(run).release(replies, weights, purpose, self.step, self.nonce, lists)

    def build(self, replies: list[bytes], weights, purpose="reward", items=None, nonce=None, n=None,
              run=RUN) -> bytes:
        """A decryption request as a (possibly deviating) server would sign it."""
        n = n or parse_reply(replies[0], self.pub, self.registry).statement.n_scores
        if items is None and weights is not None:
            items = digests(n)
        lists = None if items is None else per_reply(items, replies)
        return build_request(self.server, self.pub, run_id=run, step=self.step, nonce=nonce or self.nonce,
                             purpose=purpose, n_scores=n, replies=replies, weights=weights, items=lists)  # fmt: skip


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


@pytest.fixture
def decryptions(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Every value vector the key authority decrypts, as it decrypts it (before flooding)."""
    seen: list[np.ndarray] = []
    decrypt = authority_module.decrypt_fused

    def spy(secret, fused):
        seen.append(decrypt(secret, fused))
        return seen[-1]

    monkeypatch.setattr(authority_module, "decrypt_fused", spy)
    return seen


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
    released = world.release(world.payloads(scores, clients=[world.clients[0], world.clients[2]]), kept)
    assert np.max(np.abs(released - insecure_plaintext_fusion(scores, kept))) < 1e-4
    with pytest.raises(WeightError, match="no client"):
        renormalise(weights, [False] * 3)
    with pytest.raises(WeightError, match="no weight left"):
        renormalise(np.tile([1.0, 0.0, 0.0], (2, 1)), [False, True, True])


# ---------------------------------------------------------------- signed, masked replies


def test_reply_round_trip_masks_and_statement(world: World, secret: ts.Context) -> None:
    scores = np.linspace(-2 * R, 2 * R, 5000)  # clipped to [-R, R] by the client
    (payload,) = world.payloads([scores], clients=[world.clients[0]])
    reply = parse_reply(payload, world.pub, world.registry, world.expected(5000))
    assert reply.client_id == "client-0" and len(reply.ciphertexts) == 2 and reply.raw == payload
    assert all(not v.context().is_private() for v in reply.ciphertexts)
    statement = reply.statement
    assert payload.startswith(statement.raw) and len(statement.raw) < 1000
    assert statement.items == items_digest(digests(5000))
    # The ciphertexts hold clip(score) + mask, and only the server's round key re-derives the mask.
    secret_view = ts.ckks_vector_from(secret, reply.ciphertexts[0].serialize())
    held = np.asarray(secret_view.decrypt())
    mask = world.mask_key.mask(statement.blinding, statement.mask_context, 5000, ReleaseConfig().mask_bound)
    assert np.max(np.abs(held)) > 1e6
    assert np.max(np.abs(held - mask[:4096] - np.clip(scores[:4096], -R, R))) < 1e-5
    other = MaskKey().mask(statement.blinding, statement.mask_context, 5000, ReleaseConfig().mask_bound)
    assert np.min(np.abs(other - mask)) > 0 and np.corrcoef(other, mask)[0, 1] < 0.1


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
    payload = seal_reply(world.clients[0], foreign, run_id=RUN, step=0, nonce=world.nonce, purpose="reward",
                         scores=np.zeros(10), mask_key=world.mask_key.public_hex)  # fmt: skip
    with pytest.raises(PayloadError, match="foreign context"):
        parse_reply(payload, world.pub, world.registry)


def test_clients_take_only_a_public_context_the_authority_signed(world: World) -> None:
    """The server relays the authority's public context at setup; the clients verify the authority's
    signature over its fingerprint with the registry's authority key, so a context the server made
    itself (its fingerprint matches its bytes, and the server holds its secret key) is refused."""
    authority, key = world.authority, world.authority.signer.public_key_hex
    signature = authority.context_signature
    verified = verify_public_context(world.pub.data, world.pub.fingerprint, signature, key)
    assert verified.fingerprint == world.pub.fingerprint
    own = public_context_of(create_secret_context())  # the server's own context, and its fingerprint
    with pytest.raises(ContextError, match="not signed by the key authority"):  # under the authority's signature
        verify_public_context(own.data, own.fingerprint, signature, key)
    stranger = Signer.generate("authority")  # signed properly, by a key that is not the registry's authority key
    with pytest.raises(ContextError, match="not signed by the key authority"):
        verify_public_context(own.data, own.fingerprint, sign_public_context(stranger, own), key)
    with pytest.raises(ContextError, match="fingerprint"):  # the authority's fingerprint over other bytes
        verify_public_context(own.data, world.pub.fingerprint, signature, key)
    # Domain separation: the authority's signature over anything but this statement is no context signature.
    for message in (world.pub.fingerprint.encode(), bytes.fromhex(world.pub.fingerprint), b"", b"SMRA" + signature):
        with pytest.raises(ContextError, match="not signed by the key authority"):
            verify_public_context(world.pub.data, world.pub.fingerprint, authority.signer.sign(message), key)
    for bad in (b"", b"\x00" * 63, signature + b"\x00"):
        with pytest.raises(ContextError, match="not signed by the key authority"):
            verify_public_context(world.pub.data, world.pub.fingerprint, bad, key)
    with pytest.raises(ContextError, match="fingerprint"):
        context_statement(world.pub.fingerprint.upper())
    assert sign_public_context(authority.signer, world.pub) == signature  # one per context: no run in it


def _header(world: World, n: int, **fields) -> dict:
    return {"blinding": "ab" * 32, "client_id": world.clients[0].party, "context": world.pub.fingerprint,
            "items": None, "n_scores": n, "nonce": world.nonce, "purpose": "reward", "query": None, "run_id": RUN,
            "step": 0, **fields}  # fmt: skip


def test_oversized_and_wrongly_sized_replies_are_refused(world: World) -> None:
    (payload,) = world.payloads([np.zeros(5000)], clients=[world.clients[0]])
    with pytest.raises(PayloadError, match="oversized message"):
        parse_reply(payload, world.pub, world.registry, limits=WireLimits(max_message_bytes=len(payload) - 1))
    with pytest.raises(PayloadError, match="oversized header"):
        parse_reply(payload, world.pub, world.registry, limits=WireLimits(max_header_bytes=100))
    client = world.clients[0]
    vectors = encrypt_packed(world.pub.context, np.zeros(10))
    short = _frame(client, b"SMRC", _header(world, 20), [v.serialize() for v in vectors])  # claims 20, holds 10
    with pytest.raises(PayloadError, match="holds 10 values"):
        parse_reply(short, world.pub, world.registry)
    two = _frame(client, b"SMRC", _header(world, 10), [vectors[0].serialize()] * 2)
    with pytest.raises(PayloadError, match="expected 1 body sections"):
        parse_reply(two, world.pub, world.registry)
    garbage = _frame(client, b"SMRC", _header(world, 10), [b"\x00" * 1000])  # signed garbage
    with pytest.raises(PayloadError, match="does not deserialize"):
        parse_reply(garbage, world.pub, world.registry)


def _signed_raw(signer: Signer, raw_header: bytes, body: bytes = b"") -> bytes:
    signed = b"SMRC" + bytes([VERSION]) + len(raw_header).to_bytes(4, "big") + raw_header
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
    header = {**_header(world, 1), "sections": []}
    for key, value in [
        ("step", True),
        ("step", -1),
        ("n_scores", 0),
        ("nonce", "XYZ"),
        ("purpose", "other"),
        ("client_id", "../etc"),
        ("sections", [[1, "nothex"]]),
        ("n_scores", 1.0),
        ("blinding", "00"),
        ("items", "not a digest"),
        ("query", "not a digest"),
    ]:
        raw = canonical_json({**header, key: value})
        with pytest.raises(PayloadError, match=f"field '{key}'"):
            parse_reply(_signed_raw(world.clients[0], raw), world.pub, world.registry)


def test_an_unusable_round_key_is_refused_by_the_client(world: World) -> None:
    for key in ("00" * 32, "not hex", "ab" * 16):  # a low-order point, garbage, a short key
        with pytest.raises(ValueError, match="round's mask key"):
            seal_reply(world.clients[0], world.pub, run_id=RUN, step=0, nonce=world.nonce, purpose="reward",
                       scores=np.ones(3), mask_key=key)  # fmt: skip


# ---------------------------------------------------------------- the key authority


def test_release_precision_masking_and_ledger(world: World, decryptions: list[np.ndarray]) -> None:
    rng = np.random.default_rng(2)
    n = 5000
    scores = [rng.uniform(-R, R, n) for _ in range(3)]
    scores[0][:10] = R
    scores[1][:10] = -R
    weights = _weights(rng, n, 3)
    released = world.release(world.payloads(scores), weights)
    (seen,) = decryptions
    assert np.max(np.abs(seen)) > 1e6  # the authority only ever decrypted masked values
    error = released - insecure_plaintext_fusion(scores, weights)
    assert np.max(np.abs(error)) < 1e-4
    assert 2e-6 < np.std(error) < 3e-5  # flooded, not raw
    (entry,) = Ledger(world.state_dir / "ledger.jsonl").entries()
    assert entry["kind"] == KIND_REWARD_RELEASE and entry["epsilon"] == 0.0
    details = entry["details"]
    assert details["contributors"] == ["client-0", "client-1", "client-2"]
    assert details["count"] == n and details["precision"] == 2.0**-17 and details["items_sha256"]
    assert details["max_weight"] == weights.max() and details["score_half_width"] > 0
    assert entry["accountant"] == "none (post-processing)"
    assert verify_ledger(world.state_dir / "ledger.jsonl", {"authority": _AUTHORITY_KEY.public_key_hex}).ok


QUERY = "ab" * 32  # a router-gradient query's digest (secure_mor.routing.GradientQuery.digest)


def test_router_gradient_sum(world: World) -> None:
    """A router step: the margin release, then the plain sum of the clients' terms over its items."""
    rng = np.random.default_rng(3)
    batch = digests(128, "pair")
    world.release(world.payloads([rng.uniform(-R, R, 128) for _ in range(3)], items=batch), np.full((128, 3), 1 / 3),
                  items=batch)  # fmt: skip
    scores = [rng.uniform(-R, R, 700) for _ in range(3)]
    world.nonce = new_nonce()
    payloads = world.payloads(scores, purpose="router_gradient", items=batch, query=QUERY)
    released = world.release(payloads, None, "router_gradient")
    assert np.max(np.abs(released - insecure_plaintext_fusion(scores, None))) < 1e-4
    kinds = [e["kind"] for e in Ledger(world.state_dir / "ledger.jsonl").entries()]
    assert kinds == [KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE]
    assert Ledger(world.state_dir / "ledger.jsonl").entries()[-1]["details"]["query_sha256"] == QUERY


def test_attack_router_gradients_must_answer_one_query_over_the_steps_margins(world: World, decryptions) -> None:
    """The server could send each client its own query (other features, coefficients, router) and
    read single clients' margins off the sum. The authority sums only the terms of the step's
    margin contributors, each over the items of its margins, all committing to one query."""
    batch = digests(64, "pair")
    terms = [np.ones(50)] * 3
    world.nonce = new_nonce()
    alone = world.payloads(terms, purpose="router_gradient", items=batch, query=QUERY)
    with pytest.raises(PolicyError, match="no margin release of step 0"):
        world.authority.decrypt(world.build(alone, None, "router_gradient"))
    world.next_step()
    world.release(world.payloads([np.ones(64)] * 3, items=batch), np.full((64, 3), 1 / 3), items=batch)
    world.nonce = new_nonce()
    other_query = world.payloads(terms, purpose="router_gradient", items=batch, query=QUERY)
    other_query[1] = world.payloads(terms[:1], purpose="router_gradient", clients=world.clients[1:2], items=batch,
                                    query="cd" * 32)[0]  # fmt: skip
    with pytest.raises(PolicyError, match="answer different queries"):
        world.authority.decrypt(world.build(other_query, None, "router_gradient"))
    no_query = world.payloads(terms, purpose="router_gradient", items=batch)
    with pytest.raises(PolicyError, match="answer different queries .or none."):
        world.authority.decrypt(world.build(no_query, None, "router_gradient"))
    other_items = world.payloads(terms, purpose="router_gradient", items=digests(64, "other"), query=QUERY)
    with pytest.raises(PolicyError, match="sums over other items than its margins of step 1"):
        world.authority.decrypt(world.build(other_items, None, "router_gradient"))
    two = world.payloads(terms[:2], purpose="router_gradient", clients=world.clients[:2], items=batch, query=QUERY)
    with pytest.raises(PolicyError, match="not those of the step's margins"):
        world.authority.decrypt(world.build(two, None, "router_gradient"))
    with pytest.raises(PolicyError, match="takes no weights or items"):
        world.authority.decrypt(world.build(other_items, np.full((50, 3), 1 / 3), "router_gradient"))
    assert len(decryptions) == 1  # the margins only
    world.release(world.payloads(terms, purpose="router_gradient", items=batch, query=QUERY), None, "router_gradient")
    with pytest.raises(PolicyError, match="a reward reply answers no router query"):
        world.next_step()
        world.authority.decrypt(world.build(world.payloads([np.ones(64)] * 3, query=QUERY), np.full((64, 3), 1 / 3)))


def test_replayed_nonce_is_refused_even_after_restart(world: World, secret: ts.Context) -> None:
    scores = [np.ones(50)] * 3
    request = world.build(world.payloads(scores), np.full((50, 3), 1 / 3))
    world.authority.decrypt(request)
    with pytest.raises(PolicyError, match="replayed nonce"):
        world.authority.decrypt(request)
    key = save_secret_context(secret, world.state_dir / "authority.ckks", "pw", ScryptParams(n=2**12))
    restarted = KeyAuthority.open(key, "pw", world.authority.signer, clients=world.registry,
                                  server_public_key=world.server.public_key_hex, state_dir=world.state_dir)
    with pytest.raises(PolicyError, match="replayed nonce"):
        restarted.decrypt(request)
    world.nonce = new_nonce()  # a fresh nonce for the same step: stale
    with pytest.raises(PolicyError, match="stale step"):
        restarted.decrypt(world.build(world.payloads(scores), np.full((50, 3), 1 / 3)))


def test_too_few_or_duplicate_contributors_are_refused(world: World, secret: ts.Context) -> None:
    payloads = world.payloads([np.ones(20)] * 2, clients=world.clients[:2])
    strict = _make_authority(secret, world.server, world.clients, world.state_dir / "strict", k_min=3)
    with pytest.raises(PolicyError, match="too few contributors: 2 < k_min=3"):
        strict.decrypt(world.build(payloads, np.full((20, 2), 0.5)))
    with pytest.raises(PolicyError, match="duplicate contributors"):
        world.authority.decrypt(world.build([payloads[0], payloads[0]], np.full((20, 2), 0.5)))


def test_invalid_weights_or_items_are_refused(world: World) -> None:
    payloads = world.payloads([np.ones(20)] * 3)
    for weights, reason in [
        (np.tile([0.995, 0.0025, 0.0025], (20, 1)), "below the floor"),
        (np.tile([0.97, 0.015, 0.015], (20, 1)), "below the floor"),  # the authority's 0.02, not 0.01
        (np.full((20, 3), 0.4), "sum to 1"),
        (np.where(np.eye(20, 3) > 0, np.inf, 1 / 3), "NaN or infinity"),
    ]:
        with pytest.raises(PolicyError, match=reason):
            world.authority.decrypt(world.build(payloads, weights))
    with pytest.raises(PolicyError, match="needs the router weights"):
        world.authority.decrypt(world.build(payloads, None))
    with pytest.raises(PolicyError, match="commits to other items"):
        world.authority.decrypt(world.build(payloads, np.full((20, 3), 1 / 3), items=digests(20, "other")))
    swapped = [digests(20), digests(20, "client-1's view"), digests(20)]  # client-1's list is not what it signed
    with pytest.raises(PolicyError, match="reply of 'client-1' commits to other items"):
        world.authority.decrypt(world.build(payloads, np.full((20, 3), 1 / 3), items=swapped))


def test_requests_from_outsiders_or_other_contexts_are_refused(world: World) -> None:
    payloads = world.payloads([np.ones(20)] * 3)
    server, world.server = world.server, Signer.generate("server")  # not the key the authority knows
    with pytest.raises(PayloadError, match="signature of the server"):
        world.authority.decrypt(world.build(payloads, np.full((20, 3), 1 / 3)))
    world.server = server
    foreign = public_context_of(create_secret_context())
    world.pub, pub = foreign, world.pub
    payloads = world.payloads([np.ones(20)] * 3)
    world.pub = pub
    request = build_request(world.server, foreign, run_id=RUN, step=0, nonce=world.nonce, purpose="reward",
                            n_scores=20, replies=payloads, weights=np.full((20, 3), 1 / 3), items=[digests(20)] * 3)
    with pytest.raises(PayloadError, match="foreign context"):
        world.authority.decrypt(request)


def test_a_client_out_of_range_is_not_released(world: World) -> None:
    """A client that encrypts values beyond R + M (it skipped the clipping): nothing is released."""
    client = world.clients[0]
    vectors = encrypt_packed(world.pub.context, np.full(20, 2.0**40))
    header = _header(world, 20, items=items_digest(digests(20)), blinding=MaskKey().public_hex)
    big = _frame(client, b"SMRC", header, [v.serialize() for v in vectors])
    others = world.payloads([np.ones(20)] * 2, clients=world.clients[1:])
    request = world.build([big, *others], np.full((20, 3), 1 / 3), n=20)
    with pytest.raises(PolicyError, match="out of range"):
        world.authority.decrypt(request)
    with pytest.raises(PolicyError, match="replayed"):  # the nonce was burned before decryption
        world.authority.decrypt(request)


def test_response_is_bound_to_its_request_and_the_authority(world: World) -> None:
    request = world.build(world.payloads([np.ones(20)] * 3), np.full((20, 3), 1 / 3))
    response = world.authority.decrypt(request)
    with pytest.raises(PayloadError, match="different request"):
        parse_response(response, _AUTHORITY_KEY.public_key_hex, request + b"x")
    with pytest.raises(PayloadError, match="signature of the key authority"):
        parse_response(response, Signer.generate("authority").public_key_hex, request)


def test_the_server_refuses_a_release_that_does_not_unmask(world: World) -> None:
    """Replies masked for another round key (a stale key, a mix-up) cannot be unmasked: refused."""
    scores = [np.ones(20)] * 3
    payloads = world.payloads(scores)
    world.mask_key = MaskKey()
    with pytest.raises(RoundRefused, match="does not unmask"):
        world.release(payloads, np.full((20, 3), 1 / 3))


# ---------------------------------------------------------------- noise flooding and masking


def test_flooding_dominates_the_measured_decryption_error() -> None:
    config = ReleaseConfig()
    fresh, fused, masked = measure_decryption_error(n=4096)
    assert fused.max_abs < 1e-7 and config.flood_sigma > 1000 * fused.std  # >> secret-dependent error
    assert config.flood_sigma > 5 * masked.std
    worst = masked.max_abs + config.flood_clip * config.flood_sigma + config.precision / 2 + config.mask_grid / 2
    assert worst < 1e-4, f"worst-case release error {worst:.3g} exceeds the 1e-4 budget"
    assert fresh.max_abs < 1e-7


def test_what_the_authority_decrypts_is_independent_of_the_rewards(world: World, decryptions) -> None:
    stats = pytest.importorskip("scipy.stats")
    n, trials = 2048, 5
    constant = [np.full(n, R)] * 2  # fused value R everywhere
    ramp = [np.linspace(-R, R, n)] * 2  # fused values spread over [-R, R]
    views = {}
    for name, scores in (("constant", constant), ("ramp", ramp)):
        start = len(decryptions)
        for _ in range(trials):
            world.next_step()
            world.release(world.payloads(scores, clients=world.clients[:2], items=digests(n, f"{name} {world.step}")),
                          np.full((n, 2), 0.5), items=digests(n, f"{name} {world.step}"))  # fmt: skip
        views[name] = np.concatenate(decryptions[start:])
    a, b = views["constant"], views["ramp"]
    assert stats.ks_2samp(a, b).pvalue > 1e-4
    # What the authority saw is uncorrelated with the rewards and centred like the masks.
    rewards = np.tile(ramp[0], trials)
    assert abs(np.corrcoef(b, rewards)[0, 1]) < 5 / np.sqrt(len(b))
    spread = ReleaseConfig().mask_bound / np.sqrt(6 * len(a))  # the mean of two masks, each uniform on +-M
    assert abs(a.mean()) < 5 * spread and abs(b.mean()) < 5 * spread
    # Control: without the masks the same test tells the two reward vectors apart at once.
    assert stats.ks_2samp(np.full(len(a), R), rewards).pvalue < 1e-10


def test_what_a_client_encrypts_lies_on_the_mask_grid(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mask is a multiple of 2^(mask_bits - 52) = 2^-20 (53 random bits over [-M, M]). A score off that
    grid would show through: (v + m) mod 2^-20 = v mod 2^-20. So clients round to the grid first, and the
    masked value's distribution is a pure shift of the mask's: TV <= |v - v'| / 2M holds exactly."""
    from secure_mor.crypto import wire

    encrypted: list[np.ndarray] = []
    encrypt = wire.encrypt_packed
    monkeypatch.setattr(wire, "encrypt_packed", lambda ctx, values: encrypted.append(values) or encrypt(ctx, values))
    grid = ReleaseConfig().mask_grid
    assert grid == 2.0**-20
    scores = np.array([grid / 2, grid / 4, np.pi, -R, R, 3 * grid, -grid / 3])
    world.payloads([scores], clients=[world.clients[0]])
    (values,) = encrypted
    assert np.all(np.mod(values, grid) == 0)
    mask = values - np.rint(scores / grid) * grid
    assert np.all(np.mod(mask, grid) == 0) and np.max(np.abs(mask)) > 1e6


# ---------------------------------------------------------------- attacks (all through the public API)


def _crafted_vector(ctx: ts.Context, c0: int, c1: int, n: int) -> ts.CKKSVector:
    """The CKKS 'ciphertext' (c0, c1) with constant polynomials, at the fresh level and scale:
    (0, Delta) decrypts to Delta * s, i.e. the canonical embedding of the secret key s."""
    template = ts.ckks_vector(ctx, [0.0] * n)
    ct = template.ciphertext()[0]
    degree, count = ct.poly_modulus_degree(), ct.coeff_modulus_size()
    primes = [m.value() for m in ctx.seal_context().data.get_context_data(ct.parms_id()).parms().coeff_modulus()]
    polys = [np.concatenate([np.full(degree, value % q, dtype="<u8") for q in primes]) for value in (c0, c1)]
    coefficients = np.concatenate(polys).tobytes()  # NTT form of a constant polynomial: the constant

    def seal_header(size: int) -> bytes:  # SEAL 4.x serialization header, no compression
        return struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, 0, 0, size)

    data = seal_header(24 + len(coefficients)) + struct.pack("<Q", 2 * degree * count) + coefficients
    members = struct.pack("<4Q", *ct.parms_id()) + b"\x01" + struct.pack("<QQQdQ", 2, degree, count, ct.scale, 1)
    seal = seal_header(16 + len(members) + len(data)) + members + data
    return ts.ckks_vector_from(ctx, _replace_field(template.serialize(), 2, seal))


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        value, shift, i = value | (data[i] & 0x7F) << shift, shift + 7, i + 1
        if not data[i - 1] & 0x80:
            return value, i


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _replace_field(message: bytes, number: int, payload: bytes) -> bytes:
    """A protobuf message (TenSEAL's CKKSVector: the SEAL ciphertext is field 2) with one
    length-delimited field's bytes replaced."""
    out, i = bytearray(), 0
    while i < len(message):
        tag, j = _varint(message, i)
        kind = tag & 7
        if kind == 2:
            length, k = _varint(message, j)
            end = k + length
            out += message[i:end] if tag >> 3 != number else message[i:j] + _encode_varint(len(payload)) + payload
        else:
            end = j + 8 if kind == 1 else _varint(message, j)[1]  # fixed64 (the scale) or a varint
            out += message[i:end]
        i = end
    return bytes(out)


def test_attack_the_crafted_key_recovery_ciphertext_is_never_decrypted(
    world: World, secret: ts.Context, decryptions: list[np.ndarray]
) -> None:
    """(c0, c1) = (0, Delta) decrypts to the secret key's canonical embedding (within +-192): one such
    decryption would give the server the key. The request has no place for a ciphertext of the
    server's, and a client's reply carrying it does not verify."""
    crafted = _crafted_vector(world.pub.context, 0, int(world.pub.context.global_scale), 20)
    key_view = np.asarray(ts.ckks_vector_from(secret, crafted.serialize()).decrypt())
    assert 10 < np.max(np.abs(key_view)) < 300  # it is the key: small, inside any range check
    payloads = world.payloads([np.ones(20)] * 3)
    weights = np.full((20, 3), 1 / 3)
    statement_length = len(parse_reply(payloads[0], world.pub, world.registry).statement.raw)
    # 1. in place of client-0's ciphertext, under client-0's signed statement
    swapped = payloads[0][:statement_length] + crafted.serialize()
    with pytest.raises(PolicyError, match="client reply 0 does not verify: .*body is|digest"):
        world.authority.decrypt(world.build([swapped, *payloads[1:]], weights, n=20))
    # 2. as a reply the server signs in client-0's name, or in its own
    header = _header(world, 20, items=items_digest(digests(20)), blinding=MaskKey().public_hex)
    for signer in (world.server, Signer("client-0", world.server.private_key)):
        forged = _frame(signer, b"SMRC", {**header, "client_id": signer.party}, [crafted.serialize()])
        with pytest.raises(PolicyError, match="unknown client|signature of client"):
            world.authority.decrypt(world.build([forged, *payloads[1:]], weights, n=20))
    # 3. the old request layout, signed by the server: a "fused" ciphertext of its own after the replies
    header = {"context": world.pub.fingerprint, "contributors": 3, "n_scores": 20, "nonce": world.nonce,
              "purpose": "reward", "run_id": RUN, "step": world.step, "weights": [20, 3]}  # fmt: skip
    described = [np.ascontiguousarray(weights, "<f8").tobytes(), b"".join(digests(20))]
    legacy = _frame(world.server, b"SMRQ", header, [*described, *payloads, crafted.serialize()])
    with pytest.raises(PayloadError, match="expected 5 body sections, header lists 6"):
        world.authority.decrypt(legacy)
    assert decryptions == []  # nothing at all was decrypted
    # The honest request of the same round still goes through (nothing above burned its nonce).
    assert np.max(np.abs(world.release(payloads, weights) - 1.0)) < 1e-4


def test_attack_one_item_under_two_w_rows_is_refused(world: World, decryptions) -> None:
    """Placing one item (here: one prompt) in two rows with different W rows gives the server two
    equations in its scores; K such rows give every client's score. Refused, within a release and
    against earlier releases in the context."""
    n = 6
    items = digests(n)
    twice = [*items[:5], items[0]]  # item 0 appears again as row 5
    payloads = world.payloads([np.arange(n, dtype=float)] * 3, items=twice)
    weights = np.full((n, 3), 1 / 3)
    weights[5] = [0.5, 0.3, 0.2]
    with pytest.raises(PolicyError, match="item 5 .* another W row"):
        world.authority.decrypt(world.build(payloads, weights, items=twice))
    weights[5] = 1 / 3  # the same row twice: allowed (an answer repeated by the policy)
    world.next_step()
    world.release(world.payloads([np.arange(n, dtype=float)] * 3, items=twice), weights, items=twice)
    # A later round: prompt 0 under another row is refused; under its own row it is fine.
    world.next_step()
    again = [items[0], *digests(n - 1, "new")]
    later = np.full((n, 3), 1 / 3)
    later[0] = [0.6, 0.2, 0.2]
    with pytest.raises(PolicyError, match="item 0 .* another W row"):
        world.authority.decrypt(world.build(world.payloads([np.ones(n)] * 3, items=again), later, items=again))
    world.next_step()
    later[0] = 1 / 3
    world.release(world.payloads([np.ones(n)] * 3, items=again), later, items=again)
    # ... also with a client missing: renormalised over two clients, the row is another row
    world.next_step()
    two = world.payloads([np.ones(n)] * 2, clients=world.clients[:2], items=again)
    with pytest.raises(PolicyError, match="item 0 .* another W row"):
        world.authority.decrypt(world.build(two, np.full((n, 2), 0.5), items=again))
    assert len(decryptions) == 2  # only the two allowed releases


def test_attack_another_run_id_gives_an_item_no_second_row(world: World, secret: ts.Context, decryptions) -> None:
    """Run ids are the server's: one row per item holds for the life of the context, over every
    run id and across restarts (else K run ids, K rows: every client's score; review e2)."""
    item = digests(1, "prompt")
    rows = np.full((3, 3), 0.02) + np.eye(3) * 0.94
    world.release(world.payloads([np.ones(1)] * 3, items=item, run="run-A"), rows[:1], items=item, run="run-A")
    for run in ("run-A", "run-B"):
        world.next_step()
        with pytest.raises(RowConflict, match="item 0 was fused before in this context with another W row"):
            world.authority.decrypt(world.build(world.payloads([np.ones(1)] * 3, items=item, run=run), rows[1:2],
                                                items=item, run=run))  # fmt: skip
    restarted = _make_authority(secret, world.server, world.clients, world.state_dir)
    with pytest.raises(RowConflict):
        restarted.decrypt(world.build(world.payloads([np.ones(1)] * 3, items=item, run="run-C"), rows[2:3],
                                      items=item, run="run-C"))  # fmt: skip
    world.next_step()  # the same row again, under any run id, is the same equation: released
    world.release(world.payloads([np.ones(1)] * 3, items=item, run="run-B"), rows[:1], items=item, run="run-B")
    assert len(decryptions) == 2


def test_attack_an_item_one_client_tells_apart_and_another_does_not(world: World, decryptions) -> None:
    """Prompts that client-0 and client-1 read alike and client-2 does not (e.g. a respelling only
    client-2's tokenizer keeps) would give the server client-2's score differences, even under one
    row. An item is all its contributors' digests: one shared digest, all equal, or refused."""
    same, apart = digests(2, "read alike"), digests(2, "read apart")
    views = [[same[0], same[0]], [same[1], same[1]], apart]  # items 0 and 1, per client
    payloads = world.payloads([np.ones(2)] * 3, items=views)
    with pytest.raises(RowConflict, match="item 1 .* as another item"):
        world.authority.decrypt(world.build(payloads, np.full((2, 3), 1 / 3), items=views))
    world.next_step()  # item 0 alone is new: released; the pair's second item, in a later round, is not
    first = [[d[0]] for d in views]
    world.release(world.payloads([np.ones(1)] * 3, items=first), np.full((1, 3), 1 / 3), items=first)
    world.next_step()
    second = [[d[1]] for d in views]
    with pytest.raises(RowConflict):
        world.authority.decrypt(world.build(world.payloads([np.ones(1)] * 3, items=second), np.full((1, 3), 1 / 3),
                                            items=second))  # fmt: skip
    assert len(decryptions) == 1


def test_the_documented_half_width_is_the_narrowest_one_release_gives(world: World) -> None:
    """A row over k_min contributors can give one of them 1 - (k_min - 1) w_min (an honest dropout
    renormalises to about that): the bound is at K = k_min, 0.204 at the defaults (review e2)."""
    policy = world.authority.policy
    h = min_score_half_width(policy.w_min, policy.k_min, R)
    assert h == pytest.approx(0.2041, abs=1e-4)
    row = np.array([[1 - policy.w_min, policy.w_min]])
    world.release(world.payloads([np.ones(1)] * 2, clients=world.clients[:2]), row)
    (entry,) = Ledger(world.state_dir / "ledger.jsonl").entries()
    assert entry["details"]["score_half_width"] == pytest.approx(h)
    rng = np.random.default_rng(0)
    for k in range(policy.k_min, 6):  # no valid row over k >= k_min contributors is narrower
        w = _weights(rng, 1000, k, policy.w_min)
        assert np.min([score_half_width(m, R) for m in w.max(axis=1)]) >= h - 1e-12
    world.next_step()
    with pytest.raises(PolicyError, match="below the floor"):
        world.authority.decrypt(world.build(world.payloads([np.ones(1)] * 2, clients=world.clients[:2]),
                                            np.array([[0.981, 0.019]])))  # fmt: skip


def test_the_release_state_is_read_incrementally_and_bound_to_its_context(
    world: World, secret: ts.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(5):
        world.next_step()
        world.release(world.payloads([np.ones(4)] * 3, items=digests(4, f"step {world.step}")), np.full((4, 3), 1 / 3),
                      items=digests(4, f"step {world.step}"))  # fmt: skip
    other = _make_authority(secret, world.server, world.clients, world.state_dir)  # another process, same state
    noted = []
    note = authority_module._ReleaseState._note
    monkeypatch.setattr(authority_module._ReleaseState, "_note", lambda self, e: noted.append(e) or note(self, e))
    world.next_step()
    request = world.build(world.payloads([np.ones(4)] * 3, items=digests(4, "new")), np.full((4, 3), 1 / 3),
                          items=digests(4, "new"))  # fmt: skip
    world.authority.decrypt(request)
    assert len(noted) == 1  # its own release only: nothing re-read
    with pytest.raises(PolicyError, match="replayed nonce"):
        other.decrypt(request)  # it read the one line it had not seen
    assert len(noted) == 2
    state = world.state_dir / STATE_FILE
    foreign = public_context_of(create_secret_context())
    with pytest.raises(PolicyError, match="belongs to context"):
        KeyAuthority(create_secret_context(), world.authority.signer, clients=world.registry,
                     server_public_key=world.server.public_key_hex, state_dir=world.state_dir)  # fmt: skip
    assert foreign.fingerprint != world.pub.fingerprint
    old = {"nonce": new_nonce(), "purpose": "reward", "rows": {}, "run_id": RUN, "step": 0}  # the v1 format
    state.write_text(json.dumps(old) + "\n")
    with pytest.raises(PolicyError, match="older version .* start a new CKKS context"):
        _make_authority(secret, world.server, world.clients, world.state_dir)
    with pytest.raises(PolicyError, match="replaced or truncated"):
        world.authority.decrypt(request)


def test_attack_a_ciphertext_from_another_step_is_refused(world: World, decryptions) -> None:
    """The server replays a client's reply of the previous round (or of another purpose) in a fresh
    round: the authority checks every reply against the request's run, step, nonce and purpose."""
    old = world.payloads([np.ones(10)] * 3)
    world.release(old, np.full((10, 3), 1 / 3))
    world.next_step()
    fresh = world.payloads([np.ones(10)] * 3, items=digests(10))
    with pytest.raises(PolicyError, match="client reply 1 does not verify: .*step=0, expected 1"):
        world.authority.decrypt(world.build([fresh[0], old[1], fresh[2]], np.full((10, 3), 1 / 3)))
    world.next_step()
    gradient = world.payloads([np.ones(10)] * 3, purpose="router_gradient")
    rewards = world.payloads([np.ones(10)] * 3)
    with pytest.raises(PolicyError, match="client reply 2 does not verify: .*purpose='router_gradient'"):
        world.authority.decrypt(world.build([*rewards[:2], gradient[2]], np.full((10, 3), 1 / 3)))
    assert len(decryptions) == 1

"""Fuzzing every deserializer: random bytes and mutations of valid messages (bit flips,
truncations, extensions, splices) must each raise the documented error; none may crash
or be accepted. The default suite runs ~1,400 examples; `-m slow` runs ten times more."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from secure_mor.authority.key_authority import AuthorityPolicy, KeyAuthority, PolicyError
from secure_mor.crypto.blinding import MaskKey
from secure_mor.crypto.context import (
    ContextError,
    KeyStoreError,
    PublicContext,
    ScryptParams,
    create_secret_context,
    load_public_context,
    load_secret_context,
    public_context_of,
    save_secret_context,
)
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import (
    MAGIC_REPLY,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    PayloadError,
    build_request,
    load_vector,
    new_nonce,
    parse_reply,
    parse_request,
    parse_response,
    seal_reply,
)

SIZES = [pytest.param(1, id="default"), pytest.param(10, id="slow", marks=pytest.mark.slow)]


@dataclass
class Corpus:
    """One valid instance of every message, and the parties needed to parse them."""

    pub: PublicContext
    authority: KeyAuthority
    registry: dict[str, str]
    server: Signer
    reply: bytes
    request: bytes
    response: bytes
    ciphertext: bytes
    key_file: Path
    answered: bytes  # the request `response` answers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    tmp = tmp_path_factory.mktemp("fuzz")
    secret = create_secret_context()
    pub = public_context_of(secret)
    clients = [Signer.generate(f"client-{i}") for i in range(2)]
    registry = {c.party: c.public_key_hex for c in clients}
    server = Signer.generate("server")
    authority = KeyAuthority(
        secret,
        Signer.generate("authority"),
        clients=registry,
        server_public_key=server.public_key_hex,
        state_dir=tmp,
        policy=AuthorityPolicy(),
    )
    n, weights, mask_key = 5000, np.full((5000, 2), 0.5), MaskKey()
    items = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]

    def step(number: int) -> tuple[list[bytes], bytes]:
        nonce = new_nonce()
        payloads = [
            seal_reply(c, pub, run_id="r", step=number, nonce=nonce, purpose="reward", scores=np.ones(n),
                       mask_key=mask_key.public_hex, items=items)
            for c in clients
        ]  # fmt: skip
        return payloads, build_request(server, pub, run_id="r", step=number, nonce=nonce, purpose="reward",
                                       n_scores=n, replies=payloads, weights=weights,
                                       items=[items] * len(payloads))  # fmt: skip

    _, answered = step(1)
    response = authority.decrypt(answered)
    payloads, request = step(2)  # valid and never submitted: mutations of it must all be refused
    reply = parse_reply(payloads[0], pub, registry)
    return Corpus(
        pub,
        authority,
        registry,
        server,
        payloads[0],
        request,
        response,
        reply.ciphertexts[0].serialize(),
        save_secret_context(secret, tmp / "authority.ckks", "pw", ScryptParams(n=2**10)),
        answered,
    )


@st.composite
def edits(draw: st.DrawFn, length: int, header_bytes: int) -> tuple:
    """One edit of a message of `length` bytes: bit flips (anywhere, or within the first
    header_bytes where the framing and header live), a truncation, an extension or a splice."""
    kind = draw(st.sampled_from(["flip", "header_flip", "truncate", "extend", "splice"]))
    if kind in ("flip", "header_flip"):
        limit = length if kind == "flip" else min(length, header_bytes)
        positions = draw(st.lists(st.integers(0, limit - 1), min_size=1, max_size=4, unique=True))
        return ("flip", tuple((p, draw(st.integers(0, 7))) for p in positions))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, length - 1)))
    if kind == "extend":
        return ("extend", draw(st.binary(min_size=1, max_size=64)))
    start = draw(st.integers(0, length - 1))
    return ("splice", start, draw(st.integers(start, min(length, start + 64))), draw(st.binary(max_size=64)))


def apply_edit(data: bytes, edit: tuple) -> bytes:
    out = bytearray(data)
    if edit[0] == "flip":
        for position, bit in edit[1]:
            out[position] ^= 1 << bit
    elif edit[0] == "truncate":
        out = out[: edit[1]]
    elif edit[0] == "extend":
        out += edit[1]
    else:
        out[edit[1] : edit[2]] = edit[3]
    assume(bytes(out) != data)  # a splice may write back the same bytes
    return bytes(out)


def mutations(data: bytes, header_bytes: int = 600) -> st.SearchStrategy[bytes]:
    return edits(len(data), header_bytes).map(lambda edit: apply_edit(data, edit))


def random_messages(magic: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, half of them behind a valid magic and version so parsing goes deeper."""
    return st.one_of(st.binary(max_size=2048), st.binary(max_size=2048).map(lambda b: magic + b"\x01" + b))


def _fuzz(strategy: st.SearchStrategy[bytes], examples: int, check: Callable[[bytes], None]) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def run(data: bytes) -> None:
        check(data)

    run()


def _refused(error: type[Exception] | tuple[type[Exception], ...], parse: Callable[[bytes], object]):
    def check(data: bytes) -> None:
        with pytest.raises(error):
            parse(data)

    return check


@pytest.mark.parametrize("scale", SIZES)
def test_fuzz_client_reply(corpus: Corpus, scale: int) -> None:
    parse = _refused(PayloadError, lambda d: parse_reply(d, corpus.pub, corpus.registry))
    _fuzz(random_messages(MAGIC_REPLY), 250 * scale, parse)
    _fuzz(mutations(corpus.reply), 450 * scale, parse)


@pytest.mark.parametrize("scale", SIZES)
def test_fuzz_decryption_request(corpus: Corpus, scale: int) -> None:
    parse = _refused(PayloadError, lambda d: parse_request(d, corpus.pub, corpus.server.public_key_hex))
    _fuzz(random_messages(MAGIC_REQUEST), 100 * scale, parse)
    # Through the authority itself: nothing mutated may be decrypted.
    decrypt = _refused((PayloadError, PolicyError), corpus.authority.decrypt)
    _fuzz(mutations(corpus.request), 200 * scale, decrypt)


@pytest.mark.parametrize("scale", SIZES)
def test_fuzz_authority_response(corpus: Corpus, scale: int) -> None:
    key = corpus.authority.signer.public_key_hex
    assert parse_response(corpus.response, key, corpus.answered).shape == (5000,)
    parse = _refused(PayloadError, lambda d: parse_response(d, key, corpus.answered))
    _fuzz(random_messages(MAGIC_RESPONSE), 100 * scale, parse)
    _fuzz(mutations(corpus.response), 100 * scale, parse)


@pytest.mark.parametrize("scale", SIZES)
def test_fuzz_public_context_and_key_file(corpus: Corpus, scale: int, tmp_path: Path) -> None:
    parse = _refused(ContextError, lambda d: load_public_context(d, corpus.pub.fingerprint))
    _fuzz(st.binary(max_size=2048), 50 * scale, parse)
    _fuzz(mutations(corpus.pub.data), 50 * scale, parse)
    path = tmp_path / "mutated.ckks"

    def load_key(data: bytes) -> None:
        path.write_bytes(data)
        load_secret_context(path, "pw")

    _fuzz(st.binary(max_size=512), 50 * scale, _refused(KeyStoreError, load_key))
    key_file = corpus.key_file.read_bytes()
    _fuzz(mutations(key_file, header_bytes=150), 50 * scale, _refused(KeyStoreError, load_key))


@pytest.mark.parametrize("scale", SIZES)
def test_fuzz_tenseal_ciphertext_loading(corpus: Corpus, scale: int) -> None:
    """Below the signature: what TenSEAL does with damaged ciphertext bytes. It raises on
    most and loads some (altered coefficients are undetectable: hence signatures and digests
    first); load_vector must turn every failure into PayloadError and never crash."""
    top = corpus.pub.context.seal_context().data.first_context_data().chain_index()
    loaded = []

    def check(data: bytes) -> None:
        try:
            vector = load_vector(corpus.pub, data, 4096, top)
        except PayloadError:
            return
        assert isinstance(vector, ts.CKKSVector) and vector.size() == 4096
        loaded.append(data)

    _fuzz(mutations(corpus.ciphertext, header_bytes=64), 150 * scale, check)
    garbage = _refused(PayloadError, lambda d: load_vector(corpus.pub, d, 4096, top))
    _fuzz(st.binary(max_size=1024), 50 * scale, garbage)

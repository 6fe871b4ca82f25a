"""The wire format: client replies, decryption requests, authority responses.

One framing for all three messages::

    magic     4 bytes   b"SMRC" client reply | b"SMRQ" decryption request | b"SMRA" authority response
    version   1 byte    3
    L         4 bytes   header length, unsigned big-endian, at most WireLimits.max_header_bytes
    header    L bytes   canonical JSON object (UTF-8, keys sorted, no whitespace, no NaN)
    signature 64 bytes  Ed25519 over all preceding bytes (magic .. header)
    body      rest      the sections listed in the header, concatenated, nothing after them

Every header has "sections": [[length, sha256 hex], ...], one entry per body
section in order. The signature covers the header, and the header commits to each
section by length and SHA-256, so the signature covers the whole message; the first
9 + L + 64 bytes of a client reply are its *statement* (a signed description of the
ciphertexts by digest).

Client reply (signed by the client) header::

    {"blinding" (the reply's ephemeral X25519 public key, hex: crypto.blinding), "client_id",
     "context" (fingerprint), "items" (SHA-256 hex of the items' digests, or null), "n_scores",
     "nonce" (32 hex), "purpose", "query" (SHA-256 hex of the router-gradient query, or null),
     "run_id", "sections", "step"}

with one section per ciphertext: ceil(n_scores / slots) serialized TenSEAL CKKS
vectors holding clip(score) + mask in order (see packing.py and blinding.py). "items"
commits to what was scored: the concatenated 32-byte digests of the items, as this client
computed them (a prompt as its own model sees it, clients.scoring.prompt_digests, for GRPO
scoring; a calibration pair's index, secure_mor.protocol.calibration_digests, for the router's
margins and, in a router-gradient reply, for the batch its term sums over). "query" commits a
router-gradient reply to the query it answers (secure_mor.routing.query_digest); null otherwise.

Decryption request (signed by the server) header::

    {"context", "contributors" (K), "n_scores", "nonce", "purpose", "run_id", "sections",
     "step", "weights" ([N, K] or null)}

sections: the weights (N*K float64 little-endian, row-major) and the item digests of every
contributor (K x N x 32 bytes, in the replies' order) when weights is not null, then the K
client replies, whole. The key
authority computes the fusion from those replies itself: the request carries no
ciphertext of the server's.

Authority response (signed by the key authority) header::

    {"context", "n_scores", "nonce", "purpose", "request" (sha256 hex of the request),
     "round_bits", "run_id", "sections", "step"}

with one section: N int64 little-endian k_i; the released value i is k_i * 2^-round_bits.

Parsing is strict and answers every defect (malformed bytes, non-canonical or
unexpected header, foreign context, unknown signer, bad signature, wrong sizes,
oversized messages, trailing bytes, digest mismatch, ciphertexts that TenSEAL
cannot load or that have the wrong length, level or scale) with PayloadError.
Signatures and digests are checked before any ciphertext is deserialized.
TenSEAL itself answers damaged ciphertext bytes with ValueError or RuntimeError
(fuzzed: no crash), but it accepts some damaged bytes silently (wrong vector
length, altered coefficients), hence the structural checks after loading.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from secure_mor.crypto.blinding import MaskError, client_mask
from secure_mor.crypto.context import PublicContext, chain_index_of, top_chain_index
from secure_mor.crypto.packing import chunk_sizes, encrypt_packed
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.signing import SignatureError, Signer, canonical_json, verify

VERSION = 3
MAGIC_REPLY, MAGIC_REQUEST, MAGIC_RESPONSE = b"SMRC", b"SMRQ", b"SMRA"
PURPOSES = ("reward", "router_gradient")
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32  # one item's digest (SHA-256)
_PREFIX = struct.Struct(">4sBI")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PayloadError(ValueError):
    """A wire message is malformed, oversized, foreign, unexpected or badly signed."""


@dataclass(frozen=True)
class WireLimits:
    max_message_bytes: int = 256 * 2**20
    max_header_bytes: int = 2**20
    max_scores: int = 2**20
    max_contributors: int = 256


DEFAULT_LIMITS = WireLimits()


@dataclass(frozen=True)
class Expected:
    """What the receiver asked for; a reply or request about anything else is refused."""

    run_id: str
    step: int
    nonce: str
    purpose: str
    n_scores: int


@dataclass(frozen=True)
class Statement:
    """A client's signed statement: the signed prefix of its reply."""

    run_id: str
    step: int
    nonce: str
    purpose: str
    client_id: str
    n_scores: int
    context: str
    blinding: str
    items: str | None
    query: str | None
    raw: bytes

    @property
    def mask_context(self) -> bytes:
        """What the reply's mask is bound to (crypto.blinding)."""
        return _mask_context(vars(self))


@dataclass(frozen=True)
class ClientReply:
    statement: Statement
    ciphertexts: list[ts.CKKSVector]
    raw: bytes  # the whole reply, as signed: what the server forwards to the key authority

    @property
    def client_id(self) -> str:
        return self.statement.client_id


@dataclass(frozen=True)
class DecryptionRequest:
    run_id: str
    step: int
    nonce: str
    purpose: str
    n_scores: int
    context: str
    weights: np.ndarray | None
    items: list[list[bytes]] | None  # per contributor, in the replies' order
    replies: list[bytes]
    sha256: str


def new_nonce() -> str:
    return secrets.token_hex(16)


def items_digest(items: Sequence[bytes]) -> str:
    """What a client's statement commits to: SHA-256 of the items' 32-byte digests, in order."""
    if any(len(item) != DIGEST_BYTES for item in items):
        raise ValueError(f"every item digest must be {DIGEST_BYTES} bytes")
    return hashlib.sha256(b"".join(items)).hexdigest()


def _mask_context(fields: Mapping[str, Any]) -> bytes:
    names = ("run_id", "step", "nonce", "purpose", "client_id", "n_scores", "context")
    return canonical_json([fields[name] for name in names])


# ---------------------------------------------------------------- framing


@dataclass(frozen=True)
class _Frame:
    header: dict[str, Any]
    signed: bytes
    signature: bytes
    body: bytes


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _frame(signer: Signer, magic: bytes, header: dict[str, Any], sections: Sequence[bytes]) -> bytes:
    header = {**header, "sections": [[len(s), hashlib.sha256(s).hexdigest()] for s in sections]}
    raw = canonical_json(header)
    signed = _PREFIX.pack(magic, VERSION, len(raw)) + raw
    return b"".join([signed, signer.sign(signed), *sections])


def _unframe(data: bytes, magic: bytes, limits: WireLimits) -> _Frame:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_message_bytes:
        raise PayloadError(f"oversized message: {len(data)} bytes > limit {limits.max_message_bytes}")
    if len(data) < _PREFIX.size + SIGNATURE_BYTES:
        raise PayloadError(f"truncated message: {len(data)} bytes")
    got_magic, version, header_len = _PREFIX.unpack_from(data)
    if got_magic != magic:
        raise PayloadError(f"bad magic {got_magic!r}, expected {magic!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported version {version}, expected {VERSION}")
    if header_len > limits.max_header_bytes:
        raise PayloadError(f"oversized header: {header_len} bytes > limit {limits.max_header_bytes}")
    end = _PREFIX.size + header_len
    if len(data) < end + SIGNATURE_BYTES:
        raise PayloadError("truncated message: header or signature cut short")
    raw = data[_PREFIX.size : end]
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PayloadError(f"header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise PayloadError("header is not a JSON object")
    try:
        canonical = canonical_json(header)
    except ValueError as err:
        raise PayloadError(f"header is not canonical JSON: {err}") from err
    if canonical != raw:
        raise PayloadError("header is not canonical JSON (sorted keys, no whitespace)")
    return _Frame(header, data[:end], data[end : end + SIGNATURE_BYTES], data[end + SIGNATURE_BYTES :])


def _verify(public_key_hex: str, frame: _Frame, who: str) -> None:
    try:
        verify(public_key_hex, frame.signature, frame.signed)
    except SignatureError as err:
        raise PayloadError(f"signature of {who} does not verify") from err


def _sections(frame: _Frame, count: int, max_each: Sequence[int]) -> list[bytes]:
    """The body split by the header's section table, each digest checked."""
    table = frame.header["sections"]
    if len(table) != count:
        raise PayloadError(f"expected {count} body sections, header lists {len(table)}")
    if sum(length for length, _ in table) != len(frame.body):
        raise PayloadError(f"body is {len(frame.body)} bytes, header lists {sum(n for n, _ in table)}")
    out, offset = [], 0
    for i, ((length, digest), limit) in enumerate(zip(table, max_each, strict=True)):
        if length > limit:
            raise PayloadError(f"section {i} is {length} bytes > limit {limit}")
        section = frame.body[offset : offset + length]
        if hashlib.sha256(section).hexdigest() != digest:
            raise PayloadError(f"section {i} does not match its digest (tampered)")
        out.append(section)
        offset += length
    return out


# ---------------------------------------------------------------- header schema


def _check_fields(header: dict[str, Any], spec: Mapping[str, Any]) -> None:
    if set(header) != set(spec):
        missing, extra = sorted(set(spec) - set(header)), sorted(set(header) - set(spec))
        raise PayloadError(f"header fields differ: missing {missing}, unexpected {extra}")
    for key, check in spec.items():
        if not check(header[key]):
            raise PayloadError(f"header field {key!r} is invalid: {str(header[key])[:80]!r}")


def _is_int(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_id(v: Any) -> bool:
    return isinstance(v, str) and _ID.fullmatch(v) is not None


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _is_nonce(v: Any) -> bool:
    return isinstance(v, str) and _NONCE.fullmatch(v) is not None


def _is_table(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(e, list) and len(e) == 2 and _is_int(0, 2**62)(e[0]) and _is_sha(e[1]) for e in v
    )


_STEP = _is_int(0, 2**62)


def _common(limits: WireLimits) -> dict[str, Any]:
    return {
        "context": _is_sha,
        "n_scores": _is_int(1, limits.max_scores),
        "nonce": _is_nonce,
        "purpose": lambda v: v in PURPOSES,
        "run_id": _is_id,
        "sections": _is_table,
        "step": _STEP,
    }


def _check_expected(header: Mapping[str, Any], expected: Expected | None, what: str) -> None:
    if expected is None:
        return
    for key in ("run_id", "step", "nonce", "purpose", "n_scores"):
        if header[key] != getattr(expected, key):
            raise PayloadError(f"{what} is for {key}={header[key]!r}, expected {getattr(expected, key)!r}")


def _max_ciphertext_bytes(pub: PublicContext) -> int:
    """Uncompressed SEAL size of a fresh ciphertext (2 polynomials, all data primes) plus framing."""
    parms = pub.context.seal_context().data.first_context_data().parms()
    return 2 * parms.poly_modulus_degree() * len(parms.coeff_modulus()) * 8 + 4096


def load_vector(pub: PublicContext, data: bytes, size: int, chain_index: int) -> ts.CKKSVector:
    """Deserialize one CKKS vector and check what TenSEAL does not (PayloadError otherwise)."""
    try:
        vector = ts.ckks_vector_from(pub.context, data)
        inner = vector.ciphertext()
    except Exception as err:  # TenSEAL: ValueError / RuntimeError on damaged bytes (fuzzed, no crash)
        raise PayloadError(f"ciphertext does not deserialize: {err}") from err
    if vector.size() != size or len(inner) != 1:
        raise PayloadError(f"ciphertext holds {vector.size()} values in {len(inner)} parts, not {size} in 1")
    ct = inner[0]
    if ct.size() != 2 or ct.is_transparent() or not ct.is_ntt_form():
        raise PayloadError("ciphertext is not a 2-component NTT-form CKKS ciphertext")
    if ct.scale != pub.context.global_scale:
        raise PayloadError(f"ciphertext scale 2^{np.log2(ct.scale):.2f} is not the context's scale")
    level = chain_index_of(pub.context, vector)
    if level != chain_index:
        raise PayloadError(f"ciphertext is at level {level}, expected {chain_index}")
    return vector


# ---------------------------------------------------------------- client reply


def seal_reply(
    signer: Signer,
    pub: PublicContext,
    *,
    run_id: str,
    step: int,
    nonce: str,
    purpose: str,
    scores: np.ndarray,
    mask_key: str,
    items: Sequence[bytes] | None = None,
    query: str | None = None,
    release: ReleaseConfig | None = None,
) -> bytes:
    """Client side: clip scores to [-R, R], round them to the masks' grid (2^-20), add the mask
    derived with the server's round key `mask_key` (crypto.blinding), pack, encrypt, serialize,
    sign, committing to `items` (the scored items' digests) and, for a router-gradient term, to
    the `query` it answers (its digest)."""
    release = release or ReleaseConfig()
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.all(np.isfinite(values)):
        raise ValueError("scores must be a non-empty 1-D array of finite values")
    if purpose == "reward" and items is not None and len(items) != len(values):  # a gradient term sums over its items
        raise ValueError(f"{len(items)} item digests for {len(values)} scores")
    header = {
        "client_id": signer.party,
        "context": pub.fingerprint,
        "items": None if items is None else items_digest(items),
        "n_scores": len(values),
        "nonce": nonce,
        "purpose": purpose,
        "query": query,
        "run_id": run_id,
        "step": step,
    }
    try:
        blinding, mask = client_mask(mask_key, _mask_context(header), len(values), release.mask_bound)
    except MaskError as err:
        raise ValueError(f"the round's mask key is unusable: {err}") from err
    header["blinding"] = blinding
    _check_fields({**header, "sections": []}, _reply_spec(DEFAULT_LIMITS))
    # On the masks' grid (crypto.blinding): a value's bits below it would show through the mask.
    grid = release.mask_grid
    clipped = np.rint(np.clip(values, -release.value_bound, release.value_bound) / grid) * grid
    vectors = encrypt_packed(pub.context, clipped + mask)
    return _frame(signer, MAGIC_REPLY, header, [v.serialize() for v in vectors])


def _reply_spec(limits: WireLimits) -> dict[str, Any]:
    return {
        **_common(limits),
        "blinding": _is_sha,  # 32 bytes, hex
        "client_id": _is_id,
        "items": lambda v: v is None or _is_sha(v),
        "query": lambda v: v is None or _is_sha(v),
    }


def _statement_from(
    frame: _Frame, registry: Mapping[str, str], fingerprint: str, limits: WireLimits
) -> Statement:
    h = frame.header
    _check_fields(h, _reply_spec(limits))
    if h["context"] != fingerprint:
        raise PayloadError(f"foreign context {h['context'][:16]}..., expected {fingerprint[:16]}...")
    if h["client_id"] not in registry:
        raise PayloadError(f"unknown client {h['client_id']!r} (not in the registry)")
    _verify(registry[h["client_id"]], frame, f"client {h['client_id']!r}")
    return Statement(
        h["run_id"], h["step"], h["nonce"], h["purpose"], h["client_id"], h["n_scores"], h["context"],
        h["blinding"], h["items"], h["query"], frame.signed + frame.signature,
    )  # fmt: skip


def parse_reply(
    data: bytes,
    pub: PublicContext,
    registry: Mapping[str, str],
    expected: Expected | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> ClientReply:
    """Verify a client reply and load its ciphertexts (PayloadError on any defect): the server
    on receipt, the key authority again before it fuses.

    Order: framing and header schema, context fingerprint, signer in `registry`
    ({client_id: Ed25519 public key hex}), signature, expectations (run, step,
    nonce, purpose, n_scores), section sizes and digests, and only then TenSEAL."""
    frame = _unframe(data, MAGIC_REPLY, limits)
    statement = _statement_from(frame, registry, pub.fingerprint, limits)
    _check_expected(frame.header, expected, f"reply of {statement.client_id!r}")
    sizes = chunk_sizes(statement.n_scores, pub.slots)
    sections = _sections(frame, len(sizes), [_max_ciphertext_bytes(pub)] * len(sizes))
    top = top_chain_index(pub.context)
    vectors = [load_vector(pub, s, n, top) for s, n in zip(sections, sizes, strict=True)]
    return ClientReply(statement, vectors, bytes(data))


def _max_reply_bytes(pub: PublicContext, n: int, limits: WireLimits) -> int:
    header = _PREFIX.size + limits.max_header_bytes + SIGNATURE_BYTES
    return header + len(chunk_sizes(n, pub.slots)) * _max_ciphertext_bytes(pub)


# ---------------------------------------------------------------- decryption request


def build_request(
    signer: Signer,
    pub: PublicContext,
    *,
    run_id: str,
    step: int,
    nonce: str,
    purpose: str,
    n_scores: int,
    replies: Sequence[bytes],
    weights: np.ndarray | None,
    items: Sequence[Sequence[bytes]] | None,
) -> bytes:
    """Server side: ask the key authority to fuse the client `replies` (whole, as received) with
    `weights` and release the result; `items` (each contributor's N item digests, in the replies'
    order) come with the weights."""
    if (weights is None) != (items is None):
        raise ValueError("a weighted fusion names its items; a plain sum has neither")
    if items is not None and (len(items) != len(replies) or any(len(i) != n_scores for i in items)):
        raise ValueError(f"need {n_scores} item digests for each of the {len(replies)} replies")
    w = None if weights is None else np.ascontiguousarray(weights, dtype="<f8")
    header = {
        "context": pub.fingerprint,
        "contributors": len(replies),
        "n_scores": n_scores,
        "nonce": nonce,
        "purpose": purpose,
        "run_id": run_id,
        "step": step,
        "weights": None if w is None else list(w.shape),
    }
    described = [] if w is None else [w.tobytes(), b"".join(b"".join(i) for i in items)]
    return _frame(signer, MAGIC_REQUEST, header, [*described, *replies])


def _request_spec(limits: WireLimits) -> dict[str, Any]:
    return {
        **_common(limits),
        "contributors": _is_int(1, limits.max_contributors),
        "weights": lambda v: v is None or (
            isinstance(v, list) and len(v) == 2 and all(_is_int(1, limits.max_scores)(x) for x in v)
        ),
    }


def parse_request(
    data: bytes, pub: PublicContext, server_public_key: str, limits: WireLimits = DEFAULT_LIMITS
) -> DecryptionRequest:
    """Key authority side: verify the server's signature and the request's structure. The
    client replies are returned raw: the authority verifies and loads them itself."""
    frame = _unframe(data, MAGIC_REQUEST, limits)
    h = frame.header
    _check_fields(h, _request_spec(limits))
    if h["context"] != pub.fingerprint:
        raise PayloadError(f"request is under a foreign context {h['context'][:16]}...")
    _verify(server_public_key, frame, "the server")
    n, k = h["n_scores"], h["contributors"]
    if h["weights"] is not None and h["weights"] != [n, k]:
        raise PayloadError(f"weights shape {h['weights']} is not [n_scores, contributors] = [{n}, {k}]")
    described = 2 if h["weights"] is not None else 0
    limits_each = [n * k * 8, n * k * DIGEST_BYTES][:described] + [_max_reply_bytes(pub, n, limits)] * k
    sections = _sections(frame, described + k, limits_each)
    weights, items = None, None
    if described:
        if len(sections[0]) != n * k * 8 or len(sections[1]) != n * k * DIGEST_BYTES:
            raise PayloadError(f"weights or item digests are {len(sections[0])} / {len(sections[1])} bytes, "
                               f"expected {n * k * 8} / {n * k * DIGEST_BYTES}")  # fmt: skip
        weights = np.frombuffer(sections[0], dtype="<f8").reshape(n, k).astype(np.float64)
        flat = [sections[1][i : i + DIGEST_BYTES] for i in range(0, n * k * DIGEST_BYTES, DIGEST_BYTES)]
        items = [flat[j * n : (j + 1) * n] for j in range(k)]
    return DecryptionRequest(
        h["run_id"], h["step"], h["nonce"], h["purpose"], n, h["context"], weights, items,
        replies=sections[described:], sha256=hashlib.sha256(data).hexdigest(),
    )  # fmt: skip


# ---------------------------------------------------------------- authority response


def build_response(signer: Signer, request: DecryptionRequest, levels: np.ndarray, round_bits: int) -> bytes:
    """Key authority side: release `levels` (int64; value = level * 2^-round_bits), signed."""
    body = np.ascontiguousarray(levels, dtype="<i8")
    if body.shape != (request.n_scores,):
        raise ValueError(f"release has shape {body.shape}, expected ({request.n_scores},)")
    header = {
        "context": request.context,
        "n_scores": request.n_scores,
        "nonce": request.nonce,
        "purpose": request.purpose,
        "request": request.sha256,
        "round_bits": round_bits,
        "run_id": request.run_id,
        "step": request.step,
    }
    return _frame(signer, MAGIC_RESPONSE, header, [body.tobytes()])


def parse_response(
    data: bytes, authority_public_key: str, request: bytes, limits: WireLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Server side: the released (still masked) values for `request`, signature verified."""
    frame = _unframe(data, MAGIC_RESPONSE, limits)
    h = frame.header
    _check_fields(h, {**_common(limits), "request": _is_sha, "round_bits": _is_int(1, 40)})
    _verify(authority_public_key, frame, "the key authority")
    if h["request"] != hashlib.sha256(request).hexdigest():
        raise PayloadError("response answers a different request")
    (body,) = _sections(frame, 1, [8 * h["n_scores"]])
    if len(body) != 8 * h["n_scores"]:
        raise PayloadError(f"response body is {len(body)} bytes, expected {8 * h['n_scores']}")
    levels = np.frombuffer(body, dtype="<i8")
    if np.any((levels > 2**53) | (levels < -(2**53))):
        raise PayloadError("released value out of range")
    return levels.astype(np.float64) * 2.0 ** -h["round_bits"]

"""CKKS contexts: creation (key authority only), the public export, and the
secret context at rest.

- `create_secret_context(params)` makes a fresh CKKS key pair. Only the key
  authority calls it.
- `export_public_context(ctx)` gives the bytes that clients and the server get:
  public key and parameters only; no secret key, no relinearisation or Galois keys
  (fusion is ciphertext x plaintext and needs neither).
- `context_fingerprint(data)` = sha256 hex of those bytes; wire messages name the
  context by it, and `load_public_context` refuses bytes with another fingerprint
  or bytes that carry a secret key.
- `context_statement(fingerprint)` is what the key authority signs over its public context
  (`sign_public_context`, Ed25519 with its payload key), and `verify_public_context` what
  a client checks before it takes a context: the authority's signature, with the
  authority's key from the registry the client itself trusts (never a key or a
  fingerprint the server relays), then the bytes against the fingerprint. One function
  builds the message for both sides.
- `save_secret_context` / `load_secret_context` keep the full context (with the
  secret key) at rest: Scrypt(passphrase) -> 256-bit key, AES-256-GCM, file mode 0600.
  File format: b"SMRK" | u8 version | u32 header length | header JSON
  {kdf, n, r, p, salt, nonce} | AES-GCM(secret context bytes), with everything
  before the ciphertext as associated data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts
import tenseal.sealapi  # noqa: F401  (registers SEAL types such as Modulus used below)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from secure_mor.crypto.params import DEFAULT_PARAMS, MAX_MODULUS_BITS_128, CkksParams
from secure_mor.crypto.signing import SignatureError, Signer, verify

KEY_FILE_MAGIC = b"SMRK"
KEY_FILE_VERSION = 1
MAX_PUBLIC_CONTEXT_BYTES = 64 * 2**20


class ContextError(ValueError):
    """Public context bytes are not the expected, public, 128-bit secure CKKS context."""


class KeyStoreError(ValueError):
    """The secret context at rest cannot be read: wrong passphrase, damaged or foreign file."""


def create_secret_context(params: CkksParams = DEFAULT_PARAMS, n_threads: int = 1) -> ts.Context:
    """A fresh CKKS context with its secret key (key authority only)."""
    params.validate()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=n_threads,
    )
    ctx.global_scale = params.scale
    return ctx


def export_public_context(ctx: ts.Context) -> bytes:
    """Public key and parameters only: what clients and the server receive."""
    return ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def context_fingerprint(public_bytes: bytes) -> str:
    return hashlib.sha256(public_bytes).hexdigest()


def slot_count(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def top_chain_index(ctx: ts.Context) -> int:
    """Level of a fresh ciphertext (the fusion multiplies without rescaling: it stays there)."""
    return ctx.seal_context().data.first_context_data().chain_index()


def chain_index_of(ctx: ts.Context, vector: ts.CKKSVector) -> int | None:
    data = ctx.seal_context().data.get_context_data(vector.ciphertext()[0].parms_id())
    return None if data is None else data.chain_index()


def remaining_modulus_bits(ctx: ts.Context, chain_index: int) -> int:
    data = ctx.seal_context().data.first_context_data()
    while data is not None and data.chain_index() > chain_index:
        data = data.next_context_data()
    if data is None:
        raise ContextError(f"no level {chain_index} in this context")
    return data.total_coeff_modulus_bit_count()


def _check_security(ctx: ts.Context) -> None:
    seal = ctx.seal_context().data
    n = seal.first_context_data().parms().poly_modulus_degree()
    bits = seal.key_context_data().total_coeff_modulus_bit_count()
    if n not in MAX_MODULUS_BITS_128 or bits > MAX_MODULUS_BITS_128[n]:
        raise ContextError(f"context N={n} with {bits}-bit modulus is below 128-bit security")


@dataclass(frozen=True)
class PublicContext:
    """The context a client or the server holds: no secret key."""

    data: bytes
    fingerprint: str
    context: ts.Context

    @property
    def slots(self) -> int:
        return slot_count(self.context)


def load_public_context(data: bytes, expected_fingerprint: str, n_threads: int = 1) -> PublicContext:
    """Load public context bytes, pinned by their fingerprint (published by the authority).

    Raises ContextError if the fingerprint differs, the bytes do not parse, the context
    holds a secret key or is not a 128-bit secure CKKS context."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_PUBLIC_CONTEXT_BYTES:
        raise ContextError("public context must be bytes of at most 64 MiB")
    data = bytes(data)
    fingerprint = context_fingerprint(data)
    if fingerprint != expected_fingerprint:
        raise ContextError(f"foreign context: fingerprint {fingerprint[:16]}... is not the pinned one")
    try:
        ctx = ts.context_from(data, n_threads=n_threads)
    except Exception as err:  # TenSEAL raises ValueError/RuntimeError on damaged bytes
        raise ContextError(f"public context does not parse: {err}") from err
    if ctx.is_private() or ctx.has_secret_key():
        raise ContextError("refusing a 'public' context that carries a secret key")
    if ctx.seal_context().data.first_context_data().parms().scheme() != ts.SCHEME_TYPE.CKKS.value:
        raise ContextError("not a CKKS context")
    _check_security(ctx)
    return PublicContext(data, fingerprint, ctx)


def public_context_of(ctx: ts.Context) -> PublicContext:
    """The public context of a secret one, as a client would load it."""
    data = export_public_context(ctx)
    return load_public_context(data, context_fingerprint(data))


# The domain of the authority's signature over its public context: no other message the project
# signs starts with it (wire frames start with b"SMR", ledger lines with b"{").
CONTEXT_SIGNATURE_DOMAIN = b"secure-mor public CKKS context v1\x00"
_FINGERPRINT = re.compile("[0-9a-f]{64}")


def context_statement(fingerprint: str) -> bytes:
    """What the key authority signs over its public context, and what a client verifies: the domain,
    the holder of the context's secret key, and the context's fingerprint (SHA-256 of its public
    bytes), which names it for the life of its authority directory. No run id, nonce or time: one
    context serves every run, so its signature is one for its whole life."""
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ContextError("a context fingerprint is 64 lowercase hex digits")
    return CONTEXT_SIGNATURE_DOMAIN + b"authority\x00" + fingerprint.encode()


def sign_public_context(signer: Signer, public: PublicContext) -> bytes:
    """The key authority's signature over its public context (secure_mor.authority.key_authority.KeyAuthority)."""
    return signer.sign(context_statement(public.fingerprint))


def verify_public_context(data: bytes, fingerprint: str, signature: bytes, authority_key: str) -> PublicContext:
    """The public context, only if `authority_key` (the key authority's Ed25519 key, hex, from the
    verifier's own registry) signed its fingerprint, and the bytes are the fingerprint's and a public,
    128-bit secure CKKS context (load_public_context). ContextError otherwise: a server that relays a
    context of its own, with its own fingerprint, has no signature of the authority over it."""
    statement = context_statement(fingerprint)
    try:
        verify(authority_key, bytes(signature), statement)
    except (SignatureError, TypeError, ValueError) as err:
        raise ContextError(f"public context {str(fingerprint)[:16]}... is not signed by the key authority "
                           f"(its key in the registry): {err}") from err  # fmt: skip
    return load_public_context(data, fingerprint)


@dataclass(frozen=True)
class ScryptParams:
    """Scrypt cost: n=2^15, r=8 uses 32 MiB and ~0.1 s (RFC 7914 interactive-login range)."""

    n: int = 2**15
    r: int = 8
    p: int = 1


# Bounds on what a key file may ask of the KDF (memory 128 * n * r bytes, here <= 256 MiB),
# so that a damaged header cannot exhaust memory.
_MAX_SCRYPT_MEMORY, _MAX_SCRYPT_P = 2**28, 4
_HEADER = struct.Struct(">4sBI")


def _derive(passphrase: str, salt: bytes, kdf: ScryptParams) -> bytes:
    return Scrypt(salt=salt, length=32, n=kdf.n, r=kdf.r, p=kdf.p).derive(passphrase.encode())


def save_secret_context(
    ctx: ts.Context, path: Path | str, passphrase: str, kdf: ScryptParams = ScryptParams()
) -> Path:
    """Encrypt the secret context under `passphrase` and write it with mode 0600."""
    if not passphrase:
        raise KeyStoreError("a non-empty passphrase is required for the secret context")
    if not ctx.is_private():
        raise KeyStoreError("context has no secret key to store")
    path = Path(path)
    salt, nonce = os.urandom(16), os.urandom(12)
    header = json.dumps(
        {"kdf": "scrypt", "n": kdf.n, "r": kdf.r, "p": kdf.p, "salt": salt.hex(), "nonce": nonce.hex()},
        sort_keys=True,
    ).encode()
    prefix = _HEADER.pack(KEY_FILE_MAGIC, KEY_FILE_VERSION, len(header)) + header
    secret = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    sealed = AESGCM(_derive(passphrase, salt, kdf)).encrypt(nonce, secret, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(prefix + sealed)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file
    return path


def _parse_key_file(raw: bytes) -> tuple[bytes, ScryptParams, bytes, bytes, bytes]:
    if len(raw) < _HEADER.size:
        raise KeyStoreError("key file is truncated")
    magic, version, header_len = _HEADER.unpack_from(raw)
    if magic != KEY_FILE_MAGIC or version != KEY_FILE_VERSION:
        raise KeyStoreError("not a Secure MoR secret-context file (bad magic or version)")
    if header_len > 4096 or len(raw) < _HEADER.size + header_len:
        raise KeyStoreError("key file header is damaged")
    prefix = raw[: _HEADER.size + header_len]
    try:
        header = json.loads(prefix[_HEADER.size :])
        kdf = ScryptParams(int(header["n"]), int(header["r"]), int(header["p"]))
        salt, nonce = bytes.fromhex(header["salt"]), bytes.fromhex(header["nonce"])
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise KeyStoreError(f"key file header is damaged ({err})") from err
    if header.get("kdf") != "scrypt" or len(salt) != 16 or len(nonce) != 12:
        raise KeyStoreError("key file header is damaged (kdf, salt or nonce)")
    if not (kdf.n >= 2 and kdf.n & (kdf.n - 1) == 0 and kdf.r >= 1 and 1 <= kdf.p <= _MAX_SCRYPT_P
            and 128 * kdf.n * kdf.r <= _MAX_SCRYPT_MEMORY):
        raise KeyStoreError("key file asks for out-of-range scrypt parameters")
    return prefix, kdf, salt, nonce, raw[len(prefix) :]


def load_secret_context(path: Path | str, passphrase: str, n_threads: int = 1) -> ts.Context:
    """Decrypt and load the secret context; KeyStoreError on a wrong passphrase or damage."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise KeyStoreError(f"cannot read secret context {path}: {err}") from err
    prefix, kdf, salt, nonce, sealed = _parse_key_file(raw)
    try:
        secret = AESGCM(_derive(passphrase, salt, kdf)).decrypt(nonce, sealed, prefix)
    except InvalidTag as err:
        raise KeyStoreError(f"cannot decrypt {path}: wrong passphrase or damaged file") from err
    try:
        ctx = ts.context_from(secret, n_threads=n_threads)
    except Exception as err:  # authenticated, so only a foreign TenSEAL version gets here
        raise KeyStoreError(f"{path} decrypts but does not hold a TenSEAL context: {err}") from err
    if not ctx.is_private():
        raise KeyStoreError(f"{path} holds no secret key")
    _check_security(ctx)
    return ctx

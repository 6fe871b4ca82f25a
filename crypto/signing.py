"""Ed25519 payload and ledger signatures, signing keys at rest, and where passphrases live.

Each participant (client, key authority, server) owns one Ed25519 key. The private key
is written as PKCS#8 PEM with 0600 permissions, encrypted with the passphrase
when one is given; the public key is written beside it as raw hex, which is
what registries and ledger entries carry. In a deployment every party makes its key
where it runs, encrypted under its passphrase (`KEY_PASSPHRASE_ENV`), and sends only
the public half to the operator (crypto.pki).

Passphrases never lie beside the key they protect: they come from the environment, or
from this user's secrets directory (`secrets_dir`: $SECURE_MOR_SECRETS_DIR, default
~/.secure-mor/secrets, mode 0700), which may not lie inside the state directory that
holds the key.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SignatureError(ValueError):
    """A signature, or a key needed to check one, is missing or invalid."""


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: what gets hashed and signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Signer:
    """A party's identity and its private signing key."""

    party: str
    private_key: Ed25519PrivateKey

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self.private_key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def generate(cls, party: str) -> Signer:
        return cls(party, Ed25519PrivateKey.generate())


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key(hex_key: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as err:
        raise SignatureError(f"not an Ed25519 public key: {hex_key[:16]!r}...") from err


def verify(public_key_hex_str: str, signature: bytes, message: bytes) -> None:
    """Raise SignatureError unless `signature` is valid for `message`."""
    try:
        load_public_key(public_key_hex_str).verify(signature, message)
    except InvalidSignature as err:
        raise SignatureError("signature does not verify") from err


def save_signer(signer: Signer, directory: Path, passphrase: str | None = None) -> Path:
    """Write `<party>.key` (0600, PKCS#8 PEM) and `<party>.pub` (hex) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    pem = signer.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    key_path = directory / f"{signer.party}.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)  # O_CREAT's mode does not apply to an existing file
    (directory / f"{signer.party}.pub").write_text(signer.public_key_hex + "\n")
    return key_path


def load_signer(party: str, directory: Path, passphrase: str | None = None) -> Signer:
    key_path = directory / f"{party}.key"
    try:
        pem = key_path.read_bytes()
    except FileNotFoundError as err:
        raise SignatureError(f"no signing key for {party!r} at {key_path}") from err
    try:
        key = serialization.load_pem_private_key(pem, passphrase.encode() if passphrase else None)
    except (TypeError, ValueError) as err:
        raise SignatureError(f"cannot load {key_path}: wrong passphrase or damaged key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{key_path} is not an Ed25519 key")
    return Signer(party, key)


def load_or_create_signer(party: str, directory: Path, passphrase: str | None = None) -> Signer:
    if (directory / f"{party}.key").exists():
        return load_signer(party, directory, passphrase)
    signer = Signer.generate(party)
    save_signer(signer, directory, passphrase)
    return signer


def read_registry(directory: Path) -> dict[str, str]:
    """Public keys of all parties in `directory`: {party: hex key}."""
    return {p.stem: p.read_text().strip() for p in sorted(directory.glob("*.pub"))}


def publish_public_key(signer: Signer, registry: Path) -> Path:
    """Write `<party>.pub` into the shared registry directory (what verifiers read)."""
    registry.mkdir(parents=True, exist_ok=True)
    path = registry / f"{signer.party}.pub"
    path.write_text(signer.public_key_hex + "\n")
    return path


KEY_PASSPHRASE_ENV = "SECURE_MOR_KEY_PASSPHRASE"  # a party's signing-key passphrase
SECRETS_DIR_ENV = "SECURE_MOR_SECRETS_DIR"


def key_passphrase() -> str | None:
    """This party's signing-key passphrase from the environment (None: the key is not encrypted)."""
    return os.environ.get(KEY_PASSPHRASE_ENV) or None


def secrets_dir(*outside: Path) -> Path:
    """The directory of this user's stored passphrases (created 0700), refused (ValueError) when it
    lies inside one of `outside`, the directories of the keys they protect."""
    directory = Path(os.environ.get(SECRETS_DIR_ENV) or Path.home() / ".secure-mor" / "secrets").resolve()
    for place in outside:
        if directory.is_relative_to(Path(place).resolve()):
            raise ValueError(f"the secrets directory {directory} lies inside {place}, beside the keys it protects")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


def read_or_create_secret(path: Path) -> str:
    """A random secret kept in `path` (created 0600, never overwritten: O_EXCL), e.g. a key passphrase."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()

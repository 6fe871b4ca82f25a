"""The key authority's side of the federation protocol (secure_mor.protocol), independent of Flower.

The authority runs the project's ClientApp on a node of its own (node config
`role=authority`). It trusts no key the server sends it: the clients' and the
server's Ed25519 public keys are read from the registry directory the parties
publish to (`<state>/keys`, in the simulation runtime), or, in a deployment, from
the operator's registry given as node config `registry`, which the authority only
reads, and whose entries must carry the signature of the operator's CA (node config
`ca-cert`, required with a registry): a server cannot invent "clients" to reach K_min with.

One authority directory holds one CKKS context for its whole life (`authority_dir`,
default `<state>/authority`): its secret key `secret.key`, the context's fingerprint
`context.fingerprint` (public), and the release state that keeps one W row per item
for that context (authority.key_authority). The authority's signing key is one for all its
contexts (`key-dir`, or `<state>/authority/keys`). Separate fusions that must not share rows (an
ablation's) each get an authority directory, hence a context, of their own.

The secret key is encrypted under the passphrase in the environment variable
SECURE_MOR_AUTHORITY_PASSPHRASE. Without it (simulation on one machine) a random
passphrase is kept in this user's secrets directory (crypto.signing.secrets_dir: outside
the state directory, 0700), named by the context's fingerprint, never beside the key.
Its signing key is read with SECURE_MOR_KEY_PASSPHRASE; in a deployment (`key-dir`) it
must be the party's own encrypted key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_mor.authority.key_authority import AuthorityPolicy, KeyAuthority, RowConflict
from secure_mor.crypto.context import ScryptParams, create_secret_context, public_context_of, save_secret_context
from secure_mor.crypto.params import DEFAULT_K_MIN, DEFAULT_W_MIN
from secure_mor.crypto.pki import read_registry_signed
from secure_mor.crypto.signing import (
    KEY_PASSPHRASE_ENV,
    SECRETS_DIR_ENV,
    Signer,
    key_passphrase,
    load_or_create_signer,
    publish_public_key,
    read_or_create_secret,
    secrets_dir,
)
from secure_mor.ledger import Ledger
from secure_mor.protocol import (
    AUTHORITY_PARTY,
    ROLE_AUTHORITY,
    SERVER_PARTY,
    AuthoritySetupReply,
    DecryptReply,
    DecryptRequest,
    IdentifyReply,
    Payload,
    ProtocolError,
)

PASSPHRASE_ENV = "SECURE_MOR_AUTHORITY_PASSPHRASE"
SECRET_FILE = "secret.key"
FINGERPRINT_FILE = "context.fingerprint"  # public: names the context (and its passphrase file) before it is opened


class AuthorityNode:
    """The key authority over `state_dir` (the shared ledger `<state>/ledger.jsonl`, the key
    registry `registry` or `<state>/keys`) with its context in `authority_dir` (default
    `<state>/authority`; see the module docstring)."""

    def __init__(
        self, state_dir: Path | str, *, authority_dir: Path | str | None = None, registry: Path | str | None = None,
        ca_cert: Path | str | None = None, key_dir: Path | str | None = None, k_min: int = DEFAULT_K_MIN,
        w_min: float = DEFAULT_W_MIN,
    ) -> None:
        if registry and not ca_cert:  # an operator's registry is trusted only through its CA's signatures
            raise ProtocolError(f"the key registry {registry} needs the operator's CA certificate (ca-cert)")
        self.state_dir = Path(state_dir)
        self.directory = Path(authority_dir) if authority_dir else self.state_dir / AUTHORITY_PARTY
        self.registry = Path(registry) if registry else self.state_dir / "keys"
        self.ca_cert = Path(ca_cert) if ca_cert else None
        self.key_dir = Path(key_dir) if key_dir else None  # made by the party beforehand: never made here
        self.policy = AuthorityPolicy(k_min=k_min, w_min=w_min)
        self._authority: KeyAuthority | None = None

    def _passphrase(self, fingerprint: str) -> str:
        """The CKKS secret key's passphrase: the environment's, else one in this user's secrets
        directory, named by the context it protects."""
        if PASSPHRASE_ENV in os.environ:
            return os.environ[PASSPHRASE_ENV]
        if (self.directory / "passphrase").exists():
            raise ProtocolError(f"{self.directory / 'passphrase'} lies beside the key it protects: move it out "
                                f"(set {PASSPHRASE_ENV}, or into {SECRETS_DIR_ENV}) and delete it")  # fmt: skip
        try:
            directory = secrets_dir(self.state_dir, self.directory)
        except ValueError as err:
            raise ProtocolError(f"{err}: set {SECRETS_DIR_ENV} to a directory outside it") from err
        return read_or_create_secret(directory / f"authority-{fingerprint[:32]}.passphrase")

    def _signer(self) -> Signer:
        """The authority's signing key; published to the registry only when the registry is the
        run directory's own (simulation): an operator's registry is never written by a node."""
        if self.key_dir is not None and not (self.key_dir / f"{AUTHORITY_PARTY}.key").exists():
            raise ProtocolError(f"no signing key {AUTHORITY_PARTY}.key in key-dir {self.key_dir}")
        if self.key_dir is not None and key_passphrase() is None:
            raise ProtocolError(f"the signing key in key-dir {self.key_dir} is encrypted: set {KEY_PASSPHRASE_ENV}")
        # one identity for every context of this state directory: the registry has one authority key
        signer = load_or_create_signer(AUTHORITY_PARTY, self.key_dir or self.state_dir / AUTHORITY_PARTY / "keys",
                                       key_passphrase())  # fmt: skip
        if self.registry == self.state_dir / "keys":
            publish_public_key(signer, self.registry)
        return signer

    def _keys(self) -> tuple[dict[str, str], str]:
        registry = read_registry_signed(self.registry, self.ca_cert)
        if SERVER_PARTY not in registry:
            raise ProtocolError(f"the server's public key is not in the registry {self.registry}")
        clients = {p: k for p, k in registry.items() if p.startswith("client-")}
        return clients, registry[SERVER_PARTY]

    def authority(self) -> KeyAuthority:
        """Open (or, the first time, create) the authority with the registry's current keys."""
        clients, server_key = self._keys()
        if self._authority is not None and self._authority.clients == clients:
            return self._authority
        signer = self._signer()
        kwargs: dict[str, Any] = {
            "clients": clients,
            "server_public_key": server_key,
            "state_dir": self.directory,
            "policy": self.policy,
            "ledger": Ledger(self.state_dir / "ledger.jsonl"),
        }
        key_path, fingerprint_path = self.directory / SECRET_FILE, self.directory / FINGERPRINT_FILE
        if key_path.exists():
            if not fingerprint_path.exists():
                raise ProtocolError(f"{key_path} has no {FINGERPRINT_FILE} beside it (an older version's context): "
                                    f"move {self.directory} away and start a new context")  # fmt: skip
            fingerprint = fingerprint_path.read_text().strip()
            self._authority = KeyAuthority.open(key_path, self._passphrase(fingerprint), signer, **kwargs)
            if self._authority.fingerprint != fingerprint:
                raise ProtocolError(f"{key_path} holds another context than {fingerprint_path} names")
        else:
            secret = create_secret_context()
            fingerprint = public_context_of(secret).fingerprint
            self.directory.mkdir(parents=True, exist_ok=True)
            fingerprint_path.write_text(fingerprint + "\n")  # first: a key is never without it
            save_secret_context(secret, key_path, self._passphrase(fingerprint), ScryptParams())
            self._authority = KeyAuthority(secret, signer, **kwargs)
        return self._authority

    def handle(self, action: str, payload: Mapping[str, Any]) -> Payload:
        if action == "identify":
            signer = self._signer()
            return IdentifyReply(AUTHORITY_PARTY, ROLE_AUTHORITY, signer.public_key_hex).encode()
        if action == "setup":
            authority = self.authority()
            return AuthoritySetupReply(
                context=authority.public_context_bytes,
                fingerprint=authority.fingerprint,
                context_signature=authority.context_signature,  # clients verify it with the registry's key
                clients=sorted(authority.clients),
                k_min=self.policy.k_min,
                w_min=self.policy.w_min,  # the one floor: the server's router and fusions keep to it
            ).encode()
        if action == "decrypt":
            started = time.perf_counter()
            request = DecryptRequest.decode(payload)  # a malformed message is refused before any key is loaded
            try:
                response = self.authority().decrypt(request.request)
            except RowConflict as err:  # nothing decrypted or burned: the server may leave the round out
                return DecryptReply(refused=str(err), seconds=time.perf_counter() - started).encode()
            return DecryptReply(response=response, seconds=time.perf_counter() - started).encode()
        raise ProtocolError(f"the key authority does not handle {action!r}")

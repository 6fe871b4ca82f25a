"""The deployment's keys and certificates, made locally with `cryptography` (nothing is fetched).

Layout of a PKI directory (`secure-mor pki init`, `secure-mor pki node NAME`):

    ca.key, ca.crt                       the operator's certificate authority (ca.key: keep offline)
    superlink.key, superlink.crt         the SuperLink's TLS key and certificate, signed by the CA
    nodes/NAME/supernode-auth.key        NAME's SuperNode authentication key (EC P-384, OpenSSH)
    nodes/NAME/supernode-auth.pub        its public half: `flwr supernode register` takes it
    nodes/NAME/NAME.key, NAME.pub        NAME's Ed25519 payload-signing key (PKCS#8 PEM) and public hex
    registry/NAME.pub                    the public payload keys the ServerApp and the key authority trust

Every private key is written with mode 0600. NAME is a party of the protocol: `client-K`,
`authority` or `server` (the ServerApp's signing key; it runs no SuperNode, but gets a pair
like the others so that one command serves every party).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_mor.crypto.signing import Signer, save_signer

AUTH_KEY = "supernode-auth.key"
AUTH_PUB = "supernode-auth.pub"
REGISTRY = "registry"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1()  # the curve of Flower's own examples; any NIST curve passes its check


class PkiError(ValueError):
    """A PKI directory is missing something, or would be overwritten."""


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.directory / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.directory / "superlink.key"

    @property
    def registry(self) -> Path:
        return self.directory / REGISTRY

    def node_dir(self, name: str) -> Path:
        return self.directory / "nodes" / name

    def auth_key(self, name: str) -> Path:
        return self.node_dir(name) / AUTH_KEY

    def auth_public_key(self, name: str) -> Path:
        return self.node_dir(name) / AUTH_PUB

    def signing_key(self, name: str) -> Path:
        return self.node_dir(name) / f"{name}.key"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def init_pki(directory: Path | str, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365) -> Pki:
    """A CA and the SuperLink's TLS certificate for `hosts` (the names and addresses the
    SuperNodes, the SuperExec and `flwr` dial). Refuses to overwrite an existing CA."""
    pki = Pki(Path(directory))
    if pki.ca_key.exists():
        raise PkiError(f"{pki.ca_key} exists: a new CA would orphan every certificate it signed")
    if not hosts:
        raise PkiError("the SuperLink certificate needs at least one host name or address")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Secure MoR deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(pki.ca_key, _pem_key(ca_key))
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.superlink_key, _pem_key(server_key))
    pki.superlink_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pki.registry.mkdir(parents=True, exist_ok=True)
    return pki


def node_keys(directory: Path | str, name: str) -> Pki:
    """NAME's SuperNode authentication key pair (EC P-384, OpenSSH: what `flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` read) and its Ed25519
    payload-signing key, whose public half goes into the registry. Refuses to overwrite:
    rotating a key is a deliberate act (docs/deployment.md)."""
    pki = Pki(Path(directory))
    if pki.node_dir(name).exists():
        raise PkiError(f"{pki.node_dir(name)} exists: move it away first to rotate {name}'s keys")
    auth = ec.generate_private_key(CURVE)
    _write_private(
        pki.auth_key(name),
        auth.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = auth.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pki.auth_public_key(name).write_bytes(public + f" {name}\n".encode())
    signer = Signer.generate(name)
    save_signer(signer, pki.node_dir(name))
    pki.registry.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pki.node_dir(name) / f"{name}.pub", pki.registry / f"{name}.pub")
    return pki


def signing_key_dir(state_dir: Path | str, party: str) -> Path:
    """Where the node of `party` reads its Ed25519 key under its state directory (for the
    server: under its run directory): the paths the ClientApp and ServerApp already use."""
    state = Path(state_dir)
    if party.startswith("client-"):
        return state / "clients" / party / "keys"
    return state / party / "keys"


def install_signing_key(directory: Path | str, party: str, key_dir: Path | str) -> Path:
    """Copy `party`'s payload-signing key into `key_dir` (mode 0600), with its public half: its node's
    node config `key-dir`, or `signing_key_dir(state_dir, party)` where a node looks by default."""
    source = Pki(Path(directory)).signing_key(party)
    if not source.exists():
        raise PkiError(f"no signing key for {party} at {source}: run `secure-mor pki node {party}` first")
    target = Path(key_dir) / source.name
    _write_private(target, source.read_bytes())
    (target.parent / f"{party}.pub").write_text(source.with_suffix(".pub").read_text())
    return target

"""The deployment's keys and certificates, made locally with `cryptography` (nothing is fetched).

Every party makes its own private keys where it runs (`party_keys`, `secure-mor keys new
NAME`) and sends only their public halves to the operator, who registers them
(`register_party`, `secure-mor pki register NAME`): no private key of a party ever exists
at the operator's. The operator's PKI directory (`secure-mor pki init`):

    ca.key, ca.crt                       the operator's certificate authority (ca.key: keep offline)
    superlink.key, superlink.crt         the SuperLink's TLS key and certificate, signed by the CA
    nodes/NAME/supernode-auth.pub        NAME's SuperNode authentication key: `flwr supernode register` takes it
    registry/NAME.pub                    NAME's Ed25519 payload key (hex): what the ServerApp and the
    registry/NAME.sig                    key authority trust, and the CA's signature over the entry

A party's key directory (`party_keys`; the node config's `key-dir`, mode 0700):

    supernode-auth.key, supernode-auth.pub   its SuperNode authentication key pair (EC P-384, OpenSSH)
    NAME.key, NAME.pub                       its Ed25519 payload-signing key, PKCS#8 PEM encrypted under
                                             its passphrase, and the public half (hex)

Every private key is written with mode 0600. NAME is a party of the protocol: `client-K`,
`authority` or `server` (the ServerApp's signing key; it runs no SuperNode and makes no
SuperNode key).
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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_mor.crypto.signing import SignatureError, Signer, load_public_key, read_registry, save_signer

AUTH_KEY = "supernode-auth.key"
AUTH_PUB = "supernode-auth.pub"
REGISTRY = "registry"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1()  # the curve of Flower's own examples; any NIST curve passes its check
_ENTRY = b"secure-mor registry entry v1\x00"  # what the CA signs: this, NAME, a zero byte, the key hex


class PkiError(ValueError):
    """A PKI directory is missing something, would be overwritten, or a registry entry is not signed."""


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

    def auth_public_key(self, name: str) -> Path:
        return self.node_dir(name) / AUTH_PUB


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


def party_keys(key_dir: Path | str, name: str, passphrase: str, *, supernode: bool = True) -> list[Path]:
    """Run by party NAME where it runs: its Ed25519 payload-signing key, encrypted under `passphrase`,
    and (`supernode`: every party but the server) its SuperNode authentication key pair, in `key_dir`
    (0700). Returns the public files to send to the operator. Refuses to overwrite: rotating a key is a
    deliberate act (docs/deployment.md)."""
    directory = Path(key_dir)
    if not passphrase:
        raise PkiError(f"{name}'s signing key is encrypted at rest: give it a passphrase")
    if (directory / f"{name}.key").exists() or (directory / AUTH_KEY).exists():
        raise PkiError(f"{directory} already holds {name}'s keys: move them away first to rotate them")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    public = [save_signer(Signer.generate(name), directory, passphrase).with_suffix(".pub")]
    if supernode:
        auth = ec.generate_private_key(CURVE)
        _write_private(
            directory / AUTH_KEY,
            auth.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        pub = auth.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (directory / AUTH_PUB).write_bytes(pub + f" {name}\n".encode())
        public.append(directory / AUTH_PUB)
    return public


def register_party(directory: Path | str, name: str, public_dir: Path | str) -> Pki:
    """The operator registers NAME from the public files NAME sent (`public_dir`: NAME.pub and, for a
    SuperNode, supernode-auth.pub; nothing else is read): the SuperNode key for `flwr supernode register`,
    and the payload key into the registry with the CA's signature over the entry."""
    pki, source = Pki(Path(directory)), Path(public_dir)
    if not pki.ca_key.exists():
        raise PkiError(f"no CA at {pki.ca_key}: run `secure-mor pki init` first")
    if (pki.registry / f"{name}.pub").exists():
        raise PkiError(f"{name} is registered already: retire its entry first to rotate its keys")
    try:
        key_hex = (source / f"{name}.pub").read_text().strip()
        load_public_key(key_hex)
    except (OSError, SignatureError) as err:
        raise PkiError(f"no Ed25519 public key {name}.pub in {source}: {err}") from err
    if (source / AUTH_PUB).exists():
        pki.node_dir(name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / AUTH_PUB, pki.auth_public_key(name))
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    signature = ca_key.sign(_ENTRY + name.encode() + b"\x00" + key_hex.encode(), ec.ECDSA(hashes.SHA384()))
    pki.registry.mkdir(parents=True, exist_ok=True)
    (pki.registry / f"{name}.pub").write_text(key_hex + "\n")
    (pki.registry / f"{name}.sig").write_text(signature.hex() + "\n")
    return pki


def read_registry_signed(directory: Path | str, ca_cert: Path | str | None) -> dict[str, str]:
    """The registry's public payload keys ({party: hex}); with the operator's CA certificate, every
    entry must carry the CA's signature (PkiError otherwise: a key slipped into the registry
    directory is not trusted). Without one (a simulation's run-dir/keys), the entries as they are."""
    keys = read_registry(Path(directory))
    if ca_cert is None:
        return keys
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes()).public_key()
    for name, key_hex in keys.items():
        try:
            signature = bytes.fromhex((Path(directory) / f"{name}.sig").read_text().strip())
            ca.verify(signature, _ENTRY + name.encode() + b"\x00" + key_hex.encode(), ec.ECDSA(hashes.SHA384()))
        except (OSError, ValueError, InvalidSignature) as err:
            raise PkiError(f"registry entry {name!r} in {directory} is not signed by the operator's CA") from err
    return keys


def signing_key_dir(state_dir: Path | str, party: str) -> Path:
    """Where the node of `party` reads its Ed25519 key under its state directory (for the
    server: under its run directory): the paths the ClientApp and ServerApp already use."""
    state = Path(state_dir)
    if party.startswith("client-"):
        return state / "clients" / party / "keys"
    return state / party / "keys"

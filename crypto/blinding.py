"""Blinding at the source: every client masks its values before it encrypts them, with a mask
that only it and the server can derive, so the key authority, which decrypts the fusion it
computes from the clients' ciphertexts, sees masked values only.

Derivation, per reply. The server sends every client of a round its round key S (X25519,
public half; a fresh key per server session). Client k draws an ephemeral X25519 key e_k,
computes Z_k = X25519(e_k, S), and expands HKDF-SHA256(Z_k, info = "secure-mor mask v1" ||
context) into a ChaCha20 key stream: n values m_k uniform on [-M, M] (53 random bits each,
M = 2^mask_bits), where `context` names the reply (run, step, nonce, purpose, client, count,
CKKS context; crypto.wire). It encrypts clip(s_k) + m_k and puts e_k's public half into its
signed reply header. The server, holding S, derives the same m_k from that header. The key
authority sees e_k's public half and S's public half, and learns nothing of m_k unless it
solves computational Diffie-Hellman in X25519 (or colludes with the server or client k):
no mask ever travels, not even encrypted.

What the key authority can see. It may decrypt any client ciphertext it receives, not only
the fusion; every value it can decrypt is y = v + m + e, v a clipped score (|v| <= R) and m an
independent mask. A mask takes one of 2^53 values, uniformly: the multiples of the grid
g = 2M / 2^53 (2^-20 at M = 2^32) in [-M, M); clients round v to the same grid before they add
it (crypto.wire.seal_reply; unrounded, v mod g would show through: (v + m) mod g = v mod g).
So v + m is the mask's distribution shifted by |v - v'| / g grid points, at total-variation
distance exactly |v - v'| / (2M) from the same for v', and for two score vectors of n values
each from K clients, the authority's whole view of a round (all individual decryptions, hence
every fusion of them; CKKS adds its own noise to a function of v + m) differs by at most

    TV <= sum_{k,i} |v_ki - v'_ki| / (2M) <= n K R / M            (ReleaseConfig.statistical_distance)

per round: 2.9e-5 for one GRPO round of n = 4,096 values, K = 3, R = 10, M = 2^32; 9e-7 for a
router step of 128. Masks are fresh per reply, so T rounds add up: T n K R / M (1.2e-3 for a
GRPO run of 40 such rounds). This is statistical hiding, not 2^-128: M is capped by float64
precision (the fusion's decoding error grows as M 2^-52, see crypto.fusion and
authority.key_authority), not by CKKS headroom.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"secure-mor mask v1\x00"


class MaskError(ValueError):
    """A round key or a reply's ephemeral key is not an X25519 public key."""


def secure_uniform(n: int) -> np.ndarray:
    """n floats uniform on [0, 1) from the OS CSPRNG (53 random bits each)."""
    return _unit(os.urandom(8 * n))


def secure_gaussian(n: int) -> np.ndarray:
    """n standard normal floats from the OS CSPRNG (Box-Muller)."""
    u1, u2 = 1.0 - secure_uniform(n), secure_uniform(n)  # u1 in (0, 1]: log is finite
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _unit(stream: bytes) -> np.ndarray:
    bits = np.frombuffer(stream, dtype="<u8") >> np.uint64(11)
    return bits.astype(np.float64) * 2.0**-53


def _public_hex(key: X25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _public_key(hex_key: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except (ValueError, TypeError) as err:
        raise MaskError(f"not an X25519 public key: {str(hex_key)[:16]!r}") from err


def _exchange(private: X25519PrivateKey, public_hex: str) -> bytes:
    try:
        return private.exchange(_public_key(public_hex))
    except ValueError as err:  # a low-order point: the shared secret would be all zeros
        raise MaskError(f"X25519 key agreement failed: {err}") from err


def _mask(shared: bytes, context: bytes, n: int, bound: float) -> np.ndarray:
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + context).derive(shared)
    stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * n))
    return (2.0 * _unit(stream) - 1.0) * bound


def client_mask(round_key: str, context: bytes, n: int, bound: float) -> tuple[str, np.ndarray]:
    """Client side: (the ephemeral public key for the reply header, the n-value mask to add)."""
    ephemeral = X25519PrivateKey.generate()
    return _public_hex(ephemeral.public_key()), _mask(_exchange(ephemeral, round_key), context, n, bound)


class MaskKey:
    """The server's round key: its public half goes to the clients with every round's request."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._private = private or X25519PrivateKey.generate()

    @property
    def public_hex(self) -> str:
        return _public_hex(self._private.public_key())

    def mask(self, client_key: str, context: bytes, n: int, bound: float) -> np.ndarray:
        """The mask a client derived for a reply with ephemeral public key `client_key`."""
        return _mask(_exchange(self._private, client_key), context, n, bound)

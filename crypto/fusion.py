"""Routed fusion: sum_k W[:, k] * ct_k over CKKS-packed client vectors, as the key authority
computes it from the clients' own ciphertexts.

W is an N x K plaintext matrix (rows on the simplex, every entry >= w_min); each column
multiplies one client's packed ciphertexts slot-wise (ciphertext x plaintext), then the
products are added. `weights=None` is the unweighted sum used for secure aggregation of
router-gradient terms.

Precision with masked inputs. The clients encrypt masked values v + m with |m| <= M = 2^32
(crypto.blinding) at scale Delta = 2^40. CKKS encodes a plaintext weight w with an absolute
error of about sqrt(N) / scale (2.4e-11 std at N = 8192 and scale 2^40), and the product
carries that error times the masked value: 0.1 std at M = 2^32 if W were encoded at the
ciphertext's scale, as TenSEAL's `CKKSVector.mul` does (measured: max error 0.57 over 4,096
values). So W is encoded here at scale 2^60 through SEAL's own encoder (`tenseal.sealapi`),
which puts its error at 2^-60 sqrt(N) ~ 2e-17 times |v + m| <= 2^33: 2e-7. The product is
not rescaled: its scale 2^100 and values up to 2^33 need 134 of the fresh ciphertext's 140
modulus bits (checked). What remains is float64 decoding of values near 2^32, ~M 2^-52:
measured max 2.7e-6, std 6e-7 over 4,096 values (`crypto.release.measure_decryption_error`).
The server removes sum_k W[:, k] m_k in float64 (error ~M 2^-53).

A client missing from a step: `renormalise(W, present)` keeps the present columns and
divides each row by its remaining mass, so rows stay on the simplex and every remaining
weight only grows (the floor still holds for them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from secure_mor.crypto.context import remaining_modulus_bits, slot_count, top_chain_index
from secure_mor.crypto.packing import chunk_sizes, pack

SIMPLEX_TOLERANCE = 1e-6
WEIGHT_SCALE_BITS = 60  # W's encoding scale (module docstring)
HEADROOM_BITS = 3  # |value| * scale must stay below q / 2, with room for the CKKS error


class WeightError(ValueError):
    """A router weight matrix is not finite, not on the simplex, below the floor or misshapen."""


def validate_weights(weights: np.ndarray, n: int, k: int, w_min: float) -> np.ndarray:
    """Return W as float64 (n, k) or raise WeightError."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n, k):
        raise WeightError(f"weights have shape {w.shape}, expected ({n}, {k})")
    if not np.all(np.isfinite(w)):
        raise WeightError("weights contain NaN or infinity")
    if not w.size:
        return w
    low = float(w.min())
    if low < w_min:
        raise WeightError(f"a weight ({low:.3g}) is below the floor w_min={w_min}")
    worst = float(np.max(np.abs(w.sum(axis=1) - 1.0)))
    if worst > SIMPLEX_TOLERANCE:
        raise WeightError(f"rows must sum to 1 within {SIMPLEX_TOLERANCE} (worst deviation {worst:.3g})")
    return w


def renormalise(weights: np.ndarray, present: Sequence[bool]) -> np.ndarray:
    """Columns of the present clients, each row divided by its remaining mass."""
    w = np.asarray(weights, dtype=np.float64)
    mask = np.asarray(present, dtype=bool)
    if w.ndim != 2 or mask.shape != (w.shape[1],):
        raise WeightError(f"present mask of shape {mask.shape} does not match weights {w.shape}")
    if not mask.any():
        raise WeightError("no client is present")
    kept = w[:, mask]
    mass = kept.sum(axis=1, keepdims=True)
    if not np.all(np.isfinite(mass)) or np.any(mass <= 0):
        raise WeightError("a row has no weight left on the present clients")
    return kept / mass


@dataclass(frozen=True)
class Fused:
    """The fusion's ciphertexts (SEAL objects: one per chunk of slots) and each chunk's length."""

    ciphertexts: list[sealapi.Ciphertext]
    sizes: list[int]


def fuse(
    ctx: ts.Context,
    vectors_by_client: Sequence[Sequence[ts.CKKSVector]],
    weights: np.ndarray | None,
    *,
    value_bound: float,
) -> Fused:
    """sum_k W[:, k] * ct_k chunk by chunk (the plain sum when weights is None) of fresh
    ciphertexts whose values are within +-value_bound; the inputs are not modified."""
    if not vectors_by_client:
        raise WeightError("nothing to fuse")
    sizes = [v.size() for v in vectors_by_client[0]]
    if any([v.size() for v in vs] != sizes for vs in vectors_by_client):
        raise WeightError("clients' packed vectors differ in count or length")
    if sizes != chunk_sizes(sum(sizes), slot_count(ctx)):
        raise WeightError("packed vectors do not follow this context's slot packing")
    seal = ctx.seal_context().data
    evaluator = sealapi.Evaluator(seal)
    columns = [[v.ciphertext()[0] for v in vectors] for vectors in vectors_by_client]
    if weights is None:
        return Fused([_sum(evaluator, list(chunk)) for chunk in zip(*columns, strict=True)], sizes)
    n, k = sum(sizes), len(vectors_by_client)
    w = validate_weights(weights, n, k, 0.0)  # the shape and the simplex; the floor is the caller's policy
    bits = remaining_modulus_bits(ctx, top_chain_index(ctx))
    needed = math.log2(ctx.global_scale) + WEIGHT_SCALE_BITS + math.log2(max(value_bound, 1.0)) + HEADROOM_BITS
    if needed > bits:
        raise WeightError(f"a fusion of values up to {value_bound:.3g} needs {needed:.0f} modulus bits, has {bits}")
    encoder = sealapi.CKKSEncoder(seal)
    weight_chunks = [pack(w[:, j], slot_count(ctx)) for j in range(k)]
    out = []
    for c in range(len(sizes)):
        products = []
        for j in range(k):
            plain, product = sealapi.Plaintext(), sealapi.Ciphertext()
            encoder.encode(weight_chunks[j][c].tolist(), columns[j][c].parms_id(), 2.0**WEIGHT_SCALE_BITS, plain)
            evaluator.multiply_plain(columns[j][c], plain, product)
            products.append(product)
        out.append(_sum(evaluator, products))
    return Fused(out, sizes)


def _sum(evaluator: sealapi.Evaluator, ciphertexts: list[sealapi.Ciphertext]) -> sealapi.Ciphertext:
    out = sealapi.Ciphertext()
    evaluator.add_many(ciphertexts, out)
    return out


def decrypt_fused(secret: ts.Context, fused: Fused) -> np.ndarray:
    """The fusion's values (key authority only: `secret` holds the secret key)."""
    seal = secret.seal_context().data
    decryptor, encoder = sealapi.Decryptor(seal, secret.secret_key().data), sealapi.CKKSEncoder(seal)
    values = []
    for ciphertext, size in zip(fused.ciphertexts, fused.sizes, strict=True):
        plain = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plain)
        values.append(np.asarray(encoder.decode_double(plain), dtype=np.float64)[:size])
    return np.concatenate(values)


def insecure_plaintext_fusion(
    values_by_client: Sequence[np.ndarray], weights: np.ndarray | None
) -> np.ndarray:
    """INSECURE reference: fuses plaintext scores. For tests and the insecure benchmark
    baseline only; never use it on real client scores (the server would see them)."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values_by_client], axis=1)
    if weights is None:
        return stacked.sum(axis=1)
    return np.sum(stacked * np.asarray(weights, dtype=np.float64), axis=1)

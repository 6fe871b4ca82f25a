"""Routed fusion: sum_k W[:, k] * ct_k over CKKS-packed client vectors.

W is an N x K plaintext matrix (rows on the simplex, every entry >= w_min); each
column multiplies one client's packed ciphertexts slot-wise (ciphertext x
plaintext, one rescale), then the products are added. `weights=None` is the
unweighted sum used for secure aggregation of router-gradient terms (no rescale).

A client missing from a step: `renormalise(W, present)` keeps the present
columns and divides each row by its remaining mass, so rows stay on the simplex
and every remaining weight only grows (the floor still holds for them).

Rescale correction: TenSEAL's automatic rescale divides a product by the last
data prime q but then labels the result with the nominal scale Delta instead of
Delta^2 / q. The decrypted product is thus off by the factor Delta / q
(1 + 1.3e-7 at the default parameters: 1.3e-6 absolute at |x| = 10, which alone
would eat most of the precision budget). Multiplying the plaintext weights by
q / Delta cancels it exactly; the fused error drops to ~1e-8.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import numpy as np
import tenseal as ts

from secure_mor.crypto.context import rescale_prime, slot_count
from secure_mor.crypto.packing import chunk_sizes, pack

SIMPLEX_TOLERANCE = 1e-6


class WeightError(ValueError):
    """A router weight matrix is not finite, not on the simplex, below the floor or misshapen."""


def validate_weights(weights: np.ndarray, n: int, k: int, w_min: float) -> np.ndarray:
    """Return W as float64 (n, k) or raise WeightError."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n, k):
        raise WeightError(f"weights have shape {w.shape}, expected ({n}, {k})")
    if not np.all(np.isfinite(w)):
        raise WeightError("weights contain NaN or infinity")
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


def fuse(
    ctx: ts.Context,
    vectors_by_client: Sequence[Sequence[ts.CKKSVector]],
    weights: np.ndarray | None,
    *,
    w_min: float = 0.0,
) -> list[ts.CKKSVector]:
    """sum_k W[:, k] * ct_k chunk by chunk (or the plain sum when weights is None; with a
    single client that sum is the client's own vectors). The inputs are not modified."""
    if not vectors_by_client:
        raise WeightError("nothing to fuse")
    sizes = [v.size() for v in vectors_by_client[0]]
    if any([v.size() for v in vs] != sizes for vs in vectors_by_client):
        raise WeightError("clients' packed vectors differ in count or length")
    if sizes != chunk_sizes(sum(sizes), slot_count(ctx)):
        raise WeightError("packed vectors do not follow this context's slot packing")
    if weights is None:
        return [reduce(ts.CKKSVector.add, chunk) for chunk in zip(*vectors_by_client, strict=True)]
    n, k = sum(sizes), len(vectors_by_client)
    # Cancels TenSEAL's scale relabelling after the rescale (see the module docstring).
    correction = rescale_prime(ctx) / ctx.global_scale
    w = validate_weights(weights, n, k, w_min) * correction
    columns = [pack(w[:, j], slot_count(ctx)) for j in range(k)]
    # The products are fresh vectors, so they are summed in place (TenSEAL's copy() is slow).
    return [
        reduce(ts.CKKSVector.add_, [vectors_by_client[j][c].mul(columns[j][c].tolist()) for j in range(k)])
        for c in range(len(sizes))
    ]


def insecure_plaintext_fusion(
    values_by_client: Sequence[np.ndarray], weights: np.ndarray | None
) -> np.ndarray:
    """INSECURE reference: fuses plaintext scores. For tests and the insecure benchmark
    baseline only; never use it on real client scores (the server would see them)."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values_by_client], axis=1)
    if weights is None:
        return stacked.sum(axis=1)
    return np.sum(stacked * np.asarray(weights, dtype=np.float64), axis=1)

"""Packing N scores into ceil(N / slots) CKKS vectors and back.

Chunk j holds scores[j*slots : (j+1)*slots]; the last chunk may be shorter. TenSEAL
records each vector's length, and decryption returns exactly that many values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts

from secure_mor.crypto.context import slot_count


def n_chunks(n: int, slots: int) -> int:
    if n < 1 or slots < 1:
        raise ValueError(f"need n >= 1 and slots >= 1, got n={n}, slots={slots}")
    return -(-n // slots)


def chunk_sizes(n: int, slots: int) -> list[int]:
    count = n_chunks(n, slots)
    return [slots] * (count - 1) + [n - slots * (count - 1)]


def pack(values: np.ndarray, slots: int) -> list[np.ndarray]:
    """Split a 1-D array into consecutive chunks of at most `slots` values."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {values.shape}")
    bounds = np.cumsum([0, *chunk_sizes(len(values), slots)])
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def unpack(chunks: Sequence[Sequence[float] | np.ndarray], n: int) -> np.ndarray:
    """Concatenate chunks back into n values (raises ValueError on a length mismatch)."""
    out = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks]) if chunks else np.empty(0)
    if len(out) != n:
        raise ValueError(f"chunks hold {len(out)} values, expected {n}")
    return out


def encrypt_packed(ctx: ts.Context, values: np.ndarray) -> list[ts.CKKSVector]:
    """Encrypt values chunk by chunk under `ctx` (a public context suffices)."""
    return [ts.ckks_vector(ctx, chunk.tolist()) for chunk in pack(values, slot_count(ctx))]


def decrypt_packed(vectors: Sequence[ts.CKKSVector], n: int) -> np.ndarray:
    """Decrypt with the vectors' own (secret) context: key authority and tests only."""
    return unpack([v.decrypt() for v in vectors], n)

"""Blinded decryption, server side: a fresh secret mask hides the fused values from
the key authority.

The server adds a mask m, uniform on [-M, M] (M = 2^mask_bits, drawn from
os.urandom), slot-wise to every fused ciphertext (ciphertext + plaintext), asks
the authority to decrypt, and subtracts m from the answer. The authority sees
y = f + m + e (f the fused values, e the CKKS error), which is statistically
independent of f up to

    TV(view(f), view(f')) <= sum_i |f_i - f'_i| / (2M) <= n * D / (2M),

D the largest difference of two fused values (2R for rewards, which are convex
combinations of scores in [-R, R]; 2KR for a sum of K clipped gradient terms).
Default M = 2^32, R = 10: <= 2.3e-9 per value, <= 9.5e-6 for n = 4,096 values,
<= 1.5e-4 for n = 65,536. This is statistical hiding, not 2^-128: M is capped by
precision, not by CKKS headroom. Headroom after the fusion's rescale is ~2^59 at
the default parameters (100-bit modulus, scale 2^40), but float64 CKKS
encode/decode loses ~M * 2^-52: measured max error over 4,096 values 1.4e-8
(M = 2^20), 6.2e-7 (2^30), 2.9e-6 (2^32), 1.1e-5 (2^34), 5e-5 (2^36). 2^32 keeps
that well below the authority's flooding noise (sigma = 1e-5) and the 1e-4 budget.
The hiding also assumes float64 granularity (2^-20 at |y| ~ 2^32) is below the
CKKS and flooding noise, which it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts

from secure_mor.crypto.context import PublicContext, chain_index_of, remaining_modulus_bits
from secure_mor.crypto.packing import pack
from secure_mor.crypto.params import ReleaseConfig


def secure_uniform(n: int) -> np.ndarray:
    """n floats uniform on [0, 1) from the OS CSPRNG (53 random bits each)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0**-53


def secure_gaussian(n: int) -> np.ndarray:
    """n standard normal floats from the OS CSPRNG (Box-Muller)."""
    u1, u2 = 1.0 - secure_uniform(n), secure_uniform(n)  # u1 in (0, 1]: log is finite
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class Blinder:
    """Masks fused ciphertexts before they go to the key authority, and unmasks the answer."""

    pub: PublicContext
    config: ReleaseConfig = field(default_factory=ReleaseConfig)

    def blind(self, fused: Sequence[ts.CKKSVector]) -> tuple[list[ts.CKKSVector], np.ndarray]:
        """(masked ciphertexts, mask); keep the mask secret and use it once."""
        ctx = self.pub.context
        for vector in fused:
            level = chain_index_of(ctx, vector)
            if level is None:
                raise ValueError("ciphertext is not at a level of this context")
            bits = remaining_modulus_bits(ctx, level)
            # |value| * scale must stay below q / 2; 2 bits of margin for |f| <= M.
            if self.config.mask_bits + np.log2(ctx.global_scale) + 3 > bits:
                raise ValueError(f"mask 2^{self.config.mask_bits} exceeds a {bits}-bit modulus' headroom")
        n = sum(v.size() for v in fused)
        mask = (2.0 * secure_uniform(n) - 1.0) * self.config.mask_bound
        chunks = pack(mask, self.pub.slots)
        return [v.add(c.tolist()) for v, c in zip(fused, chunks, strict=True)], mask

    @staticmethod
    def unblind(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != mask.shape:
            raise ValueError(f"released values {values.shape} do not match the mask {mask.shape}")
        return values - mask


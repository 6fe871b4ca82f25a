"""Releasing a decrypted value: noise flooding and rounding (the key authority's last step before a
value leaves it), and the measurement of the CKKS decryption error that sets the flooding's sigma
(secure_mor.authority.key_authority's module docstring has the numbers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from secure_mor.crypto.blinding import secure_gaussian, secure_uniform
from secure_mor.crypto.context import create_secret_context, public_context_of
from secure_mor.crypto.fusion import decrypt_fused, fuse
from secure_mor.crypto.packing import encrypt_packed
from secure_mor.crypto.params import DEFAULT_PARAMS, CkksParams, ReleaseConfig


def flood_and_round(values: np.ndarray, config: ReleaseConfig) -> np.ndarray:
    """Integer levels k with k * 2^-round_bits = round(v + truncated Gaussian flooding)."""
    noise = np.clip(secure_gaussian(len(values)), -config.flood_clip, config.flood_clip) * config.flood_sigma
    return np.rint((np.asarray(values, dtype=np.float64) + noise) * 2.0**config.round_bits).astype(np.int64)



@dataclass(frozen=True)
class ErrorReport:
    """Max and standard deviation of |decrypted - exact| for one pipeline stage."""

    stage: str
    max_abs: float
    std: float


def measure_decryption_error(
    params: CkksParams = DEFAULT_PARAMS,
    *,
    n: int = 4096,
    k: int = 3,
    config: ReleaseConfig | None = None,
    seed: int = 0,
) -> list[ErrorReport]:
    """CKKS decryption error before flooding: a fresh ciphertext, an unmasked fusion, and a fusion of
    values masked at the source with the masks removed afterwards (what the server recovers)."""
    config = config or ReleaseConfig()
    rng = np.random.default_rng(seed)
    secret = create_secret_context(params)
    pub = public_context_of(secret)
    scores = [rng.uniform(-config.value_bound, config.value_bound, n) for _ in range(k)]
    masks = [(2.0 * secure_uniform(n) - 1.0) * config.mask_bound for _ in range(k)]
    weights = rng.dirichlet(np.ones(k), size=n)
    exact = np.sum(np.stack(scores, axis=1) * weights, axis=1)
    bound = config.value_bound + config.mask_bound
    plain = [encrypt_packed(pub.context, s) for s in scores]
    masked = [encrypt_packed(pub.context, s + m) for s, m in zip(scores, masks, strict=True)]
    removed = np.sum(np.stack(masks, axis=1) * weights, axis=1)
    fresh = decrypt_fused(secret, fuse(pub.context, [plain[0]], None, value_bound=bound)) - scores[0]
    fused = decrypt_fused(secret, fuse(pub.context, plain, weights, value_bound=bound)) - exact
    unmasked = decrypt_fused(secret, fuse(pub.context, masked, weights, value_bound=bound)) - removed - exact
    return [
        ErrorReport(stage, float(np.max(np.abs(err))), float(np.std(err)))
        for stage, err in (("fresh", fresh), (f"fused (K={k})", fused),
                           (f"fused, masked at the source (2^{config.mask_bits}), masks removed", unmasked))
    ]  # fmt: skip

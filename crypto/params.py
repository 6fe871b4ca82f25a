"""CKKS parameter sets and the release precision configuration.

A parameter set is only accepted if its total coefficient modulus (all primes,
including the special key-switching prime) stays within the 128-bit classical
security maximum of the HomomorphicEncryption.org standard: M. Albrecht et al.,
"Homomorphic Encryption Security Standard", HomomorphicEncryption.org, Toronto,
November 2018, Table 1 (uniform ternary secret, classical 128-bit column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# log2(q) maxima for 128-bit classical security (HE standard 2018, Table 1, ternary secret).
MAX_MODULUS_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}


class ParameterError(ValueError):
    """A CKKS parameter set is malformed or below 128-bit security."""


@dataclass(frozen=True)
class CkksParams:
    """One CKKS parameter set. `coeff_mod_bit_sizes` lists all primes: the data
    primes first, the special key-switching prime last (SEAL's convention)."""

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def validate(self) -> None:
        """Raise ParameterError unless the set is well formed and 128-bit secure."""
        n = self.poly_modulus_degree
        if n not in MAX_MODULUS_BITS_128:
            raise ParameterError(f"{self.name}: N={n} is not one of {sorted(MAX_MODULUS_BITS_128)}")
        if len(self.coeff_mod_bit_sizes) < 3:
            raise ParameterError(f"{self.name}: need >= 3 primes (one level for the fusion multiply)")
        limit = MAX_MODULUS_BITS_128[n]
        if self.total_modulus_bits > limit:
            raise ParameterError(
                f"{self.name}: total modulus {self.total_modulus_bits} bits exceeds the 128-bit-security "
                f"maximum of {limit} bits for N={n} (HomomorphicEncryption.org standard)"
            )
        if not 0 < self.scale_bits < min(self.coeff_mod_bit_sizes[0], self.coeff_mod_bit_sizes[-1]):
            raise ParameterError(f"{self.name}: scale 2^{self.scale_bits} must be below the outer primes")


PARAMETER_SETS: dict[str, CkksParams] = {
    p.name: p
    for p in (
        # The project default: 4096 slots; a fresh ciphertext's 140 data bits hold the fusion's
        # product unrescaled: scale 2^40 x W's scale 2^60 x masked values up to 2^33 (crypto.fusion).
        CkksParams("default", 8192, (60, 40, 40, 60), 40),
        # 8192 slots per ciphertext, same precision: fewer ciphertexts for large batches.
        CkksParams("large", 16384, (60, 40, 40, 60), 40),
        # Small and imprecise (scale 2^20, ~1e-3 error): only for fast structural tests and fuzzing;
        # too small to fuse masked values (crypto.fusion refuses: no headroom).
        CkksParams("small", 4096, (40, 20, 40), 20),
    )
}
DEFAULT_PARAMS = PARAMETER_SETS["default"]


def get_params(name: str) -> CkksParams:
    try:
        return PARAMETER_SETS[name]
    except KeyError as err:
        raise ParameterError(f"unknown parameter set {name!r}; known: {sorted(PARAMETER_SETS)}") from err


# The floor of every router weight: the key authority's policy, sent to the server at setup and
# enforced by both. What one fused release f_i = sum_k w_ik s_ik tells the server about client
# k's score s_ik (every score in [-R, R]): s_ik lies in an interval of half-width
#     h_ik = (1 - w_ik) R / w_ik                                       (`score_half_width`),
# narrowest for the largest weight a row can give one client. A row over K contributors gives one
# at most 1 - (K - 1) w_min, and the authority accepts rows over as few as k_min contributors (an
# honest dropout renormalises a row to them), so the bound is the one at K = k_min:
#     h = (k_min - 1) w_min R / (1 - (k_min - 1) w_min)                (`min_score_half_width`)
# = 0.204 at w_min = 0.02, k_min = 2, R = 10 (0.417 while all K = 3 clients answer).
DEFAULT_W_MIN = 0.02
DEFAULT_K_MIN = 2


def score_half_width(weight: float, value_bound: float) -> float:
    """Half-width of what one fused value tells about the score of a client of this weight."""
    return (1.0 - weight) * value_bound / weight


def min_score_half_width(w_min: float, k_min: int, value_bound: float) -> float:
    """The narrowest interval one release can place a score in: a row over k_min contributors
    that gives one of them all but the others' floors."""
    return score_half_width(1.0 - (k_min - 1) * w_min, value_bound)


@dataclass(frozen=True)
class ReleaseConfig:
    """How values are bounded, blinded, flooded and rounded (see authority/key_authority.py for the
    measurements behind the defaults).

    value_bound: R; clients clip their scores to [-R, R].
    mask_bits: every client's mask (crypto.blinding) is uniform on [-2^mask_bits, 2^mask_bits].
    flood_sigma: standard deviation of the authority's Gaussian flooding noise.
    flood_clip: the flooding noise is truncated at flood_clip * flood_sigma (a hard error bound).
    round_bits: released values are rounded to multiples of 2^-round_bits.
    """

    value_bound: float = 10.0
    mask_bits: int = 32
    flood_sigma: float = 1e-5
    flood_clip: float = 6.0
    round_bits: int = 17

    @property
    def mask_bound(self) -> float:
        return float(2**self.mask_bits)

    @property
    def mask_grid(self) -> float:
        """Every mask is a multiple of this (53 random bits over [-M, M]: 2M / 2^53), and clients
        round their clipped values to it, so a masked value carries nothing below it."""
        return 2.0 ** (self.mask_bits - 52)

    @property
    def precision(self) -> float:
        return 2.0**-self.round_bits

    def statistical_distance(self, n_values: int, clients: int, rounds: int = 1) -> float:
        """Upper bound on the total-variation distance between the key authority's views of two
        runs of `rounds` rounds of n_values scores from each of `clients` clients
        (crypto.blinding): T n K R / M."""
        return min(1.0, rounds * n_values * clients * self.value_bound / self.mask_bound)

    def validate(self) -> None:
        if not (math.isfinite(self.value_bound) and self.value_bound > 0):
            raise ParameterError("value_bound must be positive and finite")
        if not (self.flood_sigma > 0 and self.flood_clip > 0 and 1 <= self.round_bits <= 40):
            raise ParameterError("flood_sigma, flood_clip must be > 0 and round_bits in [1, 40]")
        if self.mask_bound <= 1e3 * self.value_bound:
            raise ParameterError("the mask bound must be much larger than R (>= 1000 R)")

"""Homomorphic-encryption throughput of Secure MoR, measured in one run.

    python bench/he_throughput.py

Prints: client encrypt + serialize + sign throughput against raw TenSEAL
encryption; fusion cost against K and N (with the INSECURE plaintext fusion for
contrast); wire bytes per score against one ciphertext per score; the CKKS
decryption error behind the authority's flooding choice. Single-threaded TenSEAL,
default parameters. No assertions on time: the numbers depend on the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import tenseal as ts

from secure_mor.crypto.blinding import MaskKey
from secure_mor.crypto.context import create_secret_context, public_context_of
from secure_mor.crypto.fusion import fuse, insecure_plaintext_fusion
from secure_mor.crypto.packing import encrypt_packed, pack
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.release import measure_decryption_error
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import new_nonce, seal_reply

R = 10.0


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls (the median resists other load on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    pub = public_context_of(create_secret_context())
    ctx = pub.context
    client = Signer.generate("client-0")
    round_key = MaskKey().public_hex

    print("== client reply: encrypt + serialize + sign vs raw TenSEAL encryption (N = 65,536 scores)")
    scores = rng.uniform(-R, R, 65_536)
    chunks = pack(scores, pub.slots)

    def raw_encrypt() -> None:
        [ts.ckks_vector(ctx, c.tolist()) for c in chunks]

    def raw_encrypt_serialize() -> None:
        [ts.ckks_vector(ctx, c.tolist()).serialize() for c in chunks]

    def secure_reply() -> None:
        seal_reply(
            client, pub, run_id="bench", step=0, nonce=new_nonce(), purpose="reward", scores=scores, mask_key=round_key
        )

    # Interleaved rounds after a warm-up, so that background load hits all three paths alike.
    secure_reply()
    rounds: dict[str, list[float]] = {"raw": [], "raw+ser": [], "secure": []}
    for _ in range(7):
        rounds["raw"].append(timed(raw_encrypt, 1))
        rounds["raw+ser"].append(timed(raw_encrypt_serialize, 1))
        rounds["secure"].append(timed(secure_reply, 1))
    t_raw, t_ser, t_secure = (statistics.median(rounds[k]) for k in ("raw", "raw+ser", "secure"))
    print(f"{'path':<44}{'s / 65,536':>12}{'scores/s':>12}{'ratio':>8}")
    for name, t in [
        ("raw TenSEAL encryption", t_raw),
        ("raw TenSEAL encryption + serialize", t_ser),
        ("seal_reply (clip+mask+pack+encrypt+ser.+sign)", t_secure),
    ]:
        print(f"{name:<44}{t:>12.3f}{65_536 / t:>12,.0f}{t_raw / t:>8.2f}")
    print(
        f"throughput ratio secure / raw encryption = {t_raw / t_secure:.2f} (goal >= 0.8); "
        f"secure / (raw encryption + serialize) = {t_ser / t_secure:.2f}"
    )

    print("\n== fusion sum_k W[:,k] * ct_k (ciphertext x plaintext, the authority's), vs the INSECURE plaintext fusion")
    bound = ReleaseConfig().value_bound + ReleaseConfig().mask_bound
    print(f"{'K':>3}{'N':>8}{'cts/client':>12}{'HE fusion s':>13}{'plain s (INSECURE)':>20}{'HE/plain':>10}")
    for n in (1024, 4096, 16384):
        for k in (2, 3, 5):
            values = [rng.uniform(-R, R, n) for _ in range(k)]
            vectors = [encrypt_packed(ctx, v) for v in values]
            weights = rng.dirichlet(np.ones(k), size=n)
            t_he = timed(lambda: fuse(ctx, vectors, weights, value_bound=bound), 3)  # noqa: B023 (called at once)
            t_plain = timed(lambda: insecure_plaintext_fusion(values, weights), 20)  # noqa: B023
            print(f"{k:>3}{n:>8}{len(vectors[0]):>12}{t_he:>13.4f}{t_plain:>20.6f}{t_he / t_plain:>10.0f}")

    print("\n== wire bytes per score (default parameters, one signed client reply)")
    print(f"{'N':>8}{'reply bytes':>14}{'B/score':>10}{'naive B/score':>16}{'naive/packed':>14}")
    sample = 16  # naive: one ciphertext per score, measured on a small sample and extrapolated
    naive = sum(len(ts.ckks_vector(ctx, [float(x)]).serialize()) for x in scores[:sample]) / sample
    for n in (4096, 65_536):
        reply = seal_reply(client, pub, run_id="bench", step=0, nonce=new_nonce(), purpose="reward",
                           scores=scores[:n], mask_key=round_key)  # fmt: skip
        per_score = len(reply) / n
        print(f"{n:>8}{len(reply):>14,}{per_score:>10.1f}{naive:>16,.0f}{naive / per_score:>14,.0f}")
    print("goal <= 100 B/score")

    print("\n== CKKS decryption error at the default parameters (N=4096 values, K=3, R=10)")
    config = ReleaseConfig()
    for report in measure_decryption_error(n=4096, config=config):
        print(f"{report.stage:<58} max |err| {report.max_abs:.2e}   std {report.std:.2e}")
    print(
        f"release: Gaussian flooding sigma={config.flood_sigma:g} clipped at {config.flood_clip:g} sigma, "
        f"rounded to 2^-{config.round_bits} = {config.precision:.2e}"
    )
    print(
        f"masks: uniform on the 2^-{52 - config.mask_bits} grid of +-2^{config.mask_bits} per client value, "
        f"statistical distance of the authority's view <= {config.statistical_distance(4096, 3):.1e} per round "
        f"of 4,096 values of K = 3 clients, {config.statistical_distance(4096, 3, rounds=40):.1e} over 40 rounds"
    )


if __name__ == "__main__":
    main()

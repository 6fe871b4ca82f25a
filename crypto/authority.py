"""The key authority: holds the CKKS secret key; decrypts only fusions it computed itself.

A decryption request (crypto.wire) carries the clients' signed replies, whole, and W; never
a ciphertext of the server's. Decrypting a ciphertext the requester chose is a decryption
oracle: (c0, c1) = (0, Delta) decrypts to the secret key itself (its canonical embedding,
within +-192, inside any range check), and noise flooding cannot hide a plaintext that is
the key. So the authority forms ct = sum_k W[:, k] * ct_k from the verified client
ciphertexts itself (crypto.fusion) and decrypts only that.

Policy (checked in this order; a violation raises PolicyError, a malformed request
PayloadError, and nothing is decrypted):

1. the request is signed by the server and well formed (wire.parse_request);
2. every client reply verifies: signed by a registered client, for exactly this (run, step,
   nonce, purpose, n_scores, context), well-formed ciphertexts at the fresh level and scale;
3. (run_id, nonce) was never seen, even before a restart (persisted, fsync'ed);
4. the step is fresh: larger than the last released step of this run and purpose;
5. at least k_min distinct registered clients contribute;
6. rewards: W is N x K, finite, rows on the simplex (1e-6), every entry >= w_min (the
   authority's own floor, which it tells the server at setup); every reply commits to the
   request's item digests; an item digest keeps one W row for the whole run: within the
   request and against every earlier release of the run (persisted), over the same clients
   (`ROW_TOLERANCE`). Router gradients: no W and no items (a plain sum);
7. after decryption: every value lies within the range a fusion of masked clipped scores can
   take (|v| <= R + M, or K (R + M) for a sum); otherwise nothing is released.
The nonce, the step and the run's new W rows are burned (persisted) once checks 1-6 pass,
before anything is decrypted, so a refusal at 7 cannot be retried with the same nonce.

What the authority learns: the clients mask their values at the source (crypto.blinding), so
every value it can decrypt, a client's or the fusion's, is masked; it also sees W and the
items' digests (hashes of public prompts).

Releases are never raw CKKS decryptions: CKKS decryptions carry an error term that is a
function of the secret key, and releasing them lets anyone holding the ciphertexts recover
the key (Li and Micciancio, "On the Security of Homomorphic Encryption on Approximate
Numbers", EUROCRYPT 2021). Each released value is v + clip(N(0, sigma^2), +-6 sigma),
rounded to a multiple of 2^-17.

Measured at the default parameters (N = 8192, [60, 40, 40, 60], scale 2^40, R = 10,
K = 3, 4,096 values, `measure_decryption_error`; error of the value the server recovers,
before flooding):
  fresh ciphertext:                              max |error| 6.3e-9, std 1.2e-9
  fused (K = 3, W at scale 2^60), no masks:      max |error| 5.5e-9, std 8.7e-10
  fused, masked at the source (M = 2^32),
  masks removed by the server:                   max |error| 2.4e-6, std 6.2e-7 (float64 decoding of |y| ~ 2^32)
Choice: sigma = 1e-5, i.e. ~8,000x the secret-key-dependent CKKS error and ~16x the
float64 decoding error at M = 2^32; rounding step 2^-17 = 7.6e-6.
Worst-case error of a released value: 2.4e-6 + 6e-5 + 3.8e-6, plus the clients' rounding to
the masks' grid (2^-21 = 4.8e-7, crypto.blinding), < 7e-5 (typical ~1e-5), inside the 1e-4 budget. This is a heuristic mitigation: flooding with a provable
2^-lambda statistical distance would need sigma ~ 2^lambda times the error, i.e. a
larger scale and parameters than the default.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from secure_mor.audits.ledger import (
    KIND_REWARD_RELEASE,
    KIND_ROUTER_GRADIENT_RELEASE,
    Ledger,
    no_privacy_cost_event,
)
from secure_mor.crypto.blinding import secure_gaussian, secure_uniform
from secure_mor.crypto.context import (
    ScryptParams,
    create_secret_context,
    load_secret_context,
    public_context_of,
    save_secret_context,
)
from secure_mor.crypto.fusion import WeightError, decrypt_fused, fuse, validate_weights
from secure_mor.crypto.packing import encrypt_packed
from secure_mor.crypto.params import DEFAULT_PARAMS, DEFAULT_W_MIN, CkksParams, ReleaseConfig, score_half_width
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import (
    DEFAULT_LIMITS,
    ClientReply,
    DecryptionRequest,
    Expected,
    PayloadError,
    WireLimits,
    build_response,
    items_digest,
    parse_reply,
    parse_request,
)

LEDGER_KINDS = {"reward": KIND_REWARD_RELEASE, "router_gradient": KIND_ROUTER_GRADIENT_RELEASE}
STATE_FILE = "released.jsonl"
# Two rows of one item that differ by at most this (per client) count as the same row: their
# two releases differ by sum_k (w_k - w'_k) s_k, |.| <= K * ROW_TOLERANCE * R = 3e-8, far below the
# flooding noise (sigma 1e-5), so together they say nothing more than one of them. It absorbs
# the float rounding of features computed in batches of different sizes (~1e-15).
ROW_TOLERANCE = 1e-9

Row = dict[str, float]  # client -> weight


class PolicyError(ValueError):
    """The key authority refuses a well-formed request: its policy does not allow the release."""


@dataclass(frozen=True)
class AuthorityPolicy:
    k_min: int = 2
    w_min: float = DEFAULT_W_MIN
    limits: WireLimits = DEFAULT_LIMITS


@dataclass
class _ReleaseState:
    """Burned (run, nonce) pairs, the last step per (run, purpose) and every item's W row per run,
    persisted as JSON Lines."""

    path: Path
    nonces: set[tuple[str, str]] = field(default_factory=set)
    last_step: dict[tuple[str, str], int] = field(default_factory=dict)
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)  # (run, item digest hex) -> row

    def reload(self) -> None:
        """Re-read the file: another process of the same authority may have released since."""
        self.nonces, self.last_step, self.rows = set(), {}, {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                try:
                    entry = json.loads(line)
                    self._note(entry["run_id"], entry["nonce"], entry["purpose"], int(entry["step"]), entry["rows"])
                except (ValueError, KeyError, TypeError) as err:
                    raise PolicyError(f"release state {self.path} line {number} is damaged; not starting") from err

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Check-and-burn is atomic across processes (advisory lock next to the file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _note(self, run_id: str, nonce: str, purpose: str, step: int, rows: Mapping[str, Row]) -> None:
        self.nonces.add((run_id, nonce))
        key = (run_id, purpose)
        self.last_step[key] = max(step, self.last_step.get(key, -1))
        self.rows.update({(run_id, digest): dict(row) for digest, row in rows.items()})

    def burn(self, run_id: str, nonce: str, purpose: str, step: int, rows: Mapping[str, Row]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"run_id": run_id, "nonce": nonce, "purpose": purpose, "step": step, "rows": rows}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a restarted authority must still refuse this nonce and keep the rows
        self._note(run_id, nonce, purpose, step, rows)


def flood_and_round(values: np.ndarray, config: ReleaseConfig) -> np.ndarray:
    """Integer levels k with k * 2^-round_bits = round(v + truncated Gaussian flooding)."""
    noise = np.clip(secure_gaussian(len(values)), -config.flood_clip, config.flood_clip) * config.flood_sigma
    return np.rint((np.asarray(values, dtype=np.float64) + noise) * 2.0**config.round_bits).astype(np.int64)


def _same_row(a: Row, b: Row) -> bool:
    return a.keys() == b.keys() and all(abs(a[c] - b[c]) <= ROW_TOLERANCE for c in a)


class KeyAuthority:
    """Holds the secret context; `decrypt(request)` is its only way to release anything.

    clients: {client_id: Ed25519 public key hex} of the registered clients;
    server_public_key: the key that must sign decryption requests;
    state_dir: where burned nonces, released steps and W rows persist across restarts;
    ledger: where each release is logged (None: no logging, for unit tests)."""

    def __init__(
        self,
        secret: ts.Context,
        signer: Signer,
        *,
        clients: Mapping[str, str],
        server_public_key: str,
        state_dir: Path | str,
        policy: AuthorityPolicy | None = None,
        release: ReleaseConfig | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        if not secret.is_private():
            raise ValueError("the key authority needs the secret context")
        self.signer = signer
        self._secret = secret
        self.public = public_context_of(secret)
        self.clients = dict(clients)
        self.server_public_key = server_public_key
        self.policy = policy or AuthorityPolicy()
        self.release = release or ReleaseConfig()
        self.release.validate()
        self.ledger = ledger
        self._state = _ReleaseState(Path(state_dir) / STATE_FILE)

    @classmethod
    def create(
        cls,
        key_path: Path | str,
        passphrase: str,
        signer: Signer,
        *,
        params: CkksParams = DEFAULT_PARAMS,
        kdf: ScryptParams | None = None,
        **kwargs: Any,
    ) -> KeyAuthority:
        """A fresh context; its secret key is written to `key_path` encrypted under `passphrase`."""
        secret = create_secret_context(params)
        save_secret_context(secret, key_path, passphrase, kdf or ScryptParams())
        return cls(secret, signer, **kwargs)

    @classmethod
    def open(cls, key_path: Path | str, passphrase: str, signer: Signer, **kwargs: Any) -> KeyAuthority:
        """Restart from the secret context at rest (KeyStoreError on a wrong passphrase)."""
        return cls(load_secret_context(key_path, passphrase), signer, **kwargs)

    @property
    def public_context_bytes(self) -> bytes:
        return self.public.data

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def decrypt(self, request: bytes) -> bytes:
        """Check the policy, fuse the verified client ciphertexts, decrypt, flood, round, sign, log.
        Returns the signed response."""
        req = parse_request(request, self.public, self.server_public_key, self.policy.limits)
        replies = self._verified_replies(req)
        contributors = [r.client_id for r in replies]
        with self._state.locked():
            self._state.reload()
            rows = self._check_policy(req, replies)
            self._state.burn(req.run_id, req.nonce, req.purpose, req.step, rows)
        bound = self.release.value_bound + self.release.mask_bound
        fused = fuse(self.public.context, [r.ciphertexts for r in replies], req.weights, value_bound=bound)
        values = decrypt_fused(self._secret, fused)
        if not np.all(np.abs(values) <= bound * (1 if req.weights is not None else len(replies)) * (1 + 1e-9)):
            raise PolicyError("the fusion decrypts out of range for masked clipped scores; nothing released")
        levels = flood_and_round(values, self.release)
        response = build_response(self.signer, req, levels, self.release.round_bits)
        if self.ledger is not None:
            self._log(self.ledger, req, contributors, response)
        return response

    def _verified_replies(self, req: DecryptionRequest) -> list[ClientReply]:
        expected = Expected(req.run_id, req.step, req.nonce, req.purpose, req.n_scores)
        replies = []
        for i, raw in enumerate(req.replies):
            try:
                replies.append(parse_reply(raw, self.public, self.clients, expected, self.policy.limits))
            except PayloadError as err:
                raise PolicyError(f"client reply {i} does not verify: {err}") from err
        return replies

    def _check_policy(self, req: DecryptionRequest, replies: Sequence[ClientReply]) -> dict[str, Row]:
        """Refuse (PolicyError) what the policy forbids; returns the item rows this release adds to the run."""
        if (req.run_id, req.nonce) in self._state.nonces:
            raise PolicyError(f"replayed nonce {req.nonce} for run {req.run_id!r}")
        last = self._state.last_step.get((req.run_id, req.purpose), -1)
        if req.step <= last:
            raise PolicyError(f"stale step {req.step}: {req.purpose} of step {last} was already released")
        contributors = [r.client_id for r in replies]
        if len(set(contributors)) != len(contributors):
            raise PolicyError(f"duplicate contributors in {contributors}")
        if len(contributors) < self.policy.k_min:
            raise PolicyError(f"too few contributors: {len(contributors)} < k_min={self.policy.k_min}")
        if req.purpose == "router_gradient":
            if req.weights is not None or any(r.statement.items is not None for r in replies):
                raise PolicyError("a router-gradient release is a plain sum and takes no weights or items")
            return {}
        if req.weights is None or req.items is None:
            raise PolicyError("a reward release needs the router weights W and the items' digests")
        try:
            w = validate_weights(req.weights, req.n_scores, len(contributors), self.policy.w_min)
        except WeightError as err:
            raise PolicyError(f"invalid W: {err}") from err
        committed = items_digest(req.items)
        for reply in replies:
            if reply.statement.items != committed:
                raise PolicyError(f"the reply of {reply.client_id!r} commits to other items than the request names")
        return self._new_rows(req.run_id, req.items, w, contributors)

    def _new_rows(self, run_id: str, items: Sequence[bytes], w: np.ndarray, contributors: list[str]) -> dict[str, Row]:
        """One W row per item digest for the whole run: two rows about the same scores would give
        the server two equations in them (and K such rows, every client's score)."""
        new: dict[str, Row] = {}
        for i, item in enumerate(items):
            digest, row = item.hex(), dict(zip(contributors, w[i].tolist(), strict=True))
            earlier = new.get(digest) or self._state.rows.get((run_id, digest))
            if earlier is None:
                new[digest] = row
            elif not _same_row(earlier, row):
                raise PolicyError(
                    f"item {i} ({digest[:12]}...) was fused with another W row (or other clients) in this run; "
                    "one item keeps one row"
                )
        return {d: r for d, r in new.items() if (run_id, d) not in self._state.rows}

    def _log(self, ledger: Ledger, req: DecryptionRequest, contributors: list[str], response: bytes) -> None:
        w_max = None if req.weights is None else float(req.weights.max())
        ledger.append(
            self.signer,
            LEDGER_KINDS[req.purpose],
            mechanism=no_privacy_cost_event(),
            epsilon=0.0,
            delta=0.0,
            accountant="none (post-processing)",
            total_epsilon=0.0,
            details={
                "run_id": req.run_id,
                "step": req.step,
                "nonce": req.nonce,
                "purpose": req.purpose,
                "contributors": sorted(contributors),
                "count": req.n_scores,
                "precision": self.release.precision,
                "flood_sigma": self.release.flood_sigma,
                "context": self.fingerprint,
                # what the release tells the server about its most exposed score (crypto.params)
                "max_weight": w_max,
                "score_half_width": None if w_max is None else score_half_width(w_max, self.release.value_bound),
                "weights_sha256": None
                if req.weights is None
                else hashlib.sha256(np.ascontiguousarray(req.weights, "<f8").tobytes()).hexdigest(),
                "items_sha256": None if req.items is None else items_digest(req.items),
                "request_sha256": req.sha256,
                "response_sha256": hashlib.sha256(response).hexdigest(),
            },
        )


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

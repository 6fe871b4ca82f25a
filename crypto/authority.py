"""The key authority: holds the CKKS secret key, decrypts only what its policy allows.

Policy (checked in this order; a violation raises PolicyError, a malformed
request PayloadError, and nothing is decrypted):

1. the request is signed by the server and well formed (wire.parse_request);
2. (run_id, nonce) was never seen, even before a restart (persisted, fsync'ed);
3. the step is fresh: larger than the last released step of this run and purpose;
4. at least k_min distinct registered clients made signed statements for exactly
   this (run, step, nonce, purpose, n_scores, context);
5. rewards: W is N x K, finite, rows on the simplex (1e-6), every entry >= w_min;
   router gradients: no W (plain sum);
6. re-derive mode: the full client replies match their statements, and the
   authority's own sum_k W[:, k] * ct_k decrypts to the submitted ciphertext's
   values (within rederive_tolerance);
7. after decryption: every value lies within the range a fusion of clipped scores
   can take (plus the mask bound in blinded mode); otherwise nothing is released
   (a ciphertext that is not such a fusion would leak key material).
The nonce and step are burned (persisted) once checks 1-5 pass, before anything is
decrypted, so a refusal at 6 or 7 cannot be retried with the same nonce.

Blinded versus re-derive mode. In blinded mode the server masks the fused
ciphertext (blinding.py) and the authority receives the clients' statements but
none of their ciphertexts: given them it could compute and decrypt the unmasked
fusion itself. So it cannot check that the submitted ciphertext really is
sum_k W ct_k; it relies on the server following the protocol (honest-but-curious,
as in the threat model), and its signature on the request keeps outsiders from
submitting. A server that deviated could submit a single client's ciphertext, or
a crafted one, and the range check (7) is the only guard. Re-derive mode (for
audits) closes that gap: the authority recomputes the fusion from the client
replies and refuses on mismatch, but then it sees the unblinded fused values.

Releases are never raw CKKS decryptions: CKKS decryptions carry an error term
that is a function of the secret key, and releasing them lets anyone holding the
ciphertexts recover the key (Li and Micciancio, "On the Security of Homomorphic
Encryption on Approximate Numbers", EUROCRYPT 2021). Each released value is
v + clip(N(0, sigma^2), +-6 sigma), rounded to a multiple of 2^-17.

Measured at the default parameters (N = 8192, [60, 40, 40, 60], scale 2^40,
R = 10, K = 3, 4,096 values, `measure_decryption_error`):
  fresh ciphertext:                  max |error| ~ 1e-8,  std ~ 1.2e-9
  fused (mul + rescale, K = 3):      max |error| ~ 1.4e-8, std ~ 2.3e-9
  fused + blinding mask M = 2^32:    max |error| ~ 3e-6,  std ~ 7e-7 (float64 decoding of |y| ~ 2^32)
Choice: sigma = 1e-5, i.e. ~4,000x (2^12) the secret-key-dependent CKKS error and
~14x the float64 decoding error at M = 2^32; rounding step 2^-17 = 7.6e-6.
Worst-case error of a released, unblinded value: 3e-6 + 6e-5 + 3.8e-6 < 7e-5
(typical ~1e-5), inside the 1e-4 budget. This is a heuristic mitigation: flooding
with a provable 2^-lambda statistical distance would need sigma ~ 2^lambda times
the error, i.e. a larger scale and parameters than the default.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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
from secure_mor.crypto.blinding import Blinder, secure_gaussian
from secure_mor.crypto.context import (
    ScryptParams,
    create_secret_context,
    load_secret_context,
    public_context_of,
    save_secret_context,
)
from secure_mor.crypto.fusion import WeightError, fuse, validate_weights
from secure_mor.crypto.packing import encrypt_packed, unpack
from secure_mor.crypto.params import DEFAULT_PARAMS, CkksParams, ReleaseConfig
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import (
    DEFAULT_LIMITS,
    DecryptionRequest,
    Expected,
    PayloadError,
    WireLimits,
    build_response,
    parse_reply,
    parse_request,
    parse_statement,
)

LEDGER_KINDS = {"reward": KIND_REWARD_RELEASE, "router_gradient": KIND_ROUTER_GRADIENT_RELEASE}
STATE_FILE = "released.jsonl"


class PolicyError(ValueError):
    """The key authority refuses a well-formed request: its policy does not allow the release."""


@dataclass(frozen=True)
class AuthorityPolicy:
    k_min: int = 2
    w_min: float = 0.01
    rederive_tolerance: float = 1e-6
    limits: WireLimits = DEFAULT_LIMITS


class _ReleaseState:
    """Burned (run, nonce) pairs and the last step per (run, purpose), persisted as JSON Lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reload()

    def reload(self) -> None:
        """Re-read the file: another process of the same authority may have released since."""
        self.nonces: set[tuple[str, str]] = set()
        self.last_step: dict[tuple[str, str], int] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                try:
                    entry = json.loads(line)
                    self._note(entry["run_id"], entry["nonce"], entry["purpose"], int(entry["step"]))
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

    def _note(self, run_id: str, nonce: str, purpose: str, step: int) -> None:
        self.nonces.add((run_id, nonce))
        key = (run_id, purpose)
        self.last_step[key] = max(step, self.last_step.get(key, -1))

    def burn(self, run_id: str, nonce: str, purpose: str, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"run_id": run_id, "nonce": nonce, "purpose": purpose, "step": step}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a restarted authority must still refuse this nonce
        self._note(run_id, nonce, purpose, step)


def flood_and_round(values: np.ndarray, config: ReleaseConfig) -> np.ndarray:
    """Integer levels k with k * 2^-round_bits = round(v + truncated Gaussian flooding)."""
    noise = np.clip(secure_gaussian(len(values)), -config.flood_clip, config.flood_clip) * config.flood_sigma
    return np.rint((np.asarray(values, dtype=np.float64) + noise) * 2.0**config.round_bits).astype(np.int64)


class KeyAuthority:
    """Holds the secret context; `decrypt(request)` is its only way to release anything.

    clients: {client_id: Ed25519 public key hex} of the registered clients;
    server_public_key: the key that must sign decryption requests;
    state_dir: where burned nonces and released steps persist across restarts;
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
        self.public = public_context_of(secret)
        self.clients = dict(clients)
        self.server_public_key = server_public_key
        self.policy = policy or AuthorityPolicy()
        self.release = release or ReleaseConfig()
        self.release.validate()
        self.ledger = ledger
        self._secret_key = secret.secret_key()
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
        """Check the policy, decrypt, flood, round, sign, log. Returns the signed response."""
        req = parse_request(request, self.public, self.server_public_key, self.policy.limits)
        with self._state.locked():
            self._state.reload()
            contributors = self._check_policy(req)
            self._state.burn(req.run_id, req.nonce, req.purpose, req.step)
        vectors = self._rederive(req) if req.mode == "rederive" else req.ciphertexts
        values = self._decrypt(vectors, req.n_scores)
        self._check_range(req, values)
        levels = flood_and_round(values, self.release)
        response = build_response(self.signer, req, levels, self.release.round_bits)
        if self.ledger is not None:
            self._log(self.ledger, req, contributors, response)
        return response

    def _check_policy(self, req: DecryptionRequest) -> list[str]:
        if (req.run_id, req.nonce) in self._state.nonces:
            raise PolicyError(f"replayed nonce {req.nonce} for run {req.run_id!r}")
        last = self._state.last_step.get((req.run_id, req.purpose), -1)
        if req.step <= last:
            raise PolicyError(f"stale step {req.step}: {req.purpose} of step {last} was already released")
        expected = Expected(req.run_id, req.step, req.nonce, req.purpose, req.n_scores)
        contributors = []
        for i, raw in enumerate(req.statements):
            try:
                statement = parse_statement(raw, self.clients, self.fingerprint, expected, self.policy.limits)
            except PayloadError as err:
                raise PolicyError(f"statement {i} does not verify: {err}") from err
            contributors.append(statement.client_id)
        if len(set(contributors)) != len(contributors):
            raise PolicyError(f"duplicate contributors in {contributors}")
        if len(contributors) < self.policy.k_min:
            raise PolicyError(f"too few contributors: {len(contributors)} < k_min={self.policy.k_min}")
        if req.purpose == "reward":
            if req.weights is None:
                raise PolicyError("a reward release needs the router weights W")
            try:
                validate_weights(req.weights, req.n_scores, len(contributors), self.policy.w_min)
            except WeightError as err:
                raise PolicyError(f"invalid W: {err}") from err
        elif req.weights is not None:
            raise PolicyError("a router-gradient release is a plain sum and takes no weights")
        return contributors

    def _rederive(self, req: DecryptionRequest) -> list[ts.CKKSVector]:
        """Recompute sum_k W ct_k from the client replies; refuse if the submission differs."""
        expected = Expected(req.run_id, req.step, req.nonce, req.purpose, req.n_scores)
        replies = []
        for raw_statement, payload in zip(req.statements, req.client_payloads, strict=True):
            try:
                reply = parse_reply(payload, self.public, self.clients, expected, self.policy.limits)
            except PayloadError as err:
                raise PolicyError(f"client reply does not verify: {err}") from err
            if reply.statement.raw != raw_statement:
                raise PolicyError(f"reply of {reply.client_id!r} does not match its statement")
            replies.append(reply)
        cts = [r.ciphertexts for r in replies]
        ours = fuse(self.public.context, cts, req.weights, w_min=self.policy.w_min)
        mine, theirs = self._decrypt(ours, req.n_scores), self._decrypt(req.ciphertexts, req.n_scores)
        gap = float(np.max(np.abs(mine - theirs)))
        if not gap <= self.policy.rederive_tolerance:
            raise PolicyError(f"submitted ciphertext is not sum_k W ct_k (differs by {gap:.3g})")
        return ours

    def _decrypt(self, vectors: list[ts.CKKSVector], n: int) -> np.ndarray:
        try:
            return unpack([v.decrypt(self._secret_key) for v in vectors], n)
        except (ValueError, RuntimeError) as err:  # TenSEAL's errors; structure was checked on load
            raise PolicyError(f"cannot decrypt the submitted ciphertexts: {err}") from err

    def _check_range(self, req: DecryptionRequest, values: np.ndarray) -> None:
        bound = self.release.value_bound * (1 if req.purpose == "reward" else len(req.statements))
        if req.mode == "blinded":
            bound += self.release.mask_bound
        if not np.all(np.abs(values) <= bound * (1 + 1e-9) + 1e-4):
            raise PolicyError("decrypted values are out of range for this fusion; nothing released")

    def _log(self, ledger: Ledger, req: DecryptionRequest, contributors: list[str], response: bytes) -> None:
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
                "mode": req.mode,
                "contributors": sorted(contributors),
                "count": req.n_scores,
                "precision": self.release.precision,
                "flood_sigma": self.release.flood_sigma,
                "context": self.fingerprint,
                "weights_sha256": None
                if req.weights is None
                else hashlib.sha256(np.ascontiguousarray(req.weights, "<f8").tobytes()).hexdigest(),
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
    """Measure CKKS decryption error: fresh, fused, fused + blinding mask (as the authority sees it)."""
    config = config or ReleaseConfig()
    rng = np.random.default_rng(seed)
    secret = create_secret_context(params)
    pub = public_context_of(secret)
    scores = [rng.uniform(-config.value_bound, config.value_bound, n) for _ in range(k)]
    weights = rng.dirichlet(np.ones(k), size=n)
    cts = [encrypt_packed(pub.context, s) for s in scores]
    fused = fuse(pub.context, cts, weights)
    exact = np.sum(np.stack(scores, axis=1) * weights, axis=1)
    blinded, mask = Blinder(pub, config).blind(fused)

    def report(stage: str, vectors: list[ts.CKKSVector], truth: np.ndarray) -> ErrorReport:
        err = unpack([v.decrypt(secret.secret_key()) for v in vectors], n) - truth
        return ErrorReport(stage, float(np.max(np.abs(err))), float(np.std(err)))

    return [
        report("fresh", cts[0], scores[0]),
        report(f"fused (K={k})", fused, exact),
        report(f"fused + mask 2^{config.mask_bits}", blinded, exact + mask),
    ]

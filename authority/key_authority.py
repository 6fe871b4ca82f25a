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
   authority's own floor, which it tells the server at setup); every reply commits to the item
   digests the request lists for its client (each client's digest of an item is of the item as
   its own model sees it); and one W row per item for the whole life of the CKKS context, under
   every run id: an item is the set of its contributors' digests, and a digest belongs to one
   item. A request in which an item shares a client's digest with an earlier item (in the request
   or in any earlier release) but differs from it in another client's digest, in its
   contributors or in its row (`ROW_TOLERANCE`) is refused with RowConflict. Two rows about the
   same scores are two equations in them (K of them give every score); two items that one client
   cannot tell apart and another can give the difference of the other's two scores.
   Router gradients: no W; the contributors of the step's margin release (same run and step),
   each committing to the items of its margins, and all answering one query (its digest);
7. after decryption: every value lies within the range a fusion of masked clipped scores can
   take (|v| <= R + M, or K (R + M) for a sum); otherwise nothing is released. A sanity check
   against a malformed client ciphertext, not a guard: a crafted ciphertext can decrypt to
   anything in that range (the secret key included; README, threat model).
The nonce, the step and the new items' rows are burned (persisted) once checks 1-6 pass,
before anything is decrypted, so a refusal at 7 cannot be retried with the same nonce. The
release state is bound to the context (its first line names the fingerprint) and never
shared with another.

What the authority learns: the clients mask their values at the source (crypto.blinding), so
every value it can decrypt, a client's or the fusion's, is masked; it also sees W and the
items' digests (hashes of public prompts as each client's model sees them, and of calibration
pair indices).

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
the masks' grid (2^-21 = 4.8e-7, crypto.blinding), < 7e-5 (typical ~1e-5), inside the 1e-4
budget. This is a heuristic mitigation: flooding with a provable 2^-lambda statistical distance
would need sigma ~ 2^lambda times the error, i.e. a larger scale and parameters than the default.
"""

from __future__ import annotations

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

from secure_mor.crypto.context import (
    load_secret_context,
    public_context_of,
    sign_public_context,
)
from secure_mor.crypto.fusion import WeightError, decrypt_fused, fuse, validate_weights
from secure_mor.crypto.params import (
    DEFAULT_K_MIN,
    DEFAULT_W_MIN,
    ReleaseConfig,
    score_half_width,
)
from secure_mor.crypto.release import flood_and_round
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
from secure_mor.files import lock_beside
from secure_mor.ledger import KIND_REWARD_RELEASE, KIND_ROUTER_GRADIENT_RELEASE, Ledger, no_privacy_cost_event

LEDGER_KINDS = {"reward": KIND_REWARD_RELEASE, "router_gradient": KIND_ROUTER_GRADIENT_RELEASE}
STATE_FILE = "released.jsonl"
STATE_FORMAT = "secure-mor/authority-releases/v2"  # v1 (no header line) kept W rows per run id
# Two rows of one item that differ by at most this (per client) count as the same row: their
# two releases differ by sum_k (w_k - w'_k) s_k, |.| <= K * ROW_TOLERANCE * R = 3e-8, far below the
# flooding noise (sigma 1e-5), so together they say nothing more than one of them. It absorbs
# the float rounding of features computed in batches of different sizes (~1e-15).
ROW_TOLERANCE = 1e-9

Row = dict[str, float]  # client -> weight


class PolicyError(ValueError):
    """The key authority refuses a well-formed request: its policy does not allow the release."""


class RowConflict(PolicyError):
    """An item of the request was fused before in this context under another row, other
    contributors, or as part of another item (policy rule 6). Nothing was decrypted or burned:
    the server can leave the round out (e.g. a row renormalised after a dropout)."""


@dataclass(frozen=True)
class AuthorityPolicy:
    k_min: int = DEFAULT_K_MIN
    w_min: float = DEFAULT_W_MIN
    limits: WireLimits = DEFAULT_LIMITS


@dataclass(frozen=True)
class _Item:
    """One item as its contributors saw it (client -> its digest, hex) and the row it was fused with."""

    digests: dict[str, str]
    row: Row


@dataclass
class _ReleaseState:
    """What the policy remembers for the life of one CKKS context, persisted as JSON Lines: a
    header line naming the context, then one line per release (run, nonce, purpose, step, every
    contributor's item commitment, the items it fused for the first time with their rows, and a
    router gradient's query). The file only grows, so `reload` reads only what was appended."""

    path: Path
    context: str
    nonces: set[tuple[str, str]] = field(default_factory=set)
    last_step: dict[tuple[str, str], int] = field(default_factory=dict)
    items: dict[tuple[str, str], _Item] = field(default_factory=dict)  # (client, digest hex) -> item
    margins: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)  # reward (run, step) -> commitments
    _read: int = 0  # bytes of the file read so far
    _lines: int = 0
    _inode: tuple[int, int] | None = None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Check-and-burn is atomic across processes (advisory lock next to the file)."""
        with lock_beside(self.path):
            yield

    def reload(self) -> None:
        """Read what was appended since the last call (another process of the same authority may
        have released since); the first call of a new context writes the header. Under `locked`."""
        if not self.path.exists():
            if self._read:
                raise PolicyError(f"release state {self.path} disappeared; not releasing")
            self._append({"format": STATE_FORMAT, "context": self.context})
        stat = self.path.stat()
        if self._inode not in (None, (stat.st_dev, stat.st_ino)) or stat.st_size < self._read:
            raise PolicyError(f"release state {self.path} was replaced or truncated; not releasing")
        self._inode = (stat.st_dev, stat.st_ino)
        with open(self.path, "rb") as f:
            f.seek(self._read)
            data = f.read()
        if data and not data.endswith(b"\n"):
            raise PolicyError(f"release state {self.path} ends in an incomplete line (a crash while writing); "
                              "not starting")  # fmt: skip
        for line in data.splitlines():
            self._lines += 1
            self._parse(line)
        self._read += len(data)

    def _parse(self, line: bytes) -> None:
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise PolicyError(f"release state {self.path} line {self._lines} is damaged; not starting") from err
        if self._lines == 1:
            self._check_header(entry)
            return
        try:
            self._note(entry)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise PolicyError(f"release state {self.path} line {self._lines} is damaged; not starting") from err

    def _check_header(self, header: Any) -> None:
        if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
            raise PolicyError(
                f"{self.path} is the release state of an older version (W rows per run id, items digested "
                "from their bytes on the wire): its rows cannot be carried over to the rules of this version. "
                f"Move the key authority's directory {self.path.parent} away, its secret key with it, and "
                "start a new CKKS context (clients and server set up again)"
            )
        if header.get("context") != self.context:
            raise PolicyError(f"release state {self.path} belongs to context {str(header.get('context'))[:16]}..., "
                              f"not {self.context[:16]}...; not starting")  # fmt: skip

    def _note(self, entry: Mapping[str, Any]) -> None:
        run_id, purpose, step = entry["run_id"], entry["purpose"], int(entry["step"])
        self.nonces.add((run_id, entry["nonce"]))
        self.last_step[(run_id, purpose)] = max(step, self.last_step.get((run_id, purpose), -1))
        if purpose == "reward":
            self.margins[(run_id, step)] = dict(entry["items"])
        for digests, row in entry["new"]:
            item = _Item(dict(digests), dict(row))
            self.items.update({key: item for key in item.digests.items()})

    def _append(self, entry: Mapping[str, Any]) -> int:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())  # a restarted authority must still refuse this nonce and keep the rows
        return len(line)

    def burn(self, entry: Mapping[str, Any]) -> None:
        """Persist a release's entry (under `locked`, after `reload`) and remember it."""
        self._read += self._append(entry)
        self._lines += 1
        self._note(entry)


def _same_row(a: Row, b: Row) -> bool:
    return a.keys() == b.keys() and all(abs(a[c] - b[c]) <= ROW_TOLERANCE for c in a)


class KeyAuthority:
    """Holds the secret context; `decrypt(request)` is its only way to release anything.

    clients: {client_id: Ed25519 public key hex} of the registered clients;
    server_public_key: the key that must sign decryption requests;
    state_dir: where burned nonces, released steps and the items' W rows persist for the life of
    the context (one directory per context);
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
        self._state = _ReleaseState(Path(state_dir) / STATE_FILE, self.fingerprint)
        with self._state.locked():
            self._state.reload()  # an old or foreign state refuses at start, not at the first release

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

    @property
    def context_signature(self) -> bytes:
        """Its signature over the public context (crypto.context.context_statement): what lets a
        client tell the authority's context from one the server made (the server only relays it)."""
        return sign_public_context(self.signer, self.public)

    def decrypt(self, request: bytes) -> bytes:
        """Check the policy, fuse the verified client ciphertexts, decrypt, flood, round, sign, log.
        Returns the signed response."""
        req = parse_request(request, self.public, self.server_public_key, self.policy.limits)
        replies = self._verified_replies(req)
        contributors = [r.client_id for r in replies]
        with self._state.locked():
            self._state.reload()
            entry = self._check_policy(req, replies)
            self._state.burn(entry)
        bound = self.release.value_bound + self.release.mask_bound
        fused = fuse(self.public.context, [r.ciphertexts for r in replies], req.weights, value_bound=bound)
        values = decrypt_fused(self._secret, fused)
        if not np.all(np.abs(values) <= bound * (1 if req.weights is not None else len(replies)) * (1 + 1e-9)):
            raise PolicyError("the fusion decrypts out of range for masked clipped scores; nothing released")
        levels = flood_and_round(values, self.release)
        response = build_response(self.signer, req, levels, self.release.round_bits)
        if self.ledger is not None:
            self._log(self.ledger, req, contributors, entry, response)
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

    def _check_policy(self, req: DecryptionRequest, replies: Sequence[ClientReply]) -> dict[str, Any]:
        """Refuse (PolicyError) what the policy forbids; returns the release's entry for the state."""
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
        entry: dict[str, Any] = {
            "run_id": req.run_id, "nonce": req.nonce, "purpose": req.purpose, "step": req.step,
            "items": {r.client_id: r.statement.items for r in replies}, "new": [], "query": None,
        }  # fmt: skip
        if req.purpose == "router_gradient":
            entry["query"] = self._check_gradient(req, replies)
            return entry
        if any(r.statement.query is not None for r in replies):
            raise PolicyError("a reward reply answers no router query")
        if req.weights is None or req.items is None:
            raise PolicyError("a reward release needs the router weights W and the items' digests")
        try:
            w = validate_weights(req.weights, req.n_scores, len(contributors), self.policy.w_min)
        except WeightError as err:
            raise PolicyError(f"invalid W: {err}") from err
        for reply, items in zip(replies, req.items, strict=True):
            if reply.statement.items != items_digest(items):
                raise PolicyError(f"the reply of {reply.client_id!r} commits to other items than the request names")
        entry["new"] = self._new_items(req.items, w, contributors)
        return entry

    def _check_gradient(self, req: DecryptionRequest, replies: Sequence[ClientReply]) -> str:
        """A router step's summed gradient (a plain sum, no W): terms of the contributors of the
        step's margin release, each over the items of its margins, all answering one query."""
        if req.weights is not None or req.items is not None:
            raise PolicyError("a router-gradient release is a plain sum and takes no weights or items")
        margins = self._state.margins.get((req.run_id, req.step))
        if margins is None:
            raise PolicyError(f"no margin release of step {req.step} in run {req.run_id!r} precedes this gradient")
        if sorted(r.client_id for r in replies) != sorted(margins):
            raise PolicyError(f"the gradient's contributors are not those of the step's margins ({sorted(margins)})")
        for reply in replies:
            if reply.statement.items != margins[reply.client_id]:
                raise PolicyError(f"the term of {reply.client_id!r} sums over other items than its margins of "
                                  f"step {req.step}")  # fmt: skip
        queries = {r.statement.query for r in replies}
        if len(queries) != 1 or None in queries:
            raise PolicyError("the replies of a router step answer different queries (or none)")
        return queries.pop()

    def _new_items(self, items: Sequence[Sequence[bytes]], w: np.ndarray, contributors: list[str]) -> list[list[Any]]:
        """Policy rule 6: the items this release fuses for the first time in the context, as
        [digests, row] pairs; RowConflict if an item meets an earlier one it is not equal to."""
        new: dict[tuple[str, str], _Item] = {}
        added: list[list[Any]] = []
        for i in range(len(w)):
            item = _Item({c: items[j][i].hex() for j, c in enumerate(contributors)},
                         dict(zip(contributors, w[i].tolist(), strict=True)))  # fmt: skip
            earlier = [e for key in item.digests.items() if (e := new.get(key) or self._state.items.get(key))]
            if not earlier:
                new.update({key: item for key in item.digests.items()})
                added.append([item.digests, item.row])
            elif any(e.digests != item.digests or not _same_row(e.row, item.row) for e in earlier):
                raise RowConflict(
                    f"item {i} was fused before in this context with another W row, other contributors, or as "
                    "another item (a client whose digest differs saw it apart from one that does not): "
                    "one item keeps one row per context"
                )
        return added

    def _log(
        self, ledger: Ledger, req: DecryptionRequest, contributors: list[str], entry: Mapping[str, Any], response: bytes
    ) -> None:
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
                "items_sha256": entry["items"],  # every contributor's commitment (null: a sum of terms not per item)
                "query_sha256": entry["query"],
                "request_sha256": req.sha256,
                "response_sha256": hashlib.sha256(response).hexdigest(),
            },
        )

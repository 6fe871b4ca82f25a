"""The server's half of one secure scoring round (DESIGN.md, "One GRPO step", items 2-5).

`SecureSession.fused_rewards(items, weights)`:

1. asks every client to score the N items (fresh nonce, a run-scoped step number);
2. keeps the replies that verify (signature, run, step, nonce, purpose, count);
   a client that does not answer within `reply_timeout`, answers with an error or
   with a reply that does not verify is left out of this round, and the router's
   rows are renormalised over the clients present (`crypto.fusion.renormalise`);
3. with fewer than `k_min` clients present, the round is skipped: nothing is asked
   of the authority, a signed `step_skipped` entry goes into the ledger and the
   rewards are None (TRL then gives those completions zero advantage);
4. otherwise fuses sum_k W[:, k] ct_k, blinds it, has the key authority decrypt it
   and removes the blinding.

The server never holds a client's plaintext score: what it receives from a client
is a signed ciphertext, and from the authority the blinded fused values.

Step numbers: the authority refuses a step it has already released for a run and
purpose, and TRL's `global_step` repeats after a resume. So the session numbers
its rounds itself and persists the next number *before* it sends a round
(`state.json`): a crash loses at most an unused number, never reuses one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from secure_mor.audits.ledger import KIND_STEP_SKIPPED, Ledger, no_privacy_cost_event
from secure_mor.crypto.blinding import Blinder
from secure_mor.crypto.context import PublicContext
from secure_mor.crypto.fusion import fuse, renormalise
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import (
    ClientReply,
    Expected,
    PayloadError,
    build_request,
    new_nonce,
    parse_reply,
    parse_response,
)
from secure_mor.protocol import AUTHORITY_PARTY, Payload
from secure_mor.server.transport import NodeFailure, Transport

STATE_FILE = "state.json"


class RoundRefused(RuntimeError):
    """The key authority refused a round or answered with something that does not verify."""


@dataclass
class RoundTimings:
    """Seconds spent per part of scoring rounds (summed over rounds)."""

    scoring_round_trip: float = 0.0  # request to the clients until their replies are in
    client_compute: float = 0.0  # clients' scoring + encryption + signing, summed over clients (they report it)
    server_crypto: float = 0.0  # verification, fusion, blinding, request, response check
    authority_round_trip: float = 0.0  # request to the key authority until its answer is in
    authority_compute: float = 0.0  # the authority's checks, decryption, flooding, signing (it reports it)
    rounds: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class SecureSession:
    """Everything the server needs to run scoring rounds for one run id."""

    transport: Transport
    pub: PublicContext
    signer: Signer
    registry: Mapping[str, str]  # client party -> Ed25519 public key hex
    clients: Sequence[str]  # router column order
    authority_key: str
    run_id: str
    state_dir: Path
    ledger: Ledger
    k_min: int = 2
    w_min: float = 0.02
    reply_timeout: float | None = 120.0
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    timings: RoundTimings = field(default_factory=RoundTimings)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.blinder = Blinder(self.pub, self.release)

    # ------------------------------------------------------------ run-scoped step numbers

    def reserve_step(self, purpose: str) -> int:
        path = self.state_dir / STATE_FILE
        state = json.loads(path.read_text()) if path.exists() else {}
        if state.get("run_id", self.run_id) != self.run_id:
            raise RoundRefused(f"{path} belongs to run {state['run_id']!r}, not {self.run_id!r}")
        steps = state.setdefault("next_step", {})
        step = int(steps.get(purpose, 0))
        steps[purpose] = step + 1
        state["run_id"] = self.run_id
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)
        return step

    # ------------------------------------------------------------ one round

    def verified(self, replies: Mapping[str, Payload | NodeFailure], expected: Expected) -> dict[str, ClientReply]:
        """The replies that verify, by client; the rest are noted and dropped."""
        out: dict[str, ClientReply] = {}
        self.problems: list[str] = []
        for party, reply in replies.items():
            if isinstance(reply, NodeFailure):
                self.problems.append(f"{party}: {reply.reason}")
                continue
            try:
                parsed = parse_reply(bytes(reply["reply"]), self.pub, self.registry, expected)
            except (PayloadError, KeyError) as err:
                self.problems.append(f"{party}: {err}")
                continue
            if parsed.client_id != party or party not in self.clients:
                self.problems.append(f"{party}: reply signed by {parsed.client_id!r}")
                continue
            out[party] = parsed
            self.timings.client_compute += float(reply.get("seconds", 0.0))
        return out

    def skip(self, purpose: str, step: int, present: Sequence[str], n: int) -> None:
        self.timings.skipped += 1
        self.ledger.append(
            self.signer, KIND_STEP_SKIPPED, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
            accountant="none (nothing released)", total_epsilon=0.0,
            details={"run_id": self.run_id, "step": step, "purpose": purpose, "count": n, "present": sorted(present),
                     "k_min": self.k_min, "reason": "; ".join(self.problems) or "too few clients answered"},
        )

    def decrypt(self, replies: Sequence[ClientReply], weights: np.ndarray | None, purpose: str, step: int,
                nonce: str, n: int) -> np.ndarray:
        """Fuse (weights) or sum (None), blind, have the authority decrypt, unblind."""
        started = time.perf_counter()
        fused = fuse(self.pub.context, [r.ciphertexts for r in replies], weights, w_min=self.w_min)
        blinded, mask = self.blinder.blind(fused)
        request = build_request(
            self.signer, self.pub, run_id=self.run_id, step=step, nonce=nonce, purpose=purpose, n_scores=n,
            statements=[r.statement.raw for r in replies], weights=weights, fused=blinded,
        )
        asked = time.perf_counter()
        answer = self.transport.ask([AUTHORITY_PARTY], "decrypt", {"request": request}, timeout=self.reply_timeout)
        answered = time.perf_counter()
        reply = answer.get(AUTHORITY_PARTY)
        if reply is None or isinstance(reply, NodeFailure):
            raise RoundRefused(f"the key authority did not release {purpose} step {step}: "
                               f"{reply.reason if reply else 'no answer'}")
        try:
            values = Blinder.unblind(parse_response(bytes(reply["response"]), self.authority_key, request), mask)
        except PayloadError as err:
            raise RoundRefused(f"the key authority's response does not verify: {err}") from err
        self.timings.authority_round_trip += answered - asked
        self.timings.authority_compute += float(reply.get("seconds", 0.0))
        self.timings.server_crypto += (asked - started) + (time.perf_counter() - answered)
        return values

    def fused_rewards(self, request: Payload, weights: np.ndarray) -> np.ndarray | None:
        """One scoring round over the items of `request` (secure_mor.protocol.score_request),
        fused with `weights` (N x K, router column order). None when the round was skipped."""
        n = len(request["questions"])
        step, nonce = self.reserve_step("reward"), new_nonce()
        started = time.perf_counter()
        replies = self.transport.ask(list(self.clients), "score",
                                     {**request, "run_id": self.run_id, "step": step, "nonce": nonce},
                                     timeout=self.reply_timeout)
        checked = time.perf_counter()
        good = self.verified(replies, Expected(self.run_id, step, nonce, "reward", n))
        self.timings.scoring_round_trip += checked - started
        self.timings.server_crypto += time.perf_counter() - checked
        self.timings.rounds += 1
        present = [c for c in self.clients if c in good]
        if len(present) < self.k_min:
            self.skip("reward", step, present, n)
            return None
        w = np.asarray(weights, dtype=np.float64)
        if len(present) < len(self.clients):
            w = renormalise(w, [c in good for c in self.clients])
        return self.decrypt([good[c] for c in present], w, "reward", step, nonce, n)

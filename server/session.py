"""The server's side of GRPO scoring rounds (docs/architecture.md, "One GRPO step", rows 4-9).

`SecureSession.fused_rewards(items, weights)`:

1. asks every client to score the N items (fresh nonce, a run-scoped step number, the round
   key of its masks: `server.secure_round`);
2. keeps the replies that verify (signature, run, step, nonce, purpose, count, committing to
   the digests of the items as the client's own model sees them, which it sends along);
   a client that does not answer within `reply_timeout`, answers with an error or
   with a reply that does not verify is left out of this round, and the router's
   rows are renormalised over the clients present (`crypto.fusion.renormalise`);
3. with fewer than `k_min` clients present, the round is skipped: nothing is asked
   of the authority, a signed `step_skipped` entry goes into the ledger and the
   rewards are None (TRL then gives those completions zero advantage);
4. otherwise has the key authority fuse the replies with W and removes the masks from its
   answer. The authority keeps one row per item for the life of its context: a round in which
   an item would get a second row (a prompt that recurs after a dropout renormalised its row,
   or one fused before by another run in the same context) is left out by the authority and
   skipped here the same way (`step_skipped`, rewards None).

The server never holds a client's plaintext score: what it receives from a client
is a signed ciphertext of masked scores, and from the authority masked fused values.

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

from secure_mor.crypto.context import PublicContext
from secure_mor.crypto.fusion import renormalise
from secure_mor.crypto.params import DEFAULT_K_MIN, ReleaseConfig
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import Expected, new_nonce
from secure_mor.files import write_json
from secure_mor.ledger import KIND_STEP_SKIPPED, Ledger, no_privacy_cost_event
from secure_mor.protocol import Payload, ScoreRequest
from secure_mor.server.secure_round import AuthorityLink, RoundRefused, RowConflictRefused, SecureRound, client_replies
from secure_mor.server.transport import Transport

STATE_FILE = "state.json"


@dataclass
class RoundTimings:
    """Seconds spent per part of scoring rounds (summed over rounds)."""

    scoring_round_trip: float = 0.0  # request to the clients until their replies are in
    client_compute: float = 0.0  # clients' scoring + encryption + signing, summed over clients (they report it)
    server_crypto: float = 0.0  # verification, masks, request, response check
    authority_round_trip: float = 0.0  # request to the key authority until its answer is in
    authority_compute: float = 0.0  # the authority's checks, fusion, decryption, flooding, signing (it reports it)
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
    w_min: float  # the key authority's floor (announced at setup)
    k_min: int = DEFAULT_K_MIN  # the pipeline passes max(its own, the key authority's announced k_min)
    reply_timeout: float | None = 120.0
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    timings: RoundTimings = field(default_factory=RoundTimings)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.authority = AuthorityLink(self.transport, self.reply_timeout)
        self.rounds = SecureRound(self.pub, self.signer, self.registry, self.clients, self.authority_key,
                                  self.run_id, self.w_min, self.authority, self.release)  # fmt: skip

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
        write_json(path, state, indent=2)
        return step

    # ------------------------------------------------------------ one round

    def skip(self, purpose: str, step: int, present: list[str], n: int, problems: list[str]) -> None:
        self.timings.skipped += 1
        self.ledger.append(
            self.signer, KIND_STEP_SKIPPED, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
            accountant="none (nothing released)", total_epsilon=0.0,
            details={"run_id": self.run_id, "step": step, "purpose": purpose, "count": n, "present": sorted(present),
                     "k_min": self.k_min, "reason": "; ".join(problems) or "too few clients answered"},
        )  # fmt: skip

    def fused_rewards(self, request: Payload, weights: np.ndarray) -> np.ndarray | None:
        """One scoring round over the items of `request` (secure_mor.protocol.score_request),
        fused with `weights` (N x K, router column order). None when the round was skipped."""
        n = len(request["questions"])
        step, nonce = self.reserve_step("reward"), new_nonce()
        started = time.perf_counter()
        score = ScoreRequest(**self.rounds.fields(step, nonce), **request).encode()  # checked before it is sent
        answers = self.transport.ask(list(self.clients), "score", score, timeout=self.reply_timeout)
        checked = time.perf_counter()
        self.timings.scoring_round_trip += checked - started
        self.timings.rounds += 1
        replies, items, failures, seconds = client_replies(answers, n)
        self.timings.client_compute += seconds
        good, refused = self.rounds.verify(replies, Expected(self.run_id, step, nonce, "reward", n), items)
        if len(good) < self.k_min:
            self.timings.server_crypto += time.perf_counter() - checked
            self.skip("reward", step, list(good), n, failures + refused)
            return None
        w = np.asarray(weights, dtype=np.float64)
        if len(good) < len(self.clients):
            w = renormalise(w, [c in good for c in self.clients])
        waited, computed = self.authority.round_trip_s, self.authority.compute_s
        try:
            values = self.rounds.release(list(good.values()), w, "reward", step, nonce, [items[c] for c in good])
        except RowConflictRefused as err:
            values = None
            self.skip("reward", step, list(good), n, [f"the key authority left the round out: {err}"])
        asked = self.authority.round_trip_s - waited
        self.timings.authority_round_trip += asked
        self.timings.authority_compute += self.authority.compute_s - computed
        self.timings.server_crypto += time.perf_counter() - checked - asked
        return values

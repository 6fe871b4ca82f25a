"""The server's half of one secure release, for GRPO scoring (server.session) and router training
(server.router_training) alike (docs/architecture.md, "One GRPO step", rows 4-9):

1. `fields(step, nonce)`: what every client request of a round carries besides its items: the
   run id, step and nonce the reply must name, and the server's round key from which each client
   derives its mask (crypto.blinding);
2. `verify(replies, expected, items)`: the replies that verify (signature, run, step, nonce,
   purpose, count, signed by the party that was asked, a router column, committing to the item
   digests the client sent with it), and why the others were refused;
3. `release(replies, weights, purpose, step, nonce, items)`: asks the key authority to fuse the
   verified replies themselves with W (or to sum them, weights None), checks its signed answer,
   and removes the masks: sum_k W[:, k] m_k (or sum_k m_k). A result outside what the fusion of
   clipped scores can be (masks that did not match) is refused, not returned; a round the
   authority leaves out because an item would get a second row in its context raises
   `RowConflictRefused` (nothing was released).

The transport's side, the same for both: `AuthorityLink` asks the key authority (a failure or no
answer is `RoundRefused`, a round it leaves out `RowConflictRefused`), `client_replies` sorts the
clients' answers into reply bytes, item digests and failures.

What the callers decide for themselves: scoring tolerates missing clients (rows renormalised,
`k_min`) and skips a round the authority leaves out; router training needs every client and every
release. The key authority applies its own policy to both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from secure_mor.crypto.blinding import MaskKey
from secure_mor.crypto.context import PublicContext
from secure_mor.crypto.fusion import WeightError, validate_weights
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.signing import Signer
from secure_mor.crypto.wire import (
    DIGEST_BYTES,
    ClientReply,
    Expected,
    PayloadError,
    build_request,
    items_digest,
    parse_reply,
    parse_response,
)
from secure_mor.protocol import AUTHORITY_PARTY, DecryptReply, Payload, ProtocolError, RoundFields, SealedReply
from secure_mor.server.transport import NodeFailure, Transport

Decrypt = Callable[[bytes], bytes]  # a decryption request to the key authority -> its signed response
RANGE_SLACK = 1e-3  # the release's own error (< 1e-4) and the masks' float64 rounding


class RoundRefused(RuntimeError):
    """The key authority refused a round or answered with something that does not verify."""


class RowConflictRefused(RoundRefused):
    """The key authority left a round out: one of its items was fused before in the authority's
    context under another row (authority.key_authority.RowConflict). Nothing was released or burned."""


@dataclass
class AuthorityLink:
    """A run's `Decrypt`: decryption requests to the key authority over `transport`, with the time they
    took (`round_trip_s`) and the authority's own compute time as it reports it (`compute_s`)."""

    transport: Transport
    timeout: float | None
    round_trip_s: float = 0.0
    compute_s: float = 0.0

    def __call__(self, request: bytes) -> bytes:
        asked = time.perf_counter()
        answer = self.transport.ask([AUTHORITY_PARTY], "decrypt", {"request": request}, timeout=self.timeout)
        self.round_trip_s += time.perf_counter() - asked
        answered = answer.get(AUTHORITY_PARTY)
        if answered is None or isinstance(answered, NodeFailure):
            raise RoundRefused(f"the key authority did not release: {answered.reason if answered else 'no answer'}")
        try:
            reply = DecryptReply.decode(answered)
        except ProtocolError as err:
            raise RoundRefused(f"the key authority's answer: {err}") from err
        self.compute_s += reply.seconds
        if reply.refused:
            raise RowConflictRefused(reply.refused)
        return reply.response


def client_replies(
    answers: Mapping[str, Payload | NodeFailure], n: int | None = None
) -> tuple[dict[str, bytes], dict[str, list[bytes]], list[str], float]:
    """The reply bytes and item digests of the clients that answered, what went wrong with the others, and
    the clients' compute seconds as they report them. `n`: the items each reply must send digests of (None:
    the answer carries no digests, e.g. a router gradient)."""
    replies, items, failures, seconds = {}, {}, [], 0.0
    for party, answer in answers.items():
        if isinstance(answer, NodeFailure):
            failures.append(f"{party}: {answer.reason}")
            continue
        try:
            sealed = SealedReply.decode(answer)
        except ProtocolError as err:
            failures.append(f"{party}: {err}")
            continue
        if n is not None and len(sealed.items) != n * DIGEST_BYTES:
            failures.append(f"{party}: not {n} item digests in its answer")
            continue
        replies[party] = sealed.reply
        if n is not None:
            items[party] = [sealed.items[i : i + DIGEST_BYTES] for i in range(0, len(sealed.items), DIGEST_BYTES)]
        seconds += sealed.seconds
    return replies, items, failures, seconds


@dataclass
class SecureRound:
    """The server's keys and trust for the releases of one run id."""

    pub: PublicContext
    signer: Signer
    registry: Mapping[str, str]  # client party -> Ed25519 public key hex
    clients: Sequence[str]  # router column order
    authority_key: str
    run_id: str
    w_min: float  # the key authority's floor (it announces it at setup)
    decrypt: Decrypt
    release_config: ReleaseConfig = field(default_factory=ReleaseConfig)
    mask_key: MaskKey = field(default_factory=MaskKey)

    def fields(self, step: int, nonce: str) -> Payload:
        return RoundFields(self.run_id, step, nonce, self.mask_key.public_hex).encode()

    def verify(
        self, replies: Mapping[str, bytes], expected: Expected, items: Mapping[str, Sequence[bytes]] | None = None
    ) -> tuple[dict[str, ClientReply], list[str]]:
        """{party: verified reply} in router column order, and the problems of the others;
        `items`: the item digests each party sent with its reply, which its statement must commit to."""
        good: dict[str, ClientReply] = {}
        problems: list[str] = []
        for party, raw in replies.items():
            try:
                reply = parse_reply(bytes(raw), self.pub, self.registry, expected)
            except (PayloadError, TypeError) as err:
                problems.append(f"{party}: {err}")
                continue
            if reply.client_id != party or party not in self.clients:
                problems.append(f"{party}: reply signed by {reply.client_id!r}")
                continue
            if items is not None and (party not in items or reply.statement.items != items_digest(items[party])):
                problems.append(f"{party}: its reply does not commit to the item digests it sent")
                continue
            good[party] = reply
        return {c: good[c] for c in self.clients if c in good}, problems

    def release(
        self,
        replies: Sequence[ClientReply],
        weights: np.ndarray | None,
        purpose: str,
        step: int,
        nonce: str,
        items: Sequence[Sequence[bytes]] | None = None,
    ) -> np.ndarray:
        """The authority's fusion (weights) or sum (None) of the replies, masks removed; `items`:
        each reply's item digests (with the weights)."""
        n = replies[0].statement.n_scores
        if weights is not None:
            try:  # the authority's floor, checked here too: a refusal costs a round trip and a nonce
                weights = validate_weights(weights, n, len(replies), self.w_min)
            except WeightError as err:
                raise RoundRefused(f"{purpose} step {step}: {err}") from err
        request = build_request(
            self.signer, self.pub, run_id=self.run_id, step=step, nonce=nonce, purpose=purpose, n_scores=n,
            replies=[r.raw for r in replies], weights=weights, items=items,
        )  # fmt: skip
        try:
            released = parse_response(self.decrypt(request), self.authority_key, request)
        except PayloadError as err:
            raise RoundRefused(f"the key authority's response does not verify: {err}") from err
        masks = np.stack([self._mask(r) for r in replies], axis=1)
        values = released - (masks.sum(axis=1) if weights is None else np.sum(masks * weights, axis=1))
        bound = self.release_config.value_bound * (len(replies) if weights is None else 1) + RANGE_SLACK
        if not np.all(np.abs(values) <= bound):
            raise RoundRefused(f"{purpose} step {step}: the release does not unmask to values within +-{bound:g}")
        return values

    def _mask(self, reply: ClientReply) -> np.ndarray:
        s = reply.statement
        return self.mask_key.mask(s.blinding, s.mask_context, s.n_scores, self.release_config.mask_bound)

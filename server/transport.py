"""How the server reaches the other nodes: one call, many parties, replies by party.

`Transport.ask(parties, action, payloads, timeout)` sends `action` to each party
(one payload for all, or one per party) and returns what came back within
`timeout` seconds: a payload, or a `NodeFailure` for a node that answered with an
error. A party absent from the result did not answer in time (a dropout, or
late: its reply is discarded). The Flower implementation is `server.app.GridTransport`;
`LocalTransport` calls node objects in this process (tests, benchmarks).
`submit` sends without waiting; its `wait` collects (a local transport does the
work in `wait`, as it has no other process to hand it to).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from secure_mor.protocol import Payload


@dataclass(frozen=True)
class NodeFailure:
    party: str
    reason: str


Replies = dict[str, Payload | NodeFailure]


class Pending(Protocol):
    def wait(self, timeout: float | None = None) -> Replies: ...


class Transport(Protocol):
    def ask(
        self,
        parties: Sequence[str],
        action: str,
        payloads: Payload | Mapping[str, Payload],
        timeout: float | None = None,
    ) -> Replies: ...

    def submit(self, parties: Sequence[str], action: str, payloads: Payload | Mapping[str, Payload]) -> Pending:
        """Send now, collect later (`wait`): the server can work while the nodes do."""
        ...


def payload_for(payloads: Payload | Mapping[str, Payload], party: str, parties: Sequence[str]) -> Payload:
    """The payload addressed to `party`: per-party mappings are keyed by every party."""
    if set(payloads) == set(parties) and all(isinstance(v, Mapping) for v in payloads.values()):
        return dict(payloads[party])
    return dict(payloads)


class Handler(Protocol):
    def handle(self, action: str, payload: Mapping[str, Any]) -> Payload: ...


@dataclass
class LocalTransport:
    """Calls each party's node object directly. `unavailable` parties never answer (a dropout);
    `delays[party]` seconds are added to that party's answer time, which counts against the
    timeout the way a late reply does over a network."""

    nodes: Mapping[str, Handler]
    unavailable: set[str] = field(default_factory=set)
    delays: dict[str, float] = field(default_factory=dict)
    on_call: Callable[[str, str, Payload], None] | None = None

    def submit(self, parties: Sequence[str], action: str, payloads: Payload | Mapping[str, Payload]) -> Pending:
        transport = self

        class _Deferred:
            def wait(self, timeout: float | None = None) -> Replies:
                return transport.ask(parties, action, payloads, timeout)

        return _Deferred()

    def ask(
        self,
        parties: Sequence[str],
        action: str,
        payloads: Payload | Mapping[str, Payload],
        timeout: float | None = None,
    ) -> Replies:
        out: Replies = {}
        for party in parties:
            if party in self.unavailable or party not in self.nodes:
                continue
            payload = payload_for(payloads, party, parties)
            if self.on_call:
                self.on_call(party, action, payload)
            started = time.perf_counter()
            try:
                reply = self.nodes[party].handle(action, payload)
            except Exception as err:  # noqa: BLE001 - a node's failure is reported, as Flower does
                out[party] = NodeFailure(party, f"{type(err).__name__}: {err}")
                continue
            if timeout is not None and time.perf_counter() - started + self.delays.get(party, 0.0) > timeout:
                continue
            out[party] = reply
        return out

"""The project's Flower ServerApp: the main job (`server.pipeline.align`) over Flower's grid.

Run config (`[tool.flwr.app.config]` in pyproject.toml, overridable with
`flwr run . --run-config "..."` or `secure-mor align`): its keys are server.run_config's.
The federation holds num-clients client nodes and one key-authority node.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from secure_mor.protocol import Payload
from secure_mor.server.pipeline import AlignError, align
from secure_mor.server.run_config import align_config
from secure_mor.server.transport import NodeFailure, Replies, payload_for

app = ServerApp()

POLL_SECONDS = 0.05  # Grid.send_and_receive polls every 3 s, which would dominate a scoring round


def wait_for_nodes(grid: Grid, count: int, timeout: float = 300.0) -> list[int]:
    """Node ids once `count` nodes are connected: the ServerApp may start before they register."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)
    return sorted(nodes)


def _message_type(action: str) -> str:
    return "train" if action == "train" else f"query.{action}"


class GridTransport:
    """`server.transport.Transport` over Flower's grid: parties are mapped to node ids by
    asking every node to identify itself. Those answers are kept and given to the pipeline's
    own "identify" (`pipeline.connect`): a second round would cost seconds on the deployment runtime."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self.grid = grid
        self.nodes: dict[str, int] = {}
        self.identities: dict[str, Payload] = {}
        replies = self._exchange({node: ("identify", {}) for node in node_ids}, timeout=300.0)
        for node, reply in replies.items():
            if isinstance(reply, NodeFailure):
                raise AlignError(f"node {node} failed to identify itself: {reply.reason}")
            self.nodes[str(reply["party"])] = node
            self.identities[str(reply["party"])] = reply

    def _push(self, requests: Mapping[int, tuple[str, Payload]]) -> dict[str, int]:
        messages = [
            Message(RecordDict({"payload": ConfigRecord(payload)}), dst_node_id=node,
                    message_type=_message_type(action))
            for node, (action, payload) in requests.items()
        ]
        return {mid: node for mid, node in zip(self.grid.push_messages(messages), requests, strict=True) if mid}

    def _exchange(self, requests: Mapping[int, tuple[str, Payload]], timeout: float | None) -> dict[int, Any]:
        return self._pull(self._push(requests), timeout)

    def _pull(self, pending: dict[str, int], timeout: float | None) -> dict[int, Any]:
        out: dict[int, Any] = {}
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    out[node] = NodeFailure(str(node), reply.error.reason)
                else:
                    out[node] = dict(reply.content["payload"])
            if pending:
                time.sleep(POLL_SECONDS)
        return out  # nodes still pending are late: their replies are never read

    def ask(self, parties: Sequence[str], action: str, payloads: Payload | Mapping[str, Payload],
            timeout: float | None = None) -> Replies:
        return self.submit(parties, action, payloads).wait(timeout)

    def submit(self, parties: Sequence[str], action: str, payloads: Payload | Mapping[str, Payload]) -> Any:
        unknown = [p for p in parties if p not in self.nodes]
        if unknown:
            raise AlignError(f"no node identified itself as {unknown}; connected: {sorted(self.nodes)}")
        transport = self
        if action == "identify":

            class _Known:
                def wait(self, timeout: float | None = None) -> Replies:
                    return {p: dict(transport.identities[p]) for p in parties}

            return _Known()
        pending = self._push({self.nodes[p]: (action, payload_for(payloads, p, parties)) for p in parties})
        party_of = {node: party for party, node in self.nodes.items()}

        class _Pending:
            def wait(self, timeout: float | None = None) -> Replies:
                replies = transport._pull(pending, timeout)
                return {party_of[node]: (NodeFailure(party_of[node], r.reason) if isinstance(r, NodeFailure) else r)
                        for node, r in replies.items()}

        return _Pending()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = align_config(context.run_config)
    run_dir = Path(str(context.run_config["run-dir"])).resolve()
    nodes = wait_for_nodes(grid, config.num_clients + 1)
    results = align(GridTransport(grid, nodes), run_dir, config, log=lambda m: print(f"[secure-mor] {m}", flush=True))
    print(f"[secure-mor] results: {run_dir / 'align' / config.label / 'results.json'}", flush=True)
    print(f"[secure-mor] accuracy {results['accuracy']}", flush=True)

"""The server's Flower ServerApp.

Until the router and GRPO handlers land, the app checks that every client is
reachable and reports what each holds.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout: float = 120.0) -> list[int]:
    """Node ids once `count` nodes are connected: the ServerApp may start before they register."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)
    return sorted(nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = ConfigRecord({k: context.run_config[k] for k in ("num-clients", "data-skew", "seed")})
    nodes = wait_for_nodes(grid, int(context.run_config["num-clients"]))
    queries = [Message(RecordDict({"config": config}), dst_node_id=node, message_type="query") for node in nodes]
    replies = list(grid.send_and_receive(queries))
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} client(s) failed: {failed}")
    for reply in sorted(replies, key=lambda r: r.content["identity"]["client"]):
        print(reply.content["identity"]["client"], dict(reply.content["metrics"]))

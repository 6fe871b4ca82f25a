"""The project's Flower ClientApp: thin handlers over the node task modules of the two node roles.

Every SuperNode runs this app (Flower has one ClientApp per app); its node
config decides what it is (`secure_mor.protocol.node_role`): a client
institution (`secure_mor.clients.app.client_node`) or the key authority
(`secure_mor.authority.app.authority_node`). A node keeps its state under
node config `state-dir`, or, in the simulation runtime, the run config's
`run-dir`; `key-dir` is where its own signing key is (made beforehand with `secure-mor
keys new`, encrypted; default: under `state-dir`); `registry` is the operator's registry of
public payload keys (default: `<state-dir>/keys`, what the parties publish in a simulation)
and `ca-cert` the operator's CA, whose signature a node requires on every entry of a
`registry` (and a `registry` requires a `ca-cert`): the authority reads the clients' and the
server's keys there, a client the key authority's, with which it verifies the public context
the server relays. What only one role reads is in its own module: secure_mor.clients.app
(`data-dir`) and secure_mor.authority.app (`k-min`, `w-min`, `authority-dir`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from secure_mor.protocol import ROLE_AUTHORITY, node_role

app = ClientApp()

QUERY_ACTIONS = ("identify", "setup", "router_setup", "margins", "router_gradient", "score", "decrypt")
_NODES: dict[tuple[Any, ...], Any] = {}


def node_paths(config: Mapping[str, Any], state_dir: str) -> dict[str, str | None]:
    """The paths every node role reads from its node config (module docstring)."""
    return {"state_dir": state_dir, "key_dir": _optional(config, "key-dir"),
            "registry": _optional(config, "registry"), "ca_cert": _optional(config, "ca-cert")}  # fmt: skip


def _optional(config: Mapping[str, Any], key: str) -> str | None:
    return str(config[key]) if config.get(key) else None


def _node(context: Context) -> Any:
    """The node object of this SuperNode (cached per worker process; state lives on disk)."""
    config = context.node_config
    role = node_role(config)
    state_dir = str(config.get("state-dir") or context.run_config["run-dir"])
    key = (state_dir, role.role, role.client_id, tuple(sorted((k, str(v)) for k, v in config.items())))
    if key not in _NODES:
        if role.role == ROLE_AUTHORITY:
            from secure_mor.authority.app import authority_node

            _NODES[key] = authority_node(config, node_paths(config, state_dir))
        else:
            from secure_mor.clients.app import client_node

            _NODES[key] = client_node(config, int(role.client_id), node_paths(config, state_dir))
    return _NODES[key]


def _answer(action: str, message: Message, context: Context) -> Message:
    payload = dict(message.content["payload"]) if "payload" in message.content else {}
    reply = _node(context).handle(action, payload)
    return Message(RecordDict({"payload": ConfigRecord(reply)}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return _answer("train", message, context)


def _register(action: str) -> None:
    def handler(message: Message, context: Context) -> Message:
        return _answer(action, message, context)

    handler.__name__ = action
    app.query(action)(handler)


for _action in QUERY_ACTIONS:
    _register(_action)

"""The project's Flower ClientApp: thin handlers over the node task modules.

Every SuperNode runs this app (Flower has one ClientApp per app); its node
config decides what it is (`secure_mor.protocol.node_role`): a client
institution (`secure_mor.clients.node.ClientNode`) or the key authority
(`secure_mor.crypto.authority_node.AuthorityNode`). A node keeps its state under
node config `state-dir`, or, in the simulation runtime, the run config's
`run-dir`; `key-dir` is where its own signing key is (made beforehand with `secure-mor
keys new`, encrypted; default: under `state-dir`); `registry` is the operator's registry of
public payload keys (default: `<state-dir>/keys`, what the parties publish in a simulation)
and `ca-cert` the operator's CA, whose signature a node requires on every entry of a
`registry` (and a `registry` requires a `ca-cert`): the authority reads the clients' and the
server's keys there, a client the key authority's, with which it verifies the public context
the server relays; for a client, `data-dir` is its own annotations
(`secure_mor.data.save_annotations`; default: its share of the public split).
The authority's K_min and w_min come from its own node config (`k-min`, default
crypto.params.DEFAULT_K_MIN; `w-min`, default crypto.params.DEFAULT_W_MIN), never from the
server's run config; it announces both to the server at setup. Its CKKS context lives in
node config `authority-dir` (default `<state-dir>/authority`; the authority's operator chooses
it, never the server): one directory, one context, one W row per item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from secure_mor.protocol import ROLE_AUTHORITY, node_role

app = ClientApp()

QUERY_ACTIONS = ("identify", "setup", "router_setup", "margins", "router_gradient", "score", "decrypt")
_NODES: dict[tuple[str, str, int | None], Any] = {}


def _node(context: Context) -> Any:
    """The node object of this SuperNode (cached per worker process; state lives on disk)."""
    config = context.node_config
    role = node_role(config)
    state_dir = str(config.get("state-dir") or context.run_config["run-dir"])
    key_dir = str(config["key-dir"]) if config.get("key-dir") else None
    authority_dir = str(config["authority-dir"]) if config.get("authority-dir") else None
    registry = str(config["registry"]) if config.get("registry") else None
    ca_cert = str(config["ca-cert"]) if config.get("ca-cert") else None
    key = (state_dir, role.role, role.client_id, authority_dir)
    if key not in _NODES:
        if role.role == ROLE_AUTHORITY:
            from secure_mor.crypto.authority_node import AuthorityNode
            from secure_mor.crypto.params import DEFAULT_K_MIN

            policy = {"k_min": int(config.get("k-min", DEFAULT_K_MIN))}
            if "w-min" in config:
                policy["w_min"] = float(config["w-min"])
            _NODES[key] = AuthorityNode(state_dir, authority_dir=authority_dir, registry=registry, key_dir=key_dir,
                                        ca_cert=ca_cert, **policy)  # fmt: skip
        else:
            from secure_mor.clients.node import ClientNode

            data_dir = str(config["data-dir"]) if config.get("data-dir") else None
            _NODES[key] = ClientNode(Path(state_dir), int(role.client_id), data_dir=data_dir, key_dir=key_dir,
                                     registry=registry, ca_cert=ca_cert)  # fmt: skip
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

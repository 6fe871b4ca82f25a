"""The key authority's node from its Flower node config (the ClientApp is secure_mor.clientapp).

Its K_min and w_min come from its own node config (`k-min`, default crypto.params.DEFAULT_K_MIN;
`w-min`, default crypto.params.DEFAULT_W_MIN), never from the server's run config; it announces
both to the server at setup. Its CKKS context lives in node config `authority-dir` (default
`<state-dir>/authority`; the authority's operator chooses it, never the server): one directory,
one context, one W row per item.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from secure_mor.authority.node import AuthorityNode
from secure_mor.crypto.params import DEFAULT_K_MIN, DEFAULT_W_MIN


def authority_node(config: Mapping[str, Any], paths: Mapping[str, str | None]) -> AuthorityNode:
    authority_dir = str(config["authority-dir"]) if config.get("authority-dir") else None
    return AuthorityNode(str(paths["state_dir"]), authority_dir=authority_dir, registry=paths["registry"],
                         key_dir=paths["key_dir"], ca_cert=paths["ca_cert"],
                         k_min=int(config.get("k-min", DEFAULT_K_MIN)),
                         w_min=float(config.get("w-min", DEFAULT_W_MIN)))  # fmt: skip

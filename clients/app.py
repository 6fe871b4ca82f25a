"""A client institution's node from its Flower node config (the ClientApp is secure_mor.clientapp):
`data-dir` is its own annotations (`secure_mor.data.save_annotations`; default: its share of the
public split)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_mor.clients.node import ClientNode


def client_node(config: Mapping[str, Any], client_id: int, paths: Mapping[str, str | None]) -> ClientNode:
    data_dir = str(config["data-dir"]) if config.get("data-dir") else None
    return ClientNode(Path(str(paths["state_dir"])), client_id, data_dir=data_dir, key_dir=paths["key_dir"],
                      registry=paths["registry"], ca_cert=paths["ca_cert"])  # fmt: skip

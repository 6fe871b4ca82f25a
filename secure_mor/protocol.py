"""Messages between the server, the clients and the key authority (DESIGN.md, data flow).

Every node runs the same Flower ClientApp; its *role* ("client" or "authority")
comes from its node config (`role`, and `client-id` for a client). In Flower's
simulation runtime, which gives nodes no config of their own, the last
partition is the key authority and partition k < K is client k (`node_role`).

A message is an *action* and a flat payload of Flower-config values (int,
float, str, bytes, bool, or lists of one of them); arrays travel as `.npy`
bytes. The actions and their payloads:

    any node    identify        -> party, role, public_key (Ed25519, hex)
    authority   setup           -> context (public CKKS context bytes), fingerprint, context_signature
                                   (Ed25519, by the authority's payload key, over
                                   crypto.context.context_statement(fingerprint)), clients (the
                                   registry's), k_min, w_min (the authority's policy)
    authority   decrypt         request (SMRQ bytes) -> response (SMRA bytes), or refused (why: an
                                   item would get a second row in the context; nothing released)
    client      setup           context, fingerprint, context_signature (relayed from the authority's
                                setup; the client verifies the signature with the authority's key in
                                the registry it trusts itself and refuses, storing nothing, any other)
    client      train           epsilon, delta, [epochs, batch_size, lr, max_grad_norm, public_epochs]
                                -> party, arch, family, budget_epsilon, total_epsilon, seconds, reused,
                                   <measure>_<family> (REWARD_MODEL_MEASURES)
    client      router_setup    setup (RouterSetup bytes) -> setup_sha256 (pinned for the context)
    client      margins         run_id, step, nonce, mask_key, items (.npy) -> reply (SMRC bytes)
    client      router_gradient run_id, step, nonce, mask_key, query (GradientQuery, see
                                encode_gradient_query) -> reply (SMRC bytes)
    client      score           run_id, step, nonce, mask_key, images (PNG bytes, one per distinct
                                image), image_index, questions, answers -> reply (SMRC bytes),
                                items (the N prompt digests it committed to, 32 bytes each)

Replies (SMRC) are CKKS ciphertexts of masked values, signed by the client
(secure_mor.crypto.wire; mask_key is the server's round key, crypto.blinding): the
server can verify and forward them but not read them. A reply commits to the digests
of the items it scored, by which the key authority keeps one router row per item for the
life of its context: a prompt's digest is of the prompt as the client's own model reads it
(clients.scoring.prompt_digests: a re-encoded PNG or a respelled question is the same prompt
to it), a calibration pair's is of its index (`calibration_digests`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# Light on purpose: Flower's deployment runtime starts a fresh ClientApp process for every
# message, and the key authority's process must not pay for torch or datasets.

Payload = dict[str, Any]

ROLE_CLIENT = "client"
ROLE_AUTHORITY = "authority"
AUTHORITY_PARTY = "authority"
SERVER_PARTY = "server"

# The alignment objectives the router knows (RouterConfig.objectives). "correctness"
# prefers the true answer over a wrong one; "sentences" prefers the true answer
# written as a sentence over the same answer as a single word.
OBJECTIVES = ("correctness", "sentences")

# What a client reports of its reward model on the public held-out set (clients.evaluation),
# one value per measure and question family, as `<measure>_<family>` in its train reply.
REWARD_MODEL_MEASURES = ("top1", "image_dependence", "pairwise")


class ProtocolError(ValueError):
    """A message is malformed or names an unknown action or role."""



@dataclass(frozen=True)
class ClientTrainingSettings:
    """What the server may set of a client's DP training (the `train` request; run config `client-<field>`).
    0 (public_epochs: -1) leaves a setting to the client's architecture default; public_epochs 0 skips the
    public warm start."""

    epochs: int = 0
    public_epochs: int = -1
    batch_size: int = 0
    lr: float = 0.0
    max_grad_norm: float = 0.0

    def overrides(self) -> dict[str, int | float]:
        """The settings given, as the `train` request carries them."""
        unset = {"public_epochs": -1}
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != unset.get(f.name, 0)}

@dataclass(frozen=True)
class NodeRole:
    role: str
    client_id: int | None = None

    @property
    def party(self) -> str:
        return AUTHORITY_PARTY if self.role == ROLE_AUTHORITY else f"client-{self.client_id}"


def node_role(node_config: Mapping[str, Any]) -> NodeRole:
    """The role of a node from its Flower node config (see the module docstring)."""
    if "role" in node_config:
        role = str(node_config["role"])
        if role == ROLE_AUTHORITY:
            return NodeRole(ROLE_AUTHORITY)
        if role == ROLE_CLIENT and "client-id" in node_config:
            return NodeRole(ROLE_CLIENT, int(node_config["client-id"]))
        raise ProtocolError(f"node config role={role!r} needs role 'authority', or 'client' with a client-id")
    if "partition-id" in node_config and "num-partitions" in node_config:
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        return NodeRole(ROLE_AUTHORITY) if partition == partitions - 1 else NodeRole(ROLE_CLIENT, partition)
    raise ProtocolError("the node config gives no role (set role=client client-id=K, or role=authority)")


# ---------------------------------------------------------------- arrays and images


def array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def bytes_array(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ProtocolError(f"not an .npy array: {err}") from err


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _digest(*parts: bytes) -> bytes:
    """SHA-256 of length-prefixed parts (no two part lists share a digest)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.digest()


def calibration_digests(indices: Sequence[int]) -> list[bytes]:
    """The digest of each calibration pair of a router step, by its index in the public calibration set."""
    return [_digest(b"calibration-pair", str(int(i)).encode()) for i in indices]


def score_request(images: Sequence[Any], questions: Sequence[str], answers: Sequence[str]) -> Payload:
    """The items of a scoring round, each distinct image sent once (PNG)."""
    if not len(images) == len(questions) == len(answers):
        raise ProtocolError("images, questions and answers must have the same length")
    index: dict[bytes, int] = {}
    positions = []
    for image in images:
        positions.append(index.setdefault(png_bytes(image), len(index)))
    encoded = list(index)
    return {"images": encoded, "image_index": positions, "questions": list(questions), "answers": list(answers)}

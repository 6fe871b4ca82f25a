"""Messages between the server, the clients and the key authority (docs/architecture.md, "One GRPO step").

Every node runs the same Flower ClientApp; its *role* ("client" or "authority")
comes from its node config (`role`, and `client-id` for a client). In Flower's
simulation runtime, which gives nodes no config of their own, the last
partition is the key authority and partition k < K is client k (`node_role`).

A message is an *action* and a flat payload of Flower-config values (int,
float, str, bytes, bool, or lists of one of them); arrays travel as `.npy`
bytes. Each payload is a typed `Message` (below): the sender encodes it, the
receiver decodes it, and a missing field or a value of the wrong type is a
ProtocolError that names the message and the field. The actions:

    node        action           request                      reply
    any         identify         -                            IdentifyReply
    authority   setup            -                            AuthoritySetupReply
    authority   decrypt          DecryptRequest               DecryptReply (response, or refused: nothing released)
    client      setup            ClientSetupRequest           PartyReply
    client      train            TrainRequest                 TrainReply
    client      router_setup     RouterSetupRequest           RouterSetupReply
    client      margins          MarginsRequest               SealedReply
    client      router_gradient  RoundFields + the GradientQuery (routing.encode_gradient_query)   SealedReply
    client      score            ScoreRequest                 SealedReply (with the items' digests)

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
from dataclasses import MISSING, dataclass, fields
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

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_size, self.lr, self.max_grad_norm) < 0 or self.public_epochs < -1:
            raise ValueError(f"client training settings must be >= 0 (public_epochs >= -1): {self}")

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


# ---------------------------------------------------------------- typed messages


_CHECKS: dict[str, Any] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, bytes | bytearray | memoryview),
    "bool": lambda v: isinstance(v, bool),
}
_CASTS: dict[str, Any] = {"int": int, "float": float, "str": str, "bytes": bytes, "bool": bool}


def _checked(message: str, name: str, kind: str, value: Any) -> Any:
    if kind.startswith("list[") and kind.endswith("]"):
        inner = kind[5:-1]
        if isinstance(value, list | tuple) and all(_CHECKS[inner](v) for v in value):
            return [_CASTS[inner](v) for v in value]
    elif _CHECKS[kind](value):
        return _CASTS[kind](value)
    raise ProtocolError(f"{message}: field {name!r} must be {kind}, got {type(value).__name__}")


@dataclass(frozen=True)
class Message:
    """A message's payload as a dataclass: `encode()` is the payload a node sends, `decode(payload)` reads it
    back, checked: a missing field, or a value of another type than the field's, is a ProtocolError that
    names the message and the field (a field with a default may be absent)."""

    def encode(self) -> Payload:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def decode(cls, payload: Mapping[str, Any]) -> Any:
        values = {}
        for f in fields(cls):
            if f.name in payload:
                values[f.name] = _checked(cls.__name__, f.name, str(f.type), payload[f.name])
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(f"{cls.__name__}: missing field {f.name!r}")
        return cls(**values)


@dataclass(frozen=True)
class IdentifyReply(Message):
    party: str
    role: str
    public_key: str  # Ed25519, hex


@dataclass(frozen=True)
class AuthoritySetupReply(Message):
    context: bytes  # the public CKKS context
    fingerprint: str
    context_signature: bytes  # by the authority's payload key over crypto.context.context_statement(fingerprint)
    clients: list[str]  # the registry's
    k_min: int  # the authority's policy
    w_min: float


@dataclass(frozen=True)
class ClientSetupRequest(Message):
    context: bytes  # relayed from the authority's setup; the client verifies its signature itself
    fingerprint: str
    context_signature: bytes
    data_spec: str  # the public split (config.DataSpec, JSON)


@dataclass(frozen=True)
class TrainRequest(Message):
    epsilon: float
    delta: float
    arch: str = ""  # "": the client's default architecture
    training: ClientTrainingSettings = ClientTrainingSettings()

    def encode(self) -> Payload:
        return {"epsilon": self.epsilon, "delta": self.delta, **({"arch": self.arch} if self.arch else {}),
                **self.training.overrides()}  # fmt: skip

    @classmethod
    def decode(cls, payload: Mapping[str, Any]) -> TrainRequest:
        top = {k: v for k, v in payload.items() if k in ("epsilon", "delta", "arch")}
        settings = {f.name: _checked(cls.__name__, f.name, str(f.type), payload[f.name])
                    for f in fields(ClientTrainingSettings) if f.name in payload}  # fmt: skip
        for name in ("epsilon", "delta"):
            if name not in top:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
        try:
            training = ClientTrainingSettings(**settings)
        except ValueError as err:
            raise ProtocolError(f"{cls.__name__}: {err}") from err
        return cls(_checked(cls.__name__, "epsilon", "float", top["epsilon"]),
                   _checked(cls.__name__, "delta", "float", top["delta"]),
                   _checked(cls.__name__, "arch", "str", top.get("arch", "")), training)


@dataclass(frozen=True)
class TrainReply(Message):
    """A client's trained (or reused) reward model: its budget, what it spent, and its held-out ranking
    measures per family (sent flat, as `<measure>_<family>`, REWARD_MODEL_MEASURES)."""

    party: str
    arch: str
    family: str
    budget_epsilon: float
    total_epsilon: float  # inf: non-private, unbounded
    reused: bool  # trained before with this budget: nothing spent
    seconds: float
    measures: dict[str, dict[str, float]]  # measure -> family -> value

    def encode(self) -> Payload:
        flat = {f"{m}_{family}": float(v) for m, by_family in self.measures.items() for family, v in by_family.items()}
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "measures"}, **flat}

    @classmethod
    def decode(cls, payload: Mapping[str, Any]) -> TrainReply:
        top = {f.name: f for f in fields(cls) if f.name != "measures"}
        missing = [name for name in top if name not in payload]
        if missing:
            raise ProtocolError(f"{cls.__name__}: missing field {missing[0]!r}")
        values = {name: _checked(cls.__name__, name, str(f.type), payload[name]) for name, f in top.items()}
        measures: dict[str, dict[str, float]] = {m: {} for m in REWARD_MODEL_MEASURES}
        for key, value in payload.items():
            for m in REWARD_MODEL_MEASURES:
                if key.startswith(f"{m}_"):
                    measures[m][key[len(m) + 1 :]] = _checked(cls.__name__, key, "float", value)
        return cls(**values, measures=measures)


@dataclass(frozen=True)
class PartyReply(Message):
    """What a node answers when all it says is who did it (a client's setup)."""

    party: str


@dataclass(frozen=True)
class RouterSetupRequest(Message):
    setup: bytes  # routing.RouterSetup


@dataclass(frozen=True)
class RouterSetupReply(Message):
    party: str
    setup_sha256: str  # pinned for the context


@dataclass(frozen=True)
class RoundFields(Message):
    """What every request of a secure round carries (server.secure_round)."""

    run_id: str
    step: int
    nonce: str
    mask_key: str  # the server's round key (crypto.blinding)


@dataclass(frozen=True)
class MarginsRequest(RoundFields):
    items: bytes  # .npy of calibration pair indices


@dataclass(frozen=True)
class ScoreRequest(RoundFields):
    images: list[bytes]  # PNG, one per distinct image (score_request)
    image_index: list[int]
    questions: list[str]
    answers: list[str]


@dataclass(frozen=True)
class SealedReply(Message):
    """A client's reply to margins, router_gradient or score."""

    reply: bytes  # SMRC: CKKS ciphertexts of masked values, signed by the client (crypto.wire)
    seconds: float = 0.0  # the client's own compute
    items: bytes = b""  # score: the N prompt digests it committed to, 32 bytes each

    def encode(self) -> Payload:
        return {k: v for k, v in super().encode().items() if k != "items" or v}


@dataclass(frozen=True)
class DecryptRequest(Message):
    request: bytes  # SMRQ (crypto.wire)


@dataclass(frozen=True)
class DecryptReply(Message):
    """The released fusion, or why the authority left the round out (nothing released)."""

    response: bytes = b""  # SMRA (crypto.wire)
    refused: str = ""  # an item would get a second row in the context
    seconds: float = 0.0  # the authority's own compute

    def encode(self) -> Payload:
        return {k: v for k, v in super().encode().items() if v != ""}



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

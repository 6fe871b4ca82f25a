"""Typed messages (secure_mor.protocol): what a node sends is what the other decodes, and a missing or
mistyped field is an error that names the message and the field, not a KeyError deep in a handler."""

from __future__ import annotations

import re

import pytest

from secure_mor.authority.node import AuthorityNode
from secure_mor.protocol import (
    AuthoritySetupReply,
    ClientSetupRequest,
    ClientTrainingSettings,
    DecryptReply,
    DecryptRequest,
    IdentifyReply,
    MarginsRequest,
    PartyReply,
    ProtocolError,
    RoundFields,
    RouterSetupReply,
    RouterSetupRequest,
    ScoreRequest,
    SealedReply,
    TrainReply,
    TrainRequest,
)
from secure_mor.server.transport import LocalTransport, NodeFailure

ROUND = {"run_id": "run", "step": 3, "nonce": "n", "mask_key": "ab"}
MESSAGES = [
    IdentifyReply("client-0", "client", "00" * 32),
    AuthoritySetupReply(b"ctx", "f" * 64, b"sig", ["client-0", "client-1"], 2, 0.02),
    ClientSetupRequest(b"ctx", "f" * 64, b"sig", "{}"),
    TrainRequest(4.0, 1e-5, "cnn-gru", ClientTrainingSettings(epochs=2, public_epochs=0)),
    TrainRequest(float("inf"), 1e-5),
    TrainReply("client-0", "cnn-gru", "color", 4.0, 3.9, False, 12.5,
               {"top1": {"color": 0.8}, "image_dependence": {"color": 0.5}, "pairwise": {"color": 0.9, "side_a": 0.7}}),
    PartyReply("client-0"),
    RouterSetupRequest(b"setup"),
    RouterSetupReply("client-0", "a" * 64),
    RoundFields(**ROUND),
    MarginsRequest(**ROUND, items=b"npy"),
    ScoreRequest(**ROUND, images=[b"png"], image_index=[0, 0], questions=["q1", "q2"], answers=["red", "blue"]),
    SealedReply(b"smrc", 0.5, b"\x00" * 64),
    DecryptRequest(b"smrq"),
    DecryptReply(response=b"smra", seconds=0.1),
    DecryptReply(refused="a second row", seconds=0.1),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_decodes_to_what_was_encoded(message):
    assert type(message).decode(message.encode()) == message


@pytest.mark.parametrize(
    "message, payload, error",
    [
        (ScoreRequest, {**ROUND, "images": [b"png"], "image_index": [0], "questions": ["q"]},
         "ScoreRequest: missing field 'answers'"),
        (ScoreRequest, {**ROUND, "images": [b"png"], "image_index": ["0"], "questions": ["q"], "answers": ["a"]},
         "ScoreRequest: field 'image_index' must be list[int], got list"),
        (TrainRequest, {"delta": 1e-5}, "TrainRequest: missing field 'epsilon'"),
        (TrainRequest, {"epsilon": 4.0, "delta": 1e-5, "epochs": 1.5}, "field 'epochs' must be int, got float"),
        (TrainRequest, {"epsilon": 4.0, "delta": 1e-5, "public_epochs": -2}, "public_epochs >= -1"),
        (SealedReply, {"reply": "not bytes"}, "SealedReply: field 'reply' must be bytes, got str"),
        (RoundFields, {**ROUND, "step": True}, "RoundFields: field 'step' must be int, got bool"),
    ],
)
def test_a_missing_or_mistyped_field_names_the_message_and_the_field(message, payload, error):
    with pytest.raises(ProtocolError, match=re.escape(error)):
        message.decode(payload)


def test_a_node_answers_a_malformed_request_with_the_field_it_misses(tmp_path):
    transport = LocalTransport({"authority": AuthorityNode(tmp_path)})
    reply = transport.ask(["authority"], "decrypt", {"requets": b"typo"})["authority"]
    assert isinstance(reply, NodeFailure) and "DecryptRequest: missing field 'request'" in reply.reason

"""Scoring (image, question, answer) items with a client's reward model.

Scoring spends no privacy budget: the model's parameters are the output of
DP-SGD, and any function of them and of public inputs (the server's prompts and
generated answers) is post-processing, so no ledger entry is written for it.
(The one client-side input outside that guarantee is the word vocabulary of the
`cnn-gru` architecture; see `clients.text`.)

Scores are deterministic (eval mode, no dropout, no sampling), clipped to
[-R, R], and a non-finite reward never leaves the client: it raises
`ScoringError` instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from secure_mor.clients.models import images_to_tensor
from secure_mor.clients.text import TextEncoder, trim_padding

ScoreItem = tuple[Image.Image | np.ndarray, str, str]  # (image, question, answer text)


class ScoringError(ValueError):
    """The model produced a non-finite reward, or the items are malformed."""


def raw_rewards(
    model: nn.Module, encoder: TextEncoder, items: Sequence[ScoreItem], batch_size: int = 256
) -> np.ndarray:
    """Unclipped rewards, float32 [N]; raises ScoringError if any is NaN or inf."""
    for index, item in enumerate(items):
        if len(item) != 3 or not isinstance(item[1], str) or not isinstance(item[2], str):
            raise ScoringError(f"item {index} is not an (image, question, answer) triple")
    out = np.empty(len(items), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                image = images_to_tensor([i[0] for i in chunk])
                question = trim_padding(encoder.encode([i[1] for i in chunk]))
                answers = trim_padding(encoder.encode([i[2] for i in chunk]).unsqueeze(1))
                out[start : start + len(chunk)] = model(image, question, answers)[:, 0].numpy()
    finally:
        model.train(was_training)
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise ScoringError(f"{len(bad)} non-finite reward(s), first at item {bad[0]}: refusing to release scores")
    return out


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    array = np.ascontiguousarray(tensor.numpy())
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).digest()


def prompt_digests(
    encoder: TextEncoder,
    images: Sequence[Image.Image | np.ndarray],
    image_index: Sequence[int],
    questions: Sequence[str],
) -> list[bytes]:
    """Each item's prompt (images[image_index[i]], questions[i]) as the model reads it: SHA-256
    over the uint8 image tensor it consumes and the text encoder's encoding of the question (each
    with dtype and shape; `raw_rewards`' inputs). Two prompts get one digest iff the model cannot
    tell them apart, whatever their bytes on the wire (a re-encoded PNG, a respelled question):
    the key authority keeps one router row per digest (authority.key_authority)."""
    pixels = [_tensor_digest(images_to_tensor([image])) for image in images]
    texts = {q: _tensor_digest(encoder.encode([q])) for q in set(questions)}
    return [hashlib.sha256(b"prompt v2" + pixels[i] + texts[q]).digest()
            for i, q in zip(image_index, questions, strict=True)]  # fmt: skip


def score(
    model: nn.Module, encoder: TextEncoder, items: Sequence[ScoreItem], clip: float, batch_size: int = 256
) -> np.ndarray:
    """Rewards clipped to [-clip, clip], float32 [N]."""
    if not clip > 0:
        raise ValueError(f"the reward clip must be positive, got {clip}")
    return np.clip(raw_rewards(model, encoder, items, batch_size), -clip, clip).astype(np.float32)

"""How good a reward model is for what GRPO needs, on held-out data.

Two measures, both on the test split (`FederatedData.evaluation`, stratified per
family) and both post-processing of the trained model (no budget, no training data):

* `top1` (the one GRPO needs): for every held-out question, the model scores every
  answer of the question's family in both styles (8 colours x 2, ...), clipped as the
  client releases them; it is right when the best-scored candidate states the true
  answer (ties count as a random pick among the tied). A policy trained on this reward
  is pulled toward the argmax, so an answer prior (the same argmax whatever the image)
  scores at chance here: 1/8 for colour, 1/3 for shape, and for presence whatever a
  question-only guess gets (0.82 on easy-VQA: most presence questions ask about an
  absent attribute).
* `image_dependence`: the share of held-out questions whose best-scored answer changes
  when the image is replaced by another held-out image of the same family. A prior, of
  answers or of questions, scores 0; a model that looks at the image scores about as
  often as the true answer changes.
* `pairwise` (what earlier versions reported, kept for comparison): r(true) > r(one
  random wrong answer), in the client's own style. It hides a prior: a model that always
  prefers "brown" beats a random other colour 7 times in 8 on "brown" questions and
  half the time elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from rich.table import Table
from torch import nn

from secure_mor.clients.models import images_to_tensor
from secure_mor.clients.text import TextEncoder, trim_padding
from secure_mor.clients.training import candidate_rewards, encode_annotations
from secure_mor.data import (
    ANSWER_STYLES,
    FederatedData,
    column,
    make_preference_pairs,
    ordered_families,
    styled_answer,
)
from secure_mor.protocol import REWARD_MODEL_MEASURES
from secure_mor.ranking import top1


def held_out_pairs(data: FederatedData, style: str, seed: int = 0) -> dict[str, Dataset]:
    """Noise-free held-out pairs in `style`, per family."""
    pairs = make_preference_pairs(data.evaluation, data.answers, style=style, noise_rate=0.0, seed=seed)
    families = np.asarray(pairs["family"])
    return {f: pairs.select(np.flatnonzero(families == f)) for f in ordered_families(families)}


def preference_accuracy(model: nn.Module, encoder: TextEncoder, pairs: Dataset, batch_size: int = 256) -> float:
    """Share of pairs with r(chosen) > r(rejected) (a tie counts one half)."""
    rows = encode_annotations(pairs, encoder)
    model.eval()
    margins = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            rewards = candidate_rewards(model, *rows[start : start + batch_size])
            margins.append(rewards[:, 0] - rewards[:, 1])
    m = torch.cat(margins)
    return float(((m > 0).float() + 0.5 * (m == 0).float()).mean())


@torch.no_grad()
def answer_rewards(
    model: nn.Module, encoder: TextEncoder, images: torch.Tensor, questions: Sequence[str], answers: Sequence[str],
    family: str, clip: float | None, batch_size: int = 128,
) -> np.ndarray:
    """[N, A]: for each (image, question) and family answer, the reward of its best-scored candidate
    (the answer in either style), clipped to [-clip, clip] as the client releases it (None: raw)."""
    candidates = [styled_answer(a, family, s) for a in answers for s in ANSWER_STYLES]
    texts = encoder.encode(candidates)
    model.eval()
    out = []
    for start in range(0, len(questions), batch_size):
        image = images[start : start + batch_size]
        question = trim_padding(encoder.encode(list(questions[start : start + batch_size])))
        batch = trim_padding(texts.unsqueeze(0).expand(len(image), *texts.shape).contiguous())
        rewards = model(image, question, batch)
        out.append((rewards if clip is None else rewards.clamp(-clip, clip)).numpy())
    return np.concatenate(out).reshape(len(questions), len(answers), len(ANSWER_STYLES)).max(-1)


def ranking_metrics(
    model: nn.Module, encoder: TextEncoder, rows: Dataset, answers: Mapping[str, Sequence[str]], seed: int = 0,
    clip: float | None = None,
) -> dict[str, dict[str, float]]:
    """`top1` and `image_dependence` (module docstring) per family of the VQA `rows`, on rewards
    clipped to [-clip, clip] (the client's release; None: raw)."""
    rng = np.random.default_rng(seed)
    families = np.asarray(column(rows, "family"))
    out: dict[str, dict[str, float]] = {"top1": {}, "image_dependence": {}}
    for family in ordered_families(families):
        part = rows.select(np.flatnonzero(families == family))
        images = images_to_tensor(part["image"])
        questions = column(part, "question")
        truth = np.array([list(answers[family]).index(t) for t in column(part, "answer")])
        rewards = answer_rewards(model, encoder, images, questions, answers[family], family, clip)
        swap = np.roll(rng.permutation(len(part)), 1) if len(part) > 1 else np.arange(len(part))
        swapped = answer_rewards(model, encoder, images[swap], questions, answers[family], family, clip)
        out["top1"][family] = top1(rewards, truth)
        out["image_dependence"][family] = float(np.mean(rewards.argmax(-1) != swapped.argmax(-1)))
    return out


def evaluate_model(model: nn.Module, encoder: TextEncoder, data: FederatedData, style: str, seed: int = 0,
                   clip: float | None = None) -> dict[str, dict[str, float]]:
    """Every measure (module docstring) per family: {"top1": {family: value}, "image_dependence": ...,
    "pairwise": ...}; the ranking measures on rewards clipped as the client releases them."""
    held_out = held_out_pairs(data, style, seed)
    pairwise = {family: preference_accuracy(model, encoder, pairs) for family, pairs in held_out.items()}
    return {**ranking_metrics(model, encoder, data.evaluation, data.answers, seed, clip), "pairwise": pairwise}


def accuracy_table(rows: Sequence[tuple[str, str, Mapping[str, Any]]], title: str = "Reward models (held out)"
                   ) -> Table:
    """A rich table; each row is (label, the client's own family, `evaluate_model`'s result).
    Per family: top-1 / image dependence / pairwise; own-family cells are bold."""
    table = Table(title=title, caption="per family: top-1 among all answers / image dependence / pairwise accuracy")
    table.add_column("client")
    families = ordered_families(f for r in rows for f in r[2]["top1"])
    for family in families:
        table.add_column(family, justify="right")
    for label, own, metrics in rows:
        cells = []
        for f in families:
            cell = " / ".join(f"{metrics[m][f]:.2f}" for m in REWARD_MODEL_MEASURES)
            cells.append(f"[bold]{cell}[/bold]" if f == own else cell)
        table.add_row(label, *cells)
    return table

"""The ranking metric (clients.evaluation): what GRPO needs of a reward model.

Two models built for the purpose, scored on the real held-out set: an answer prior (its reward
depends on the answer text only) must score at chance on top-1 and never change its best answer
with the image; a model that knows every held-out answer must score 1.0."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from secure_mor.clients.evaluation import ranking_metrics
from secure_mor.clients.models import images_to_tensor
from secure_mor.clients.text import WordTokenizer, words
from secure_mor.data import column


class AnswerPrior(nn.Module):
    """Reward = a fixed preference per answer word ("brown" > every colour, "circle", "no"), whatever
    the image or the question."""

    def __init__(self, encoder: WordTokenizer, favourites: tuple[str, ...]) -> None:
        super().__init__()
        self.favourite_ids = torch.tensor([encoder.encode([w])[0, 0].item() for w in favourites])

    def forward(self, image: torch.Tensor, question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        return torch.isin(answers, self.favourite_ids).any(-1).float()


class KnowsTheAnswers(nn.Module):
    """Reward 1 for the true answer of (image, question), looked up from the held-out set, else 0."""

    def __init__(self, encoder: WordTokenizer, rows) -> None:
        super().__init__()
        self.truth = {}
        images = images_to_tensor(rows["image"])
        questions = encoder.encode(column(rows, "question"))
        for image, question, answer in zip(images, questions, column(rows, "answer"), strict=True):
            self.truth[self._key(image, question)] = encoder.encode([answer])[0, 0].item()

    @staticmethod
    def _key(image: torch.Tensor, question: torch.Tensor) -> tuple:
        return hash(image.numpy().tobytes()), tuple(question[question != 0].tolist())

    def forward(self, image: torch.Tensor, question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        truth = torch.tensor([self.truth.get(self._key(i, q), -1) for i, q in zip(image, question, strict=True)])
        return (answers == truth[:, None, None]).any(-1).float()


def _encoder(federated) -> WordTokenizer:
    texts = column(federated.evaluation, "question") + [a for v in federated.answers.values() for a in v]
    texts += ["The color is", "The shape is a", "it is"]
    return WordTokenizer(sorted({w for t in texts for w in words(t)}))


def test_an_answer_prior_scores_at_chance_and_ignores_the_image(federated):
    encoder = _encoder(federated)
    metrics = ranking_metrics(AnswerPrior(encoder, ("brown", "circle", "no")), encoder, federated.evaluation,
                              federated.answers)
    families = np.asarray(column(federated.evaluation, "family"))
    answers = np.asarray(column(federated.evaluation, "answer"))
    for family, favourite in (("color", "brown"), ("shape", "circle"), ("presence", "no")):
        n = int((families == family).sum())
        chance = 1 / len(federated.answers[family])
        # a prior is right exactly when the truth is its favourite: at chance within 3 standard errors
        assert metrics["top1"][family] == np.mean(answers[families == family] == favourite)
        assert abs(metrics["top1"][family] - chance) <= 3 * math.sqrt(chance * (1 - chance) / n), family
        assert metrics["image_dependence"][family] == 0.0


def test_a_model_that_knows_the_answers_scores_one(federated):
    encoder = _encoder(federated)
    metrics = ranking_metrics(KnowsTheAnswers(encoder, federated.evaluation), encoder, federated.evaluation,
                              federated.answers)
    assert metrics["top1"] == {"color": 1.0, "shape": 1.0, "presence": 1.0}
    # its best answer follows the image: it changes about as often as the true answer would
    assert metrics["image_dependence"]["color"] > 0.6 and metrics["image_dependence"]["shape"] > 0.4

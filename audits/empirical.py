"""Empirical privacy audit of a client's DP-SGD training in one run.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023, arXiv 2305.08846). m canary preference pairs are each included
in the client's training set independently with probability 1/2; the reward
model is trained once, on the real training path (`train_reward_model`, Opacus'
PrivacyEngine, `default_train_config`); every canary is then scored and the
auditor guesses "included" for the highest scores and "excluded" for the
lowest, abstaining on the rest. If the training were (epsilon, delta)-DP, the
number of correct guesses could not be large with high probability; a count
too large for a given epsilon refutes that epsilon. The largest epsilon refuted
at the stated confidence is the empirical lower bound. It is only a lower
bound: an audit can refute a claim, never prove one.

Canaries. The privacy unit is one annotation (one dataset row), so a canary
is one whole annotation, here with one rejected answer. Canaries are *mislabelled* pairs on images that no
client holds (the server's public SFT slice): chosen = a wrong answer of the
question's family, rejected = the true answer, in the client's annotation
style. A model that did not see a canary learns the task from the regular
pairs and so gives it a negative margin r(chosen) - r(rejected); a model that
memorises a canary it saw pushes that margin up. The score is the margin, and
it separates included from excluded canaries as far as the training lets the
model memorise single pairs, which is what DP-SGD must prevent.

The text vocabulary (cnn-gru's word tokenizer) is built from the regular
annotations and *all* m canaries, so that it does not depend on which canaries
were included: the audit measures DP-SGD, and the vocabulary is outside its
guarantee (see `clients.text`).

This module is the auditor's: the bound, the configuration and the result. The
training run it audits is driven by `secure_mor.experiments.audit` (it runs the
clients' own training code).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import binom

if TYPE_CHECKING:  # datasets is imported only when canaries are made
    from datasets import Dataset

SCHEMA = "secure-mor/empirical-audit/v1"
DEFAULT_CONFIDENCE = 0.95


# ------------------------------------------------------------------ the bound


def p_value(correct: int, guesses: int, canaries: int, epsilon: float, delta: float) -> float:
    """Probability of at least `correct` right guesses out of `guesses` (among `canaries`
    each included with probability 1/2) if the training were (epsilon, delta)-DP.

    The paper's main result in its (epsilon, delta) form (Steinke, Nasr, Jagielski 2023,
    arXiv 2305.08846; the p-value code printed in the paper computes the same): with
    r guesses fixed in advance, f(v) = P[Binomial(r, q) >= v] and q = e^eps / (1 + e^eps),

        P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i.

    Exact binomial tails (scipy)."""
    v, r, m = int(correct), int(guesses), int(canaries)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if epsilon < 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1), got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # f(v)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    slack = np.max((binom.sf(v - i - 1, r, q) - tail) / i)  # (f(v - i) - f(v)) / i
    return min(tail + 2 * m * delta * float(slack), 1.0)


def epsilon_lower_bound(
    correct: int, guesses: int, canaries: int, delta: float, confidence: float = DEFAULT_CONFIDENCE
) -> float:
    """The largest epsilon that `correct` right guesses refute at `confidence`: the
    training is not (epsilon, delta)-DP for any smaller epsilon, except with probability
    at most 1 - confidence. 0 when nothing is refuted. Bisection on epsilon, as in the
    paper's code (the p-value grows with epsilon: q does)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1 - confidence
    if p_value(correct, guesses, canaries, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(correct, guesses, canaries, high, delta) < alpha:
        low, high = high, 2 * high
        if high > 1e3:  # never reached: at epsilon 1e3, q = 1 to double precision
            return math.inf
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(correct, guesses, canaries, middle, delta) < alpha else (low, middle)
    return low


def count_correct(scores: Sequence[float], included: Sequence[bool], guesses: int) -> int:
    """Guess "included" for the ceil(r/2) highest scores and "excluded" for the floor(r/2)
    lowest (r = `guesses`, abstain on the rest); the number of right guesses."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if not 0 <= guesses <= len(scores):
        raise ValueError(f"guesses must be in [0, {len(scores)}], got {guesses}")
    order = np.argsort(-scores, kind="stable")
    positive = -(-guesses // 2)
    highest, lowest = order[:positive], order[len(order) - (guesses - positive) :]
    return int(included[highest].sum() + (~included[lowest]).sum())


# ------------------------------------------------------------------ the audit


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """One audit.

    epsilon: the training's target epsilon (math.inf: non-private).
    canaries: m. guesses: the numbers of guesses r to try, fixed before training; the
        bound of each is computed at confidence 1 - (1 - confidence) / len(guesses)
        (a union bound over the tries) and the largest is reported, so the reported
        bound holds at `confidence`.
    pairs: the client's regular training pairs (its split's pairs_per_client).
    train: overrides of the architecture's training defaults (`default_train_config`).
    """

    arch: str = "cnn-gru"
    client: int = 0
    epsilon: float = 4.0
    delta: float = 1e-5
    canaries: int = 200
    guesses: tuple[int, ...] = (20, 50, 100)
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0
    pairs: int = 800
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.canaries < 1 or self.pairs < 1:
            raise ValueError("canaries and pairs must be at least 1")
        if not self.guesses or any(not 1 <= r <= self.canaries for r in self.guesses):
            raise ValueError(f"every number of guesses must be in [1, canaries={self.canaries}], got {self.guesses}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (inf for non-private), got {self.epsilon}")


@dataclass(frozen=True)
class GuessOutcome:
    guesses: int
    correct: int
    epsilon_lower_bound: float  # at the union-bound-corrected confidence


@dataclass(frozen=True)
class EmpiricalAuditResult:
    config: EmpiricalAuditConfig
    epsilon_claimed: float  # what Opacus' accountant reports for the run; inf if non-private
    included: int
    outcomes: list[GuessOutcome]
    mechanism: dict[str, float] | None  # noise_multiplier, sample_rate, steps
    train_config: dict[str, Any]
    scores: list[float]
    included_mask: list[bool]
    seconds: float

    @property
    def best(self) -> GuessOutcome:
        return max(self.outcomes, key=lambda o: (o.epsilon_lower_bound, o.correct / o.guesses))

    @property
    def epsilon_lower_bound(self) -> float:
        return self.best.epsilon_lower_bound

    def to_json(self) -> dict[str, Any]:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None  # JSON has no inf: null = non-private / unbounded

        c = self.config
        train_config = dict(self.train_config, epsilon=finite(self.train_config["epsilon"]))
        return {
            "schema": SCHEMA,
            "method": "Steinke, Nasr, Jagielski 2023 (arXiv 2305.08846), one run, (epsilon, delta) bound",
            "arch": c.arch,
            "client": c.client,
            "epsilon_claimed": finite(self.epsilon_claimed),
            "delta": c.delta,
            "canaries": c.canaries,
            "included": self.included,
            "guesses": self.best.guesses,
            "correct": self.best.correct,
            "confidence": c.confidence,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "guess_sweep": {
                "union_bound_over": len(self.outcomes),
                "per_try_confidence": 1 - (1 - c.confidence) / len(self.outcomes),
                "outcomes": [asdict(o) for o in self.outcomes],
            },
            "canary_design": "mislabelled pairs (chosen = a wrong answer, rejected = the true one) on images "
            "no client holds; score = margin r(chosen) - r(rejected)",
            "mechanism": self.mechanism,
            "train_config": train_config,
            "seed": c.seed,
            "pairs": c.pairs,
            "seconds": round(self.seconds, 2),
            "scores": [round(s, 5) for s in self.scores],
            "included_mask": self.included_mask,
        }


def mislabelled_canaries(
    rows: Dataset, answers: dict[str, list[str]], count: int, family: str, style: str, seed: int
) -> Dataset:
    """`count` canaries (annotations with one rejected answer) from the questions of `family` in
    `rows` (image, question, answer, family): chosen = a wrong answer of the same family,
    rejected = the true one."""
    from secure_mor.data import column, make_preference_pairs

    candidates = [i for i, f in enumerate(column(rows, "family")) if f == family]
    if count > len(candidates):
        raise ValueError(f"{count} canaries requested but only {len(candidates)} {family} questions to draw from")
    picked = rows.select(sorted(random.Random(f"canaries/{seed}").sample(candidates, count)))
    honest = make_preference_pairs(picked, answers, style=style, seed=seed)
    true_answers = column(honest, "chosen_text")
    wrong = [texts[0] for texts in column(honest, "rejected_texts")]
    return honest.remove_columns(["chosen_text", "rejected_texts"]).add_column("chosen_text", wrong).add_column(
        "rejected_texts", [[t] for t in true_answers], feature=honest.features["rejected_texts"])


def result_path(run_dir: Path, config: EmpiricalAuditConfig) -> Path:
    eps = "inf" if math.isinf(config.epsilon) else f"{config.epsilon:g}"
    return Path(run_dir) / "audits" / f"empirical-{config.arch}-eps{eps}-seed{config.seed}.json"


def write_result(result: EmpiricalAuditResult, run_dir: Path) -> Path:
    path = result_path(run_dir, result.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    return path

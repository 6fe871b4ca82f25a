"""GRPO's reward function: the router-fused, encrypted clients' reward of each completion, released by the
key authority through a secure round (server.session). TRL calls it like any reward function."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_mor.data import is_sentence, ordered_families
from secure_mor.ranking import top1 as top1_of
from secure_mor.routing import Router
from secure_mor.server.router import parse_fusion, weights_for
from secure_mor.server.session import SecureSession

if TYPE_CHECKING:
    from secure_mor.server.pipeline import AlignConfig

ANSWER_PRIOR_SHRINKAGE = (0.0, 0.25, 0.5, 0.75, 1.0)  # the factors learn_answer_prior chooses from


def prompt_key(image_id: str, question: str) -> str:
    """One GRPO prompt: an image and a question."""
    return f"{image_id}\0{question}"


class FederatedReward:
    """TRL reward function: the router-fused, encrypted clients' reward of each completion,
    decrypted by the key authority (see `server.session`). None for a skipped round.

    A completion that names no answer of its question's family (".", "red" to "is there a
    circle?") is not sent to the clients: it gets the reward of the worst answer given to the
    same prompt in the round (0 when no completion of the prompt is an answer), as the oracle's
    0 for a wrong answer. The public answer sets decide what is an answer; the clients only rank
    answers. Measured: GRPO on the clients' rewards alone learnt to answer "." (a text no client
    had scored in training, which got a high reward); a fixed floor of -R made "answer anything"
    the round's main signal and drowned the ranking of answers (held-out accuracy fell 0.16 in
    the first 10 steps)."""

    __name__ = "fused_reward"

    def __init__(self, session: SecureSession, config: AlignConfig, router: Router | None,
                 features_of: Callable[..., np.ndarray], family_clients: Mapping[str, int],
                 answers: Mapping[str, list[str]]) -> None:
        self.session, self.config, self.router = session, config, router
        self.features_of, self.family_clients, self.answers = features_of, family_clients, answers
        self.rows: dict[str, np.ndarray] = {}  # the router's row of each prompt seen (fusion mor)
        self.seconds = {"weights": 0.0, "round": 0.0}
        self.answer_prior: dict[str, dict[str, float]] = {}  # family -> answer -> offset (learn_answer_prior)
        # The families whose answers are scored (None: all); the others' completions all get 0, so their
        # advantage is 0 and only the KL term acts on them (AlignConfig.family_gate, gated_families).
        self.families: list[str] | None = None
        # family -> style -> reward: families rewarded by the fused reward's style level alone (measured with
        # the answer prior, `style_levels`), whatever the answer; nothing of theirs is sent to the clients
        # (AlignConfig.family_gate for an objective with a style, style_only_families).
        self.style_only: dict[str, dict[str, float]] = {}
        # prompt key -> the SFT policy's own answer word: a style-only family's style is paid only to it
        # (pipeline.reference_answers); a prompt without one pays any answer.
        self.reference_answers: dict[str, str] = {}

    def learn_answer_prior(self, labelled: Any, per_family: int, seed: int, batch: int = 128) -> dict[str, Any]:
        """The fused reward's preference for each answer whatever the image, which `__call__` subtracts.

        From the server's own labelled questions (`labelled`: its SFT set), up to `per_family` of each
        family with every true answer equally often; each answer of the family, in every style, is
        scored on them as GRPO would score it (same rounds, same router rows, each release in the
        ledger). An answer's offset is its mean fused reward minus the mean of all the family's answers
        in the same style, averaged over styles: what the reward pays for it whatever the image (with
        the true answers balanced, a reward without answer prior, the oracle's, gets offsets 0).
        Subtracting it leaves the image-dependent part of the reward and the style preference (one level
        per style, reported as `style_levels`: a style's mean fused reward above the family's mean). The
        offsets are shrunk per family by the factor in ANSWER_PRIOR_SHRINKAGE under which the corrected
        fused reward ranks the true answer first most often on those questions (ties: the smaller
        factor), as the released values show: a correction must not reorder answers the reward tells
        apart. Measured on easy-VQA at epsilon 4: the fused reward paid "rectangle"
        0.47 and "triangle" -0.64 above the mean on every shape question, and the policy, which cannot
        tell shapes apart, answered "rectangle" to 190 of 200 after GRPO; the full correction made it
        answer "red" to brown (the colour model's "brown" offset, +0.76, is larger than its margin)."""
        from secure_mor.data import ANSWER_STYLES, column, styled_answer
        from secure_mor.protocol import score_request

        rng = np.random.default_rng(seed)
        true_answers, families = np.asarray(column(labelled, "answer")), np.asarray(column(labelled, "family"))
        chosen: list[int] = []
        for f in ordered_families(self.answers):
            each = -(-per_family // len(self.answers[f]))
            for a in self.answers[f]:
                pool = np.flatnonzero((families == f) & (true_answers == a))
                chosen += rng.choice(pool, min(each, len(pool)), replace=False).tolist()
        rows = [(i, families[i], a, s) for i in chosen for a in self.answers[families[i]] for s in ANSWER_STYLES]
        released: dict[tuple[int, str, str], float] = {}
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            sample = labelled.select([i for i, *_ in chunk])
            texts = [styled_answer(a, f, s) for _, f, a, s in chunk]
            w = self.weights(sample["image"], sample["question"], sample["family"], sample["image_id"])
            values = self.session.fused_rewards(score_request(sample["image"], sample["question"], texts), w)
            for (i, _, a, s), v in zip(chunk, values if values is not None else [], strict=False):
                released[(i, a, s)] = float(v)
        report: dict[str, Any] = {"questions_per_family": per_family, "released": len(released), "families": {}}
        for f in ordered_families(self.answers):
            questions = sorted({i for i, _, _ in released if families[i] == f})
            if not questions:
                continue
            # R[question, answer, style]; a value missing from a skipped round counts as the family's mean
            r = np.full((len(questions), len(self.answers[f]), len(ANSWER_STYLES)), np.nan)
            for q, i in enumerate(questions):
                for j, a in enumerate(self.answers[f]):
                    for t, style in enumerate(ANSWER_STYLES):
                        r[q, j, t] = released.get((i, a, style), np.nan)
            r = np.where(np.isnan(r), np.nanmean(r), r)
            offset = (r.mean(0) - r.mean((0, 1))).mean(-1)  # per answer: above its style's mean, whatever the image
            truth = np.array([self.answers[f].index(str(a)) for a in true_answers[questions]])
            top1 = {lam: top1_of((r - lam * offset[None, :, None]).max(-1), truth) for lam in ANSWER_PRIOR_SHRINKAGE}
            lam = max(ANSWER_PRIOR_SHRINKAGE, key=lambda x: (round(top1[x], 9), -x))
            self.answer_prior[f] = {a: float(lam * o) for a, o in zip(self.answers[f], offset, strict=True)}
            levels = r.mean((0, 1)) - r.mean()
            report["families"][f] = {"questions": len(questions), "shrinkage": lam, "offsets": self.answer_prior[f],
                                     "style_levels": {s: float(v) for s, v in zip(ANSWER_STYLES, levels, strict=True)},
                                     "fused_top1": {str(x): v for x, v in top1.items()},
                                     "rows": [int(i) for i in questions]}
        return report

    def weights(self, images: Sequence[Any], questions: Sequence[str], families: Sequence[str],
                image_ids: Sequence[str]) -> np.ndarray:
        n, k, w_min = len(questions), self.config.num_clients, self.session.w_min
        if parse_fusion(self.config.fusion, k)[0] != "mor":
            return weights_for(self.config.fusion, n=n, k=k, w_min=w_min, families=families,
                               family_clients=self.family_clients)
        # One row per prompt for the run, computed once and alone: the key authority refuses a prompt
        # under a second row, and features computed in batches of other sizes differ in float32 rounding
        # (measured ~1e-7, above its tolerance).
        keys = [prompt_key(i, q) for i, q in zip(image_ids, questions, strict=True)]
        objective = np.array([self.router.config.objective_id(self.config.objective)])
        for j, key in enumerate(keys):
            if key not in self.rows:
                x = self.features_of([images[j]], [questions[j]], [families[j]])
                self.rows[key] = weights_for("mor", n=1, k=k, w_min=w_min, router=self.router, features=x,
                                             objective_ids=objective)[0]
        return np.stack([self.rows[key] for key in keys])

    def __call__(self, prompts: list, completions: list, image: list, question: list, family: list,
                 image_id: list, **kwargs: Any) -> list[float | None]:
        from secure_mor.policy import extract_answer
        from secure_mor.protocol import score_request

        started = time.perf_counter()
        answers = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        words = [extract_answer(a, f, self.answers) for a, f in zip(answers, family, strict=True)]
        trained = [self.families is None or f in self.families for f in family]
        prompt = [prompt_key(i, q) for i, q in zip(image_id, question, strict=True)]
        styled = {i: self._style_reward(family[i], answers[i], words[i], self.reference_answers.get(prompt[i]))
                  for i in range(len(answers)) if trained[i] and family[i] in self.style_only}
        scored = [i for i, word in enumerate(words) if word and trained[i] and i not in styled]
        if not scored:
            return [styled.get(i, 0.0) for i in range(len(answers))]

        def pick(values: Sequence[Any]) -> list[Any]:
            return [values[i] for i in scored]

        w = self.weights(pick(image), pick(question), pick(family), pick(image_id))
        computed = time.perf_counter()
        values = self.session.fused_rewards(score_request(pick(image), pick(question), pick(answers)), w)
        self.seconds["weights"] += computed - started
        self.seconds["round"] += time.perf_counter() - computed
        if values is None:
            return [None] * len(answers)
        fused = {i: float(v) - self.answer_prior.get(family[i], {}).get(words[i], 0.0)
                 for i, v in zip(scored, values, strict=True)}
        worst: dict[str, float] = {}
        for i, value in fused.items():
            worst[prompt[i]] = min(value, worst.get(prompt[i], value))
        return [styled[i] if i in styled else fused.get(i, worst.get(prompt[i], 0.0)) if trained[i] else 0.0
                for i in range(len(answers))]

    def _style_reward(self, family: str, answer: str, word: str, reference: str | None) -> float:
        """A style-only family's reward: its style level for the reference answer (any answer where there is
        none); another answer, or none, gets the lowest level (as elsewhere, the worst an answer can get)."""
        levels = self.style_only[family]
        if not word or (reference is not None and word != reference):
            return min(levels.values())
        return levels["sentence" if is_sentence(answer) else "word"]

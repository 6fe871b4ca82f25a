"""The oracle diagnostic: GRPO with a reward that reads the true answers.

It calibrates the alignment stage, not a fusion a user can choose: if GRPO on the
oracle reward does not lift the SFT policy's held-out accuracy, no learned reward
can (docs/architecture.md, "What \"it works\" means"). The oracle runs the same GRPO stage as
`secure-mor align` (same prompts, settings, evaluation and results schema, in
`<run>/align/oracle[-<objective>]/`), with no client, router or key authority: it
needs the prompt pool's answers, which no party of the protocol holds
(`FederatedData.pool_answers`).

Rewards: `correctness` 1 when the completion's answer word is right, else 0;
`sentences` the same, plus 0.5 when the completion is a full sentence and right.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from secure_mor.config import RunDir
from secure_mor.data import FederatedData, column, is_sentence, normalize_text
from secure_mor.policy import extract_answer
from secure_mor.protocol import OBJECTIVES
from secure_mor.server.pipeline import (
    AlignConfig,
    AlignError,
    Log,
    align_policy,
    prepare_data,
    prepare_policy,
    write_progress,
)

ORACLE = "oracle"


class OracleReward:
    """TRL reward function: the true answer's reward of each completion (module docstring)."""

    __name__ = "oracle_reward"

    def __init__(self, data: FederatedData, objective: str) -> None:
        if objective not in OBJECTIVES:
            raise AlignError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
        if len(data.pool_answers) != len(data.prompt_pool):
            raise AlignError("the oracle needs the prompt pool's answers (FederatedData.pool_answers)")
        self.answers = data.answers
        self.objective = objective
        keys = zip(column(data.prompt_pool, "image_id"), column(data.prompt_pool, "question"), strict=True)
        self.truth = {key: normalize_text(a) for key, a in zip(keys, data.pool_answers, strict=True)}

    def __call__(self, prompts: list, completions: list, question: list, family: list, image_id: list,
                 **kwargs: Any) -> list[float]:
        rewards = []
        for completion, q, f, i in zip(completions, question, family, image_id, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
            right = extract_answer(text, f, self.answers) == self.truth[(i, q)]
            rewards.append(float(right) * (1.5 if self.objective == "sentences" and is_sentence(text) else 1.0))
        return rewards


def run_oracle(run_dir: Path | str, config: AlignConfig, log: Log = print) -> dict[str, Any]:
    """GRPO on the oracle reward from the run's SFT policy (built if missing); returns and writes
    `<run>/align/<oracle label>/results.json` (the schema of `align`'s, without clients or ledger)."""
    started = time.perf_counter()
    run = RunDir(run_dir)
    config = replace(config, fusion=ORACLE)
    out = run.path / "align" / config.label
    if (out / "results.json").exists() and not config.resume:
        raise AlignError(f"{out} already holds a finished run: use another --out, or --resume to re-run its tail")
    data = prepare_data(run, config)
    timings: dict[str, float] = {}
    prepare_policy(run, data, config, log, on_step=lambda step, total: write_progress(out, "SFT", step, total))
    timings["policy_s"] = time.perf_counter() - started
    results = align_policy(run, data, config, OracleReward(data, config.objective), out, timings, log)
    results.update(config=config.summary(), run_id=f"oracle-s{config.seed}", clients=None, router=None, ledger=None)
    results["timings"]["total_s"] = time.perf_counter() - started
    run.write_json(out / "results.json", results)
    write_progress(out, "done")
    return results

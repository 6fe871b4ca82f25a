"""The empirical audit's training run: client K's own training code on its annotations plus the
canaries (`audits.empirical` has the method, the bound and the result)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from secure_mor.audits.empirical import (
    EmpiricalAuditConfig,
    EmpiricalAuditResult,
    GuessOutcome,
    count_correct,
    epsilon_lower_bound,
    mislabelled_canaries,
)
from secure_mor.clients.training import ProgressFn


def run_empirical_audit(config: EmpiricalAuditConfig, run_dir: Path | str | None = None,
                        progress: ProgressFn | None = None) -> EmpiricalAuditResult:
    """Build the client's data and the canaries, train once, score, guess, bound. With `run_dir`
    the client's annotations come from that run's split (its data.json, whatever the dataset);
    without it, from the default easy-VQA split of `config.seed` and `config.pairs`.
    `progress(step, total, loss)` is called after each training step."""
    import torch
    from datasets import concatenate_datasets

    from secure_mor.clients.models import architecture
    from secure_mor.clients.training import (
        PrivacyState,
        candidate_rewards,
        default_train_config,
        encode_annotations,
        public_warm_start_config,
        train_reward_model,
    )
    from secure_mor.config import DataSpec, RunDir
    from secure_mor.data import SplitConfig, public_annotations
    from secure_mor.ledger import Budget

    start = time.perf_counter()
    spec = RunDir(run_dir).data_spec() if run_dir else DataSpec.of_run(max(3, config.client + 1), config.seed,
                                                                        config.pairs, SplitConfig().calibration_pairs)
    if config.client >= len(spec.split.clients):
        raise ValueError(f"the split has {len(spec.split.clients)} clients: no client {config.client}")
    data = spec.load()
    regular = data.clients[config.client]
    own = data.config.clients[config.client]
    canaries = mislabelled_canaries(data.sft, data.answers, config.canaries, own.family, own.style, config.seed)
    included = np.random.default_rng(config.seed).random(config.canaries) < 0.5
    train_rows = concatenate_datasets([regular, canaries.select(np.flatnonzero(included).tolist())])

    # The client's own procedure: a public warm start (no budget), then DP-SGD on its annotations.
    train = dict(config.train)
    public_epochs = train.pop("public_epochs", None)  # None: the architecture's (PUBLIC_WARM_START)
    public = public_annotations(data, own.style, own.family, seed=config.seed) if public_epochs != 0 else None
    arch = architecture(config.arch)
    texts = [t for rows in (regular, canaries, public) if rows is not None
             for t in [*rows["question"], *rows["chosen_text"], *(x for xs in rows["rejected_texts"] for x in xs)]]
    encoder = arch.build_encoder(texts)
    train_config = default_train_config(config.arch, config.epsilon, delta=config.delta, seed=config.seed, **train)
    torch.manual_seed(train_config.seed)  # the initialisation, as train_client draws it
    model = arch.build_model(encoder)
    privacy = PrivacyState(Budget(config.epsilon, config.delta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus' secure-RNG and RDP-order hints
        if public is not None:
            warm = public_warm_start_config(config.arch, config.seed, public_epochs)
            public_data = PrivacyState(Budget(math.inf, config.delta))  # public data: no budget
            train_reward_model(model, encode_annotations(public, encoder), warm, public_data)
        result = train_reward_model(model, encode_annotations(train_rows, encoder), train_config, privacy, progress)

    with torch.no_grad():
        rewards = candidate_rewards(model.eval(), *encode_annotations(canaries, encoder).tensors)
    scores = (rewards[:, 0] - rewards[:, 1]).tolist()
    per_try = 1 - (1 - config.confidence) / len(config.guesses)
    outcomes = []
    for r in config.guesses:
        correct = count_correct(scores, included, r)
        outcomes.append(GuessOutcome(r, correct, epsilon_lower_bound(correct, r, config.canaries, config.delta,
                                                                     per_try)))  # fmt: skip
    mechanism = None
    if result.mechanism is not None:
        sigma, rate, steps = result.mechanism
        mechanism = {"noise_multiplier": sigma, "sample_rate": rate, "steps": steps}
    return EmpiricalAuditResult(
        config=config,
        epsilon_claimed=result.epsilon,
        included=int(included.sum()),
        outcomes=outcomes,
        mechanism=mechanism,
        train_config=asdict(train_config),
        scores=[float(s) for s in scores],
        included_mask=[bool(b) for b in included],
        seconds=time.perf_counter() - start,
    )

"""Every architecture learns its own family's preferences under DP-SGD at epsilon 4.

The full check (default settings, PRV, all three architectures) is slow; the
always-on variant trains the fastest architecture with the RDP accountant,
whose calibration takes well under a second."""

from __future__ import annotations

import math

import pytest
import torch

from secure_mor.audits.ledger import Budget
from secure_mor.clients.evaluation import evaluate_model, held_out_pairs
from secure_mor.clients.models import ARCHITECTURES, architecture
from secure_mor.clients.training import PrivacyState, TrainConfig, encode_pairs, train_reward_model
from secure_mor.data import SplitConfig, build_federated_data

torch.set_num_threads(1)
CHANCE_MARGIN = 0.6  # 200 held-out pairs: chance is 0.5 +- 0.035


@pytest.fixture(scope="module")
def data():
    return build_federated_data(SplitConfig(eval_per_family=200))  # default split: 800 pairs per client


def _in_family_accuracy(data, arch_name: str, config: TrainConfig, client: int = 0) -> tuple[float, float]:
    arch = architecture(arch_name)
    pairs = data.clients[client]
    encoder = arch.build_encoder(list(pairs["question"]) + list(pairs["chosen_text"]) + list(pairs["rejected_text"]))
    torch.manual_seed(0)
    model = arch.build_model(encoder)
    result = train_reward_model(model, encode_pairs(pairs, encoder), config, PrivacyState(Budget(8.0, 1e-5)))
    family, style = data.config.clients[client].family, data.config.clients[client].style
    accuracy = evaluate_model(model, encoder, held_out_pairs(data, style))
    return accuracy[family], result.epsilon


def test_frozen_feature_head_beats_chance_in_family_at_epsilon_4(data):
    accuracy, epsilon = _in_family_accuracy(data, "minilm-head", TrainConfig(epsilon=4.0, accountant="rdp"))
    assert epsilon <= 4.0 + 0.01
    assert accuracy >= CHANCE_MARGIN


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_beats_chance_in_family_at_epsilon_4(data, arch):
    accuracy, epsilon = _in_family_accuracy(data, arch, TrainConfig(epsilon=4.0))
    assert epsilon <= 4.0 + 0.01 and math.isfinite(epsilon)
    assert accuracy >= CHANCE_MARGIN

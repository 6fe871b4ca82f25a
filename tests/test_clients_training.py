"""Every architecture learns its own family under DP-SGD at epsilon 4, with its default
hyper-parameters, as GRPO needs it: the best-scored of all the family's answers is the
true one more often than chance (`clients.evaluation`, top-1).

Architecture k is the default of client k (`models.DEFAULT_ARCHS`), whose annotations
come mostly from family k (`data.default_clients`): each is trained on that client's
annotations and evaluated on the held-out questions of that family. The full check
(PRV, all three architectures) is slow; the always-on variant trains the fastest
architecture with the RDP accountant, whose calibration takes well under a second,
and checks that the per-architecture defaults are applied."""

from __future__ import annotations

import math

import pytest
import torch

from secure_mor.clients.evaluation import evaluate_model
from secure_mor.clients.models import ARCHITECTURES, DEFAULT_ARCHS, architecture
from secure_mor.clients.training import (
    ARCH_TRAIN_DEFAULTS,
    GRAD_SAMPLE_MODES,
    PrivacyState,
    TrainConfig,
    default_train_config,
    encode_annotations,
    public_warm_start_config,
    train_reward_model,
)
from secure_mor.data import SplitConfig, build_federated_data, public_annotations
from secure_mor.ledger import Budget

torch.set_num_threads(1)


def above_chance(chance: float, n: int, z: float = 3.0) -> float:
    """Top-1 accuracy that a model at `chance` exceeds on n held-out questions with probability
    about 0.1% (one-sided, normal approximation of the binomial)."""
    return chance + z * math.sqrt(chance * (1 - chance) / n)


# What an image-blind model can reach on the held-out presence questions: most ask about an attribute
# that is absent, so "no" to "is there X?" and "yes" to "is there not X?" is right 76.5 % of the time
# here. The presence model must beat that prior by comparing the image with the question (until session
# 14 its head did not: top-1 0.725, image dependence 0.07 at seed 0).
PRESENCE_QUESTION_PRIOR = 0.765


@pytest.fixture(scope="module")
def data():
    return build_federated_data(SplitConfig(eval_per_family=200))  # default split: 800 annotations per client


def texts_of(annotations) -> list[str]:
    return [*annotations["question"], *annotations["chosen_text"],
            *(t for texts in annotations["rejected_texts"] for t in texts)]


def _own_family_top1(data, arch_name: str, config: TrainConfig) -> tuple[float, float, float, float]:
    """Train `arch_name` as the client it is the default of trains it (public warm start, then DP-SGD on
    its annotations); its held-out top-1 on that client's family (rewards clipped as released), the
    chance level there, the run's epsilon and the family's image dependence."""
    client = DEFAULT_ARCHS.index(arch_name)
    arch = architecture(arch_name)
    annotations = data.clients[client]
    family, style = data.config.clients[client].family, data.config.clients[client].style
    public = public_annotations(data, style, family, seed=config.seed)
    encoder = arch.build_encoder(texts_of(annotations) + texts_of(public))
    torch.manual_seed(config.seed)
    model = arch.build_model(encoder)
    warm = public_warm_start_config(arch_name, config.seed)
    train_reward_model(model, encode_annotations(public, encoder), warm, PrivacyState(Budget(math.inf, 1e-5)))
    result = train_reward_model(model, encode_annotations(annotations, encoder), config,
                                PrivacyState(Budget(8.0, 1e-5)))
    measures = evaluate_model(model, encoder, data, style, clip=5.0)
    return measures["top1"][family], 1 / len(data.answers[family]), result.epsilon, measures["image_dependence"][family]


def test_default_train_config_applies_the_architecture_defaults(monkeypatch):
    assert set(ARCH_TRAIN_DEFAULTS) == set(ARCHITECTURES)
    tuned = {"epochs", "batch_size", "lr", "max_grad_norm", "grad_sample_mode"}
    for arch, defaults in ARCH_TRAIN_DEFAULTS.items():
        assert set(defaults) == tuned, arch  # every architecture states its own values
        config = default_train_config(arch, 4.0)
        assert config.epsilon == 4.0 and all(getattr(config, k) == v for k, v in defaults.items())
        # None means "the default"; a given value wins.
        assert default_train_config(arch, 4.0, epochs=None, lr=None) == config
        assert default_train_config(arch, 1.0, epochs=3).epochs == 3
    # An architecture's own value is what it gets, not another's or the generic one.
    monkeypatch.setitem(ARCH_TRAIN_DEFAULTS, "vit-xattn", {**ARCH_TRAIN_DEFAULTS["vit-xattn"], "epochs": 7})
    assert default_train_config("vit-xattn", 4.0).epochs == 7
    assert default_train_config("cnn-gru", 4.0).epochs == ARCH_TRAIN_DEFAULTS["cnn-gru"]["epochs"]
    with pytest.raises(ValueError, match="no training defaults"):
        default_train_config("no-such-arch", 4.0)
    with pytest.raises(TypeError, match="unknown training option"):
        default_train_config("cnn-gru", 4.0, learning_rate=0.1)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_poisson_batch_still_takes_a_noisy_step(data, mode):
    """Expected batch 1 of 64 annotations: about a third of the 64 steps draw none.
    Every mode must run them (expanded weights cannot run a forward pass on zero rows)."""
    arch = architecture("cnn-gru")
    annotations = data.clients[0].select(range(64))
    encoder = arch.build_encoder(texts_of(annotations))
    torch.manual_seed(0)
    model = arch.build_model(encoder)
    config = TrainConfig(epsilon=4.0, epochs=1, batch_size=1, accountant="rdp", grad_sample_mode=mode)
    result = train_reward_model(model, encode_annotations(annotations, encoder), config,
                                PrivacyState(Budget(8.0, 1e-5)))
    assert result.steps == 64 and all(torch.isfinite(p).all() for p in model.parameters())


def test_frozen_feature_head_answers_presence_from_the_image_at_epsilon_4(data):
    """The issue's target (presence >= 0.75), above the question prior, and image-grounded: its best answer
    changes with the image (an image-blind model: never)."""
    config = default_train_config("minilm-head", 4.0, accountant="rdp")
    top1, _, epsilon, dependence = _own_family_top1(data, "minilm-head", config)
    assert epsilon <= 4.0 + 0.01
    assert top1 >= max(0.75, PRESENCE_QUESTION_PRIOR + 0.03) and dependence >= 0.1, (top1, dependence)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "target"), [("cnn-gru", 0.5), ("vit-xattn", 0.55)])
def test_image_models_rank_their_familys_answers_at_epsilon_4(data, arch, target):
    """The issue's targets (colour >= 0.5, shape >= 0.55; measured at seed 0: 0.97, 0.755), and above
    chance by three standard errors."""
    top1, chance, epsilon, _ = _own_family_top1(data, arch, default_train_config(arch, 4.0))
    assert epsilon <= 4.0 + 0.01 and math.isfinite(epsilon)
    assert top1 >= max(target, above_chance(chance, 200))

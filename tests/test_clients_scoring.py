"""Scoring: batched, deterministic, clipped, float32; non-finite rewards never leave
the client; scoring spends nothing and writes nothing but a cache of text features."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from secure_mor.clients.client import ClientConfig, RewardClient, train_client
from secure_mor.clients.models import ARCHITECTURES, BilinearHead
from secure_mor.clients.scoring import ScoringError
from secure_mor.clients.text import encoder_from_json, trim_padding
from secure_mor.clients.training import TrainConfig, encode_annotations
from secure_mor.data import SplitConfig, build_federated_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return build_federated_data(SplitConfig(pairs_per_client=64, eval_per_family=10, calibration_pairs=30))


def _client(tmp_path, data, arch: str, clip: float = 5.0) -> RewardClient:
    config = ClientConfig(client_id=1, arch=arch, family="shape", style="sentence", reward_clip=clip)
    torch.manual_seed(0)
    client = RewardClient.new(tmp_path, config, data.clients[1])
    for module in client.model.modules():  # the heads start at zero: give them some output
        if isinstance(module, BilinearHead):
            torch.nn.init.normal_(module.bilinear.weight, std=0.02)
    return client


def _items(data, n: int = 12):
    rows = data.evaluation.select(range(n))
    return [(row["image"], row["question"], row["answer"]) for row in rows]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_scores_are_deterministic_clipped_float32(tmp_path, data, arch):
    client = _client(tmp_path, data, arch)
    items = _items(data)
    scores = client.score(items)
    assert scores.dtype == np.float32 and scores.shape == (len(items),)
    assert np.array_equal(scores, client.score(items))
    np.testing.assert_allclose(client.score(items[:5]), scores[:5], atol=1e-5)  # batch-independent
    assert np.all(np.abs(scores) <= 5.0) and np.unique(scores).size > 1
    tight = _client(tmp_path, data, arch, clip=1e-3)
    assert np.all(np.abs(tight.score(items)) <= 1e-3)
    assert client.score([]).shape == (0,)


def test_images_may_be_arrays_of_any_size(tmp_path, data):
    client = _client(tmp_path, data, "cnn-gru")
    image, question, answer = _items(data, 1)[0]
    small = np.asarray(image.resize((32, 32)))
    assert client.score([(small, question, answer)]).shape == (1,)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_rewards_raise(tmp_path, data, bad):
    client = _client(tmp_path, data, "minilm-head")
    with torch.no_grad():
        next(client.model.parameters()).fill_(bad)
    with pytest.raises(ScoringError, match="non-finite"):
        client.score(_items(data))


def test_malformed_items_raise(tmp_path, data):
    client = _client(tmp_path, data, "cnn-gru")
    with pytest.raises(ScoringError, match="triple"):
        client.score([("not", "a triple")])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_trimmed_padding_and_reloaded_encoder_give_the_same_rewards(tmp_path, data, arch):
    client = _client(tmp_path, data, arch)
    rows = encode_annotations(data.clients[1].select(range(6)), client.encoder)
    image, question, answers, _ = rows.tensors
    client.model.eval()
    with torch.no_grad():
        full = client.model(image, question, answers)
        trimmed = client.model(image, trim_padding(question), trim_padding(answers))
    torch.testing.assert_close(full, trimmed, rtol=1e-4, atol=1e-5)
    reloaded = encoder_from_json(client.encoder.to_json())
    texts = list(data.clients[1]["chosen_text"][:6]) + ["an unseen text"]
    assert torch.equal(reloaded.encode(texts), client.encoder.encode(texts))


def test_a_saved_client_scores_the_same_and_scoring_writes_nothing(tmp_path, data):
    config = ClientConfig(client_id=0, arch="cnn-gru", family="color", style="word")
    trained, _ = train_client(
        tmp_path, config, data.clients[0], TrainConfig(epsilon=2.0, epochs=1, batch_size=16, accountant="rdp")
    )
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    items = _items(data)
    loaded = RewardClient.load(tmp_path, 0)
    np.testing.assert_array_equal(loaded.score(items), trained.score(items))
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == before  # no ledger entry, no spend


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_candidates_reward_does_not_depend_on_the_other_candidates(tmp_path, data, arch):
    """Training scores all of an annotation's candidates in one forward pass: no reward may
    see another candidate (a model that could would learn the candidates' order)."""
    client = _client(tmp_path, data, arch)
    with torch.no_grad():
        for param in client.model.parameters():
            param.add_(0.3 * torch.randn_like(param))  # away from the zero start, where little depends on anything
    image, question, answers, _ = encode_annotations(data.clients[1].select(range(8)), client.encoder).tensors
    question, answers = trim_padding(question), trim_padding(answers)
    with torch.no_grad():
        joint = client.model(image, question, answers)
        alone = torch.cat([client.model(image, question, answers[:, i : i + 1]) for i in range(answers.shape[1])],
                          dim=1)
    assert joint.std() > 0
    torch.testing.assert_close(joint, alone, rtol=1e-5, atol=1e-5)


def test_minilm_features_kept_on_disk_score_the_same_without_loading_minilm(tmp_path, data, monkeypatch):
    """A deployment scores in a fresh process per message: MiniLM's features of texts seen before
    come from the client's disk, and scoring then writes nothing but that cache."""
    config = ClientConfig(client_id=2, arch="minilm-head", family="presence", style="word")
    trained, _ = train_client(
        tmp_path, config, data.clients[2], TrainConfig(epsilon=2.0, epochs=1, batch_size=16, accountant="rdp")
    )
    items = _items(data)
    first = RewardClient.load(tmp_path, 2).score(items)
    np.testing.assert_array_equal(first, trained.score(items))
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert [p.name for p in files if p.name.startswith("minilm-features")] == ["minilm-features-64-128.npz"]

    from secure_mor.clients import text

    def no_minilm():
        raise AssertionError("MiniLM loaded although every text was on disk")

    monkeypatch.setattr(text, "_minilm", no_minilm)
    np.testing.assert_array_equal(RewardClient.load(tmp_path, 2).score(items), first)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    with pytest.raises(AssertionError, match="MiniLM loaded"):
        RewardClient.load(tmp_path, 2).score([(items[0][0], items[0][1], "a text no one scored before")])

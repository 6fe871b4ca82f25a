"""Shared fixtures. Nothing in the suite may reach a model hub."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two BLAS threads on a shared 2-core machine slow small linear algebra down tenfold.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Passphrases the nodes store (the key authority's, in a simulation) go to a directory of this session.
_SECRETS = tempfile.TemporaryDirectory(prefix="secure-mor-secrets-")
os.environ.setdefault("SECURE_MOR_SECRETS_DIR", _SECRETS.name)

import pytest  # noqa: E402
import torch  # noqa: E402

from secure_mor.data import FederatedData, SplitConfig, build_federated_data, vocabulary_texts  # noqa: E402
from secure_mor.policy import SFTSettings, run_sft  # noqa: E402
from secure_mor.vlm import build_tiny_vlm, save_policy  # noqa: E402


@pytest.fixture(scope="session")
def federated() -> FederatedData:
    """The default federated split of easy-VQA (seed 0)."""
    return build_federated_data(SplitConfig())


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, federated):
    """The untrained tiny VLM, saved."""
    model, processor = build_tiny_vlm(vocabulary_texts(federated))
    return save_policy(model, processor, tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture(scope="session")
def warm_policy(tmp_path_factory, federated):
    """A very short SFT warm start: it answers in words, greedily "no" to every question."""
    torch.set_num_threads(1)
    model, processor = build_tiny_vlm(vocabulary_texts(federated))
    root = tmp_path_factory.mktemp("warm")
    settings = SFTSettings(examples=960, epochs=1.0, learning_rate=2e-3, vision_epochs=0, sentence_rate=0.0)
    run_sft(model, processor, federated.sft, settings, root)
    return save_policy(model, processor, root / "policy")

"""Shared fixtures. Nothing in the suite may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two BLAS threads on a shared 2-core machine slow small linear algebra down tenfold.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from secure_mor.data import FederatedData, SplitConfig, build_federated_data  # noqa: E402


@pytest.fixture(scope="session")
def federated() -> FederatedData:
    """The default federated split of easy-VQA (seed 0)."""
    return build_federated_data(SplitConfig())

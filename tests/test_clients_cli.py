"""`secure-mor client train / eval` end to end on a tiny split."""

from __future__ import annotations

import json
from dataclasses import asdict

import torch
from typer.testing import CliRunner

from secure_mor.audits.verify import verify_ledger
from secure_mor.clients.cli import client_app
from secure_mor.clients.training import ARCH_TRAIN_DEFAULTS, default_train_config
from secure_mor.crypto.signing import read_registry

torch.set_num_threads(1)
TINY = ["--pairs-per-client", "64", "--epochs", "2", "--batch-size", "16", "--accountant", "rdp",
        "--public-epochs", "1"]


def test_train_then_eval_writes_the_run_directory(tmp_path):
    runner = CliRunner()
    out = str(tmp_path)
    budget = ["--budget-epsilon", "2.5"]
    first = runner.invoke(
        client_app, ["train", "--client", "2", "--arch", "minilm-head", "--epsilon", "2", *budget, "--out", out, *TINY]
    )
    assert first.exit_code == 0, first.output
    assert "total" in first.output
    directory = tmp_path / "clients" / "client-2"
    for name in ["client.json", "model.safetensors", "text_encoder.json", "privacy.json", "metrics.json"]:
        assert (directory / name).exists(), name
    assert (directory / "keys" / "client-2.key").exists()
    assert set(read_registry(tmp_path / "keys")) == {"client-2"}
    assert json.loads((directory / "client.json").read_text())["split"]["pairs_per_client"] == 64

    # The stored budget (2.5) and split are reused; 2 more composes to ~2.7: refused.
    refused = runner.invoke(client_app, ["train", "--client", "2", "--epsilon", "2", "--out", out, *TINY])
    assert refused.exit_code == 2, refused.output
    assert "refused" in refused.output
    assert verify_ledger(tmp_path / "ledger.jsonl", read_registry(tmp_path / "keys")).ok

    evaluated = runner.invoke(client_app, ["eval", "--out", out], env={"COLUMNS": "200"})  # one table row per line
    assert evaluated.exit_code == 0, evaluated.output
    assert "client-2 (minilm-head)" in evaluated.output and "presence" in evaluated.output
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics["evaluation"]) == {"top1", "image_dependence", "pairwise"}
    assert all(set(v) == {"color", "shape", "presence"} and all(0 <= x <= 1 for x in v.values())
               for v in metrics["evaluation"].values())
    assert len(metrics["runs"]) == 1 and metrics["runs"][0]["noise_multiplier"] > 0
    # a new client warm-starts on the public questions first, as a client node does
    assert metrics["public_warm_start"]["epochs"] == 1 and metrics["public_warm_start"]["annotations"] > 0


def test_train_options_left_out_take_the_architecture_defaults(tmp_path, monkeypatch):
    # A distinctive per-architecture value, so that the generic default cannot pass for it.
    vit = {**ARCH_TRAIN_DEFAULTS["vit-xattn"], "batch_size": 24, "lr": 0.02}
    monkeypatch.setitem(ARCH_TRAIN_DEFAULTS, "vit-xattn", vit)
    out = str(tmp_path)
    small = ["--pairs-per-client", "48", "--epochs", "1", "--accountant", "rdp", "--public-epochs", "0"]
    result = CliRunner().invoke(client_app, ["train", "--client", "1", "--out", out, *small])  # client 1: vit-xattn
    assert result.exit_code == 0, result.output
    expected = default_train_config("vit-xattn", 4.0, epochs=1, accountant="rdp")
    assert expected.batch_size == 24 and expected.lr == 0.02 and expected.grad_sample_mode == vit["grad_sample_mode"]
    assert "batch 24, lr 0.02," in result.output
    metrics = json.loads((tmp_path / "clients" / "client-1" / "metrics.json").read_text())
    assert metrics["runs"][0]["config"] == asdict(expected)
    assert metrics["runs"][0]["steps"] == 2  # 48 pairs, expected batch 24
    assert "public_warm_start" not in metrics  # --public-epochs 0: none

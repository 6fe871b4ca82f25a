"""The main job end to end through Flower's simulation runtime, at tiny size (default suite): the
`secure-mor align` command with a user's VLM (`--model`: LLaVA with SigLIP and Qwen2, not built by
secure_mor.vlm) and a user's dataset (`--dataset`: three question families of its own). The deployment
tests run the same job on easy-VQA with the tiny LLaVA built here."""

import json

import psutil
import pytest
from conftest import OWN_FAMILIES
from typer.testing import CliRunner

from secure_mor.audits.verify import verify_ledger
from secure_mor.cli import app
from secure_mor.crypto.signing import read_registry
from secure_mor.deployment import TINY_RUN
from secure_mor.server.pipeline import AlignConfig, AlignError, align
from secure_mor.server.transport import LocalTransport

FLOWER_OR_RAY = ("flower-superlink", "flower-superexec", "flwr-", "raylet", "gcs_server", "ray::")


def _flower_and_ray_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(marker in cmdline for marker in FLOWER_OR_RAY):
            found.add(process.info["pid"])
    return found


def test_align_with_a_users_vlm_and_dataset_runs_end_to_end_on_flower_and_leaves_no_process(
        tmp_path, siglip_qwen2_policy, own_families_dataset):
    before = _flower_and_ray_processes()
    tiny = [f"--config={key}={value}" for key, value in TINY_RUN.items()]
    command = ["align", "--out", str(tmp_path), "--model", str(siglip_qwen2_policy), "--dataset",
               str(own_families_dataset), "--timeout", "900", *tiny]
    outcome = CliRunner().invoke(app, command)
    assert outcome.exit_code == 0, outcome.output
    assert "held-out accuracy: SFT vs aligned" in outcome.output
    assert _flower_and_ray_processes() <= before

    results = json.loads((tmp_path / "align" / "mor" / "results.json").read_text())
    assert results["schema"] == "secure-mor/results/v2" and results["config"]["fusion"] == "mor"
    assert (results["config"]["model"], results["config"]["dataset"]) == (str(siglip_qwen2_policy),
                                                                           str(own_families_dataset))
    policy = json.loads((tmp_path / "align" / "mor" / "policy" / "config.json").read_text())
    assert (policy["text_config"]["model_type"], policy["vision_config"]["model_type"]) == (
        "qwen2", "siglip_vision_model")
    assert results["grpo"]["steps"] == 2 and results["router"]["steps"] == 2
    # a round releases only where a completion holds an answer: this random VLM after 64 SFT examples answers
    # nothing (measured: it ends every answer at once), so its GRPO rounds release nothing; the answer prior does
    assert results["answer_prior"]["released"] > 0 and results["grpo"]["rounds"] >= 1
    # the dataset's own families: one specialist client each, evaluated, routed and measured per family
    assert [results["clients"][f"client-{k}"]["family"] for k in range(3)] == list(OWN_FAMILIES)
    assert all(set(c["reward_model"]["top1"]) == set(OWN_FAMILIES) for c in results["clients"].values())
    assert list(results["accuracy"]["aligned"]["per_family"]) == list(OWN_FAMILIES)
    assert list(results["router"]["held_out_weights"]["correctness"]) == list(OWN_FAMILIES)
    assert {c["arch"] for c in results["clients"].values()} == {"cnn-gru", "vit-xattn", "minilm-head"}
    assert all(0 < c["total_epsilon"] <= 4.0 for c in results["clients"].values())
    # the key authority ran on its own node: its keys and release state are under authority/
    assert (tmp_path / "authority" / "secret.key").exists() and (tmp_path / "authority" / "released.jsonl").exists()
    check = verify_ledger(tmp_path / "ledger.jsonl", read_registry(tmp_path / "keys"), results["ledger"]["head"])
    # 3 DP trainings, the router's setup, a margin and a gradient release per router step, one release per round
    assert check.ok and check.entries == 3 + 1 + 2 * 2 + results["grpo"]["rounds"], check

    # the run directory keeps its VLM and its dataset
    for other, said in ((AlignConfig(fusion="uniform", dataset=str(own_families_dataset)), "holds a run of the VLM"),
                        (AlignConfig(fusion="uniform", model=str(siglip_qwen2_policy), dataset="/data/other"),
                         "holds a run on dataset")):
        with pytest.raises(AlignError, match=said):
            align(LocalTransport({}), tmp_path, other, log=lambda m: None)

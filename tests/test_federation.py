"""The main job end to end through Flower's simulation runtime, at tiny size (default suite)."""

import json

import psutil

from secure_mor.audits.ledger import verify_ledger
from secure_mor.crypto.signing import read_registry
from secure_mor.deployment import TINY_RUN
from secure_mor.federation import run_local_simulation

FLOWER_OR_RAY = ("flower-superlink", "flower-superexec", "flwr-", "raylet", "gcs_server", "ray::")

TINY = {**TINY_RUN, "num-clients": 3}  # the deployment tests run the same tiny job


def _flower_and_ray_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(marker in cmdline for marker in FLOWER_OR_RAY):
            found.add(process.info["pid"])
    return found


def test_secure_alignment_runs_end_to_end_on_flower_and_leaves_no_process(tmp_path):
    before = _flower_and_ray_processes()
    result = run_local_simulation({**TINY, "run-dir": str(tmp_path)}, num_supernodes=4, timeout=900)
    assert result.status == "finished:completed"
    assert _flower_and_ray_processes() <= before

    results = json.loads((tmp_path / "align" / "mor" / "results.json").read_text())
    assert results["schema"] == "secure-mor/results/v2" and results["config"]["fusion"] == "mor"
    assert results["grpo"]["steps"] == 2 and results["router"]["steps"] == 2
    assert results["grpo"]["rounds"] == 2 + 2 and results["answer_prior"]["released"] > 0  # GRPO, answer prior
    assert {c["arch"] for c in results["clients"].values()} == {"cnn-gru", "vit-xattn", "minilm-head"}
    assert all(0 < c["total_epsilon"] <= 4.0 for c in results["clients"].values())
    # the key authority ran on its own node: its keys and release state are under authority/
    assert (tmp_path / "authority" / "secret.key").exists() and (tmp_path / "authority" / "released.jsonl").exists()
    check = verify_ledger(tmp_path / "ledger.jsonl", read_registry(tmp_path / "keys"), results["ledger"]["head"])
    # 3 DP trainings, the router's setup, a margin and a gradient release per router step, one release per round
    assert check.ok and check.entries == 3 + 1 + 2 * 2 + 2 + 2, check

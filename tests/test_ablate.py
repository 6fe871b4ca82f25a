"""`secure-mor ablate` on a tiny grid: the CSV, the plots, the empirical audits, and resuming."""

import csv
import json
import math

from PIL import Image

from secure_mor.experiments.ablate import AblationGrid, run_ablation
from secure_mor.policy import SFTSettings
from secure_mor.protocol import ClientTrainingSettings
from secure_mor.server.grpo import GRPOSettings
from secure_mor.server.router_training import RouterTrainingConfig

TINY = {
    "grpo": GRPOSettings(max_steps=1, batch_size=8, steps_per_generation=1, save_steps=0, max_completion_length=4),
    "router": RouterTrainingConfig(steps=1, batch_size=96),
    "sft": SFTSettings(examples=32, epochs=1.0, vision_epochs=1),
    "client_training": ClientTrainingSettings(epochs=1, public_epochs=1),
    "eval_per_family": 4,
    "pairs_per_client": 60,
    "calibration_pairs": 150,
    "answer_prior_questions": 3,
    "validation_per_family": 4,
}
TINY_AUDIT = {"canaries": 20, "guesses": (10,)}


def test_tiny_ablation_writes_csv_and_plots_and_resumes(tmp_path):
    grid = AblationGrid(epsilons=(math.inf, 4.0), fusions=("mor",), seeds=(0,))  # one fusion: the grid's shape
    calls = []
    path = run_ablation(
        tmp_path, grid, TINY, workers=1, on_cell=lambda done, total: calls.append((done, total)), audit=TINY_AUDIT
    )
    rows = list(csv.DictReader(open(path)))
    cells = {(r["epsilon"], r["fusion"]) for r in rows}
    # the SFT start and the oracle spend no client budget: one row per seed, epsilon "-"
    assert cells == {("inf", "mor"), ("4.0", "mor"), ("-", "sft"), ("-", "oracle")}
    assert calls[-1] == (2, 2)
    for row in rows:
        assert 0.0 <= float(row["overall"]) <= 1.0
        if row["epsilon"] == "-":
            continue
        spent = [row[f"client-{k}_epsilon"] for k in range(3)]
        assert spent == ["inf"] * 3 if row["epsilon"] == "inf" else all(0 < float(e) <= 4.0 for e in spent)
        assert all(0.0 <= float(row[f"client-{k}_top1_own"]) <= 1.0 for k in range(3))
        # every row carries its (seed, epsilon)'s audit, whose claim is the cell's epsilon
        assert row["audit_canaries"] == "20" and 0 <= int(row["audit_correct"]) <= int(row["audit_guesses"]) == 10
        claimed = row["audit_epsilon_claimed"]
        assert claimed == "inf" if row["epsilon"] == "inf" else abs(float(claimed) - 4.0) < 0.05
        assert float(row["audit_epsilon_lower_bound"]) >= 0.0
    assert "| mor | 4.0 | 1 |" in (tmp_path / "summary.md").read_text()
    for eps in ("inf", "4"):
        report = json.loads((tmp_path / f"seed-0/eps-{eps}/audits/empirical-cnn-gru-eps{eps}-seed0.json").read_text())
        assert report["schema"] == "secure-mor/empirical-audit/v1" and report["pairs"] == TINY["pairs_per_client"]
    plots = ("policy_accuracy.png", "style.png", "reward_models.png", "router_weights.png", "empirical_epsilon.png")
    for name in plots:
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 400 and len(image.convert("L").getcolors(2**16)) > 10  # a real drawing

    # resume: every cell is finished, so nothing is trained again and the CSV is identical
    done = [*tmp_path.glob("seed-0/*/align/*/results.json"), *tmp_path.glob("seed-0/eps-*/audits/*.json")]
    stamp = {p: p.stat().st_mtime for p in done}
    assert len(stamp) == 8  # 2 epsilons x (1 fusion x 2 objectives + 1 audit) + the oracle per objective
    assert run_ablation(tmp_path, grid, TINY, workers=1, audit=TINY_AUDIT).read_text() == path.read_text()
    assert {p: p.stat().st_mtime for p in stamp} == stamp
    # a later invocation over part of the grid keeps every finished cell of OUT in its outputs
    part = AblationGrid(epsilons=(4.0,), fusions=("mor",), objectives=("correctness",), seeds=(0,))
    assert run_ablation(tmp_path, part, TINY, workers=1).read_text() == path.read_text()


def test_summary_pairs_each_fusion_with_the_sft_start_of_its_seed():
    from secure_mor.experiments.ablate import summary

    def row(seed, fusion, overall, color, shape, presence):
        return {"seed": seed, "epsilon": "4.0" if fusion != "sft" else "-", "objective": "correctness",
                "fusion": fusion, "overall": overall, "color": color, "shape": shape, "presence": presence,
                "sentences": 0.0}

    rows = [row(0, "sft", 0.6, 0.9, 0.5, 0.4), row(1, "sft", 0.7, 0.9, 0.6, 0.6),
            row(0, "mor", 0.7, 0.9, 0.45, 0.75), row(1, "mor", 0.8, 1.0, 0.6, 0.8)]
    table = {line.split(" | ")[0].strip("| "): line for line in summary(rows).splitlines() if line.startswith("| ")}
    cells = [c.strip() for c in table["mor"].strip("|").split("|")]
    assert cells[3] == "0.750 ± 0.071"  # overall, unpaired
    assert cells[-2] == "0.100 ± 0.000"  # lift over SFT, paired by seed: +0.1 both times
    assert cells[-1] == "-0.025 ± 0.035"  # the worst family change per seed: shape -0.05, then 0.0
    assert [c.strip() for c in table["sft"].strip("|").split("|")][-2:] == ["", ""]

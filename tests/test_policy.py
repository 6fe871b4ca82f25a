import torch
from datasets import Dataset

from secure_mor.data import vocabulary_texts
from secure_mor.policy import (
    SFTSettings,
    accuracy_report,
    evaluate_policy,
    extract_answer,
    image_attributes,
    is_sentence,
    run_sft,
    sft_dataset,
)
from secure_mor.vlm import build_tiny_vlm

ANSWERS = {"color": ["blue", "red"], "shape": ["circle", "triangle"], "presence": ["no", "yes"]}


def test_answer_extraction_is_style_independent_and_family_aware():
    assert extract_answer("red", "color", ANSWERS) == "red"
    assert extract_answer("The color is red.", "color", ANSWERS) == "red"
    assert extract_answer("The circle is red", "color", ANSWERS) == "red"
    assert extract_answer("Yes, it is.", "presence", ANSWERS) == "yes"
    assert extract_answer("circle", "color", ANSWERS) == ""
    shades = {"shade": ["blue", "light blue", "Dark-Blue"]}
    assert extract_answer("It is light blue.", "shade", shades) == "light blue"
    assert extract_answer("dark blue", "shade", shades) == "dark blue"
    assert extract_answer("blue light", "shade", shades) == "blue"


def test_accuracy_report_counts_per_family(federated):
    rows = federated.evaluation.select(range(0, 600, 50))
    perfect = accuracy_report(list(rows["answer"]), rows, federated.answers)
    assert perfect["overall"]["accuracy"] == perfect["overall"]["exact_match"] == 1.0
    wrong = accuracy_report(["?"] * len(rows), rows, federated.answers)
    assert wrong["overall"]["accuracy"] == 0.0
    assert sum(s["n"] for s in perfect["per_family"].values()) == len(rows)


def test_short_sft_raises_held_out_accuracy_above_the_untrained_model(tmp_path, federated):
    model, processor = build_tiny_vlm(vocabulary_texts(federated))
    held_out = federated.evaluation.shuffle(seed=0).select(range(150))
    before = evaluate_policy(model, processor, held_out, federated.answers)["overall"]["accuracy"]
    settings = SFTSettings(examples=960, epochs=1.0, learning_rate=2e-3, vision_epochs=0, sentence_rate=0.0)
    log = run_sft(model, processor, federated.sft, settings, tmp_path)
    after = evaluate_policy(model, processor, held_out, federated.answers)["overall"]["accuracy"]
    assert log["history"][-1]["train_loss"] < log["history"][0]["loss"]
    assert after > before + 0.1, (before, after)
    assert (tmp_path / "sft_log.json").exists()


def test_the_vision_warm_up_trains_the_tower_and_sft_keeps_it(tmp_path, federated):
    images, targets, names = image_attributes(federated.sft)
    assert set(names) == {a for v in federated.answers.values() for a in v} - {"yes", "no"}
    assert len(images) == len(targets) and targets.sum(1).min() >= 1  # every image has an open answer
    model, processor = build_tiny_vlm(vocabulary_texts(federated))
    tower = model.model.vision_tower
    before = [p.detach().clone() for p in tower.parameters()]
    settings = SFTSettings(examples=96, epochs=1.0, vision_epochs=3, sentence_rate=0.5)
    log = run_sft(model, processor, federated.sft, settings, tmp_path)
    assert len(log["vision"]) == 3 and log["vision"][-1] < log["vision"][0]
    warmed = [p.detach().clone() for p in tower.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, warmed, strict=True))
    # SFT trained the rest of the policy with the tower frozen: it is as the warm-up left it
    settings = SFTSettings(examples=96, epochs=1.0, vision_epochs=0)
    run_sft(model, processor, federated.sft, settings, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(warmed, tower.parameters(), strict=True))


def test_sft_writes_a_share_of_sentences():
    rows = Dataset.from_dict({"image": [None] * 400, "question": ["what color is it?"] * 400, "answer": ["red"] * 400,
                              "family": ["color"] * 400})
    completions = [c[0]["content"][0]["text"] for c in sft_dataset(rows, sentence_rate=0.25)["completion"]]
    assert set(completions) == {"red", "The color is red."}
    assert abs(sum(map(is_sentence, completions)) / 400 - 0.25) < 0.07

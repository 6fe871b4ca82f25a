from secure_mor.data import vocabulary_texts
from secure_mor.policy import SFTSettings, accuracy_report, evaluate_policy, extract_answer, run_sft
from secure_mor.vlm import build_tiny_vlm

ANSWERS = {"color": ["blue", "red"], "shape": ["circle", "triangle"], "presence": ["no", "yes"]}


def test_answer_extraction_is_style_independent_and_family_aware():
    assert extract_answer("red", "what color is the shape?", ANSWERS) == "red"
    assert extract_answer("The color is red.", "what color is the shape?", ANSWERS) == "red"
    assert extract_answer("The circle is red", "what color is the circle?", ANSWERS) == "red"
    assert extract_answer("Yes, it is.", "is there a circle?", ANSWERS) == "yes"
    assert extract_answer("circle", "what color is the shape?", ANSWERS) == ""


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
    log = run_sft(model, processor, federated.sft, SFTSettings(examples=960, epochs=1.0, learning_rate=2e-3), tmp_path)
    after = evaluate_policy(model, processor, held_out, federated.answers)["overall"]["accuracy"]
    assert log["history"][-1]["train_loss"] < log["history"][0]["loss"]
    assert after > before + 0.1, (before, after)
    assert (tmp_path / "sft_log.json").exists()

"""GRPO on the tiny policy (server/grpo.py) with a plaintext, test-only reward."""

import json
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from secure_mor.data import normalize_text, user_prompt
from secure_mor.policy import generate_answers
from secure_mor.server.grpo import (
    LOG_FILE,
    GRPOSettings,
    answer_loss,
    build_grpo_trainer,
    grpo_prompt_dataset,
    run_grpo,
    step_metrics,
)
from secure_mor.vlm import load_policy

REWARD_KWARGS = {
    "completion_ids",
    "image",
    "question",
    "family",
    "image_id",
    "trainer_state",
    "log_extra",
    "log_metric",
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other jobs
    yield
    torch.set_num_threads(threads)


class SaysYes:
    """Test-only plaintext reward: 1 for the exact answer "yes" to a yes/no question, else 0.

    Records every call so the test can check what TRL hands a reward function.
    """

    def __init__(self):
        self.calls = []
        self.steps = []

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append({"prompts": prompts, "completions": completions, **kwargs})
        self.steps.append(kwargs["trainer_state"].global_step)  # the state object is live: read it now
        return [
            1.0 if family == "presence" and normalize_text(completion[0]["content"]) == "yes" else 0.0
            for completion, family in zip(completions, kwargs["family"], strict=True)
        ]


def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def test_settings_check_the_batch_geometry():
    settings = GRPOSettings(num_generations=4, batch_size=16, steps_per_generation=2, save_steps=10)
    assert (settings.generation_batch_size, settings.prompts_per_round, settings.steps_per_round) == (32, 8, 2)
    assert GRPOSettings().beta > 0
    with pytest.raises(ValueError, match="num_generations"):
        GRPOSettings(num_generations=1)
    with pytest.raises(ValueError, match="whole groups"):
        GRPOSettings(num_generations=3, batch_size=4, steps_per_generation=1)
    with pytest.raises(ValueError, match="round boundary"):
        GRPOSettings(steps_per_generation=4, save_steps=6)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOSettings(loss_type="ppo")
    with pytest.raises(ValueError, match="temperature"):
        GRPOSettings(temperature=0.0)


def test_prompt_dataset_is_conversational_with_one_image_and_passthrough_columns(federated):
    rows = federated.prompt_pool.select(range(5))
    dataset = grpo_prompt_dataset(rows)
    assert dataset.column_names == ["prompt", "image", "question", "family", "image_id"]
    assert "answer" not in dataset.column_names
    example = dataset[0]
    assert example["prompt"][0]["role"] == "user"
    assert [part["type"] for part in example["prompt"][0]["content"]] == ["image", "text"]
    assert example["prompt"][0]["content"][1]["text"] == rows[0]["question"]
    assert isinstance(example["image"], Image.Image)
    assert (example["family"], example["image_id"]) == (rows[0]["family"], rows[0]["image_id"])


def test_trainer_samples_stops_at_eos_and_expands_the_image_tokens(tmp_path, tiny_policy, federated):
    settings = GRPOSettings(batch_size=8, steps_per_generation=2, max_steps=2, save_steps=0, temperature=0.9)
    trainer = build_grpo_trainer(tiny_policy, federated.prompt_pool.select(range(8)), length_reward, settings, tmp_path)
    processor = trainer.processing_class
    tokenizer = processor.tokenizer
    generation = trainer.generation_config
    assert generation.do_sample and generation.temperature == 0.9
    assert generation.max_new_tokens == settings.max_completion_length
    assert tokenizer.eos_token_id in trainer.eos_token_ids and generation.eos_token_id == trainer.eos_token_ids
    assert generation.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert trainer.model.config.image_token_id in generation.suppress_tokens
    assert tokenizer.padding_side == "left"
    assert trainer.ref_model is not None  # beta > 0: the frozen reference was rebuilt from the path
    assert (trainer.args.generation_batch_size, trainer.args.steps_per_generation) == (16, 2)
    # The prompt as TRL tokenises it for generation: the processor expands <image> to one token per patch.
    prompt = prepare_multimodal_messages(user_prompt("is there a circle?"), images=[Image.new("RGB", (64, 64))])
    tokenized = processor.apply_chat_template(
        conversation=[prompt], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    image_tokens = sum(token == trainer.model.config.image_token_id for token in tokenized["input_ids"][0])
    assert image_tokens == trainer.model.config.image_seq_length == 64  # 64x64 images in 8x8 patches
    assert np.asarray(tokenized["pixel_values"]).shape == (1, 3, 64, 64)


def test_short_grpo_run_raises_the_mean_reward_and_reports_kl(tmp_path, warm_policy, federated):
    prompts = federated.prompt_pool.shuffle(seed=0).select(range(512))
    settings = GRPOSettings(
        num_generations=4,
        batch_size=16,
        steps_per_generation=2,
        max_steps=30,
        learning_rate=1e-3,
        beta=0.04,
        max_completion_length=8,
        save_steps=0,
        seed=0,
    )
    reward = SaysYes()
    result = run_grpo(warm_policy, prompts, reward, settings, tmp_path)

    history = result["history"]
    rounds = step_metrics(history)
    assert len(rounds) == len(reward.calls) == settings.max_steps // settings.steps_per_round
    rewards = [entry["reward"] for entry in rounds]
    first, last = statistics.mean(rewards[:4]), statistics.mean(rewards[-4:])
    assert last > first + 0.2, rewards
    kl = [entry["kl"] for entry in history if "kl" in entry]
    assert len(kl) == settings.max_steps and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0
    assert all("loss" in entry for entry in history if "kl" in entry)
    assert [entry["rewards/SaysYes/mean"] for entry in rounds] == rewards

    # What the reward function received: one call per round, the G answers to a prompt adjacent.
    eos = load_policy(warm_policy)[1].tokenizer.eos_token_id
    for call in reward.calls:
        assert set(call) - {"prompts", "completions"} == REWARD_KWARGS
        n = len(call["prompts"])
        assert n == settings.generation_batch_size
        assert all(len(call[key]) == n for key in ("completions", "completion_ids", "image", "question", "family"))
        for i, (prompt, completion, ids) in enumerate(
            zip(call["prompts"], call["completions"], call["completion_ids"], strict=True)
        ):
            image_part, text_part = prompt[0]["content"]
            assert image_part["image"] is call["image"][i] and isinstance(image_part["image"], Image.Image)
            assert text_part["text"] == call["question"][i]
            assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)
            assert eos not in ids[:-1] and (ids[-1] == eos or len(ids) == settings.max_completion_length)
        for start in range(0, n, settings.num_generations):
            assert len(set(call["image_id"][start : start + settings.num_generations])) == 1
    assert reward.steps == list(range(0, settings.max_steps, settings.steps_per_round))  # scored once per round

    log = json.loads((tmp_path / LOG_FILE).read_text())
    assert log["history"] == json.loads(json.dumps(history)) and log["settings"]["beta"] == 0.04

    # The saved policy has learnt it: greedily it now says "yes" to most yes/no questions.
    model, processor = load_policy(result["policy_path"])
    presence = federated.evaluation.filter(lambda row: row["family"] == "presence").select(range(40))
    before = generate_answers(*load_policy(warm_policy), presence)
    after = generate_answers(model, processor, presence)
    assert sum(a == "yes" for a in after) > sum(b == "yes" for b in before) + 10, (before, after)


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_policy, federated):
    prompts = federated.prompt_pool.select(range(64))
    settings = GRPOSettings(
        batch_size=8, steps_per_generation=2, max_steps=6, save_steps=2, max_completion_length=4, save_total_limit=0
    )
    seen = []

    def kill_at_3(step, max_steps):
        seen.append(step)
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run_grpo(tiny_policy, prompts, length_reward, settings, tmp_path, on_step=kill_at_3)
    assert seen == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [e["step"] for e in json.loads((tmp_path / LOG_FILE).read_text())["history"]] == [1, 2]
    with pytest.raises(FileExistsError):
        run_grpo(tiny_policy, prompts, length_reward, settings, tmp_path)

    resumed = []
    result = run_grpo(
        tiny_policy, prompts, length_reward, settings, tmp_path, on_step=lambda s, m: resumed.append(s), resume=True
    )
    assert resumed == [3, 4, 5, 6]  # continues at the checkpoint's global step, not at 0
    assert result["global_step"] == 6 and result["resumed_from"].endswith("checkpoint-2")
    steps = [entry["step"] for entry in result["history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (result["policy_path"] / "config.json").exists()


@pytest.mark.parametrize("gain, kept", [(0.02, 0), (0.0, 1)])
def test_a_later_step_is_kept_only_if_it_beats_the_kept_one_by_the_margin(tmp_path, tiny_policy, federated, gain, kept):
    prompts = federated.prompt_pool.select(range(16))
    settings = GRPOSettings(batch_size=8, steps_per_generation=1, max_steps=2, save_steps=0, held_out_steps=1,
                            beta=0.0, max_completion_length=4, min_validation_gain=gain)
    scores = iter([0.80, 0.81, 0.79])  # step 1 gains 0.01: noise at the default margin

    def first_token(prompts, completions, completion_ids, **kwargs):
        return [float(ids[0]) for ids in completion_ids]

    result = run_grpo(tiny_policy, prompts, first_token, settings, tmp_path,
                      held_out=lambda model, processor: {"score": next(scores)}, select="score")  # fmt: skip
    assert result["selected"]["step"] == kept


@pytest.mark.parametrize("best_call", [0, 2])
def test_the_kept_policy_is_the_one_measured_best_on_the_held_out_metric(tmp_path, tiny_policy, federated, best_call):
    """`select`: the saved policy is the weights of the best held-out point (call 0 is the starting
    policy, before any step), not the last step's."""
    prompts = federated.prompt_pool.select(range(32))
    settings = GRPOSettings(batch_size=8, steps_per_generation=1, max_steps=4, save_steps=0, held_out_steps=1,
                            learning_rate=1e-2, beta=0.0, max_completion_length=4)
    snapshots = []

    def held_out(model, processor):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"score": 1.0 if len(snapshots) - 1 == best_call else 0.5}

    def first_token(prompts, completions, completion_ids, **kwargs):  # varies within a group: the policy moves
        return [float(ids[0]) for ids in completion_ids]

    result = run_grpo(tiny_policy, prompts, first_token, settings, tmp_path, held_out=held_out, select="score")
    assert len(snapshots) == 5  # before the first step and after each of the four
    assert result["selected"] == {"step": best_call, "metric": "score", "value": 1.0}
    kept, _ = load_policy(result["policy_path"])
    last = snapshots[-1]
    differs = [k for k, v in kept.state_dict().items() if not torch.equal(v, last[k])]
    assert differs, "four steps at lr 1e-2 must move the policy away from the kept one"
    for name, value in kept.state_dict().items():
        assert torch.equal(value, snapshots[best_call][name]), name


def test_the_sft_term_trains_the_answers_where_the_reward_gives_no_signal(tmp_path, tiny_policy, federated):
    """PPO-ptx (GRPOSettings.ptx_coef): a constant reward leaves every advantage 0, so only the SFT term
    on the labelled rows moves the policy, and it lowers their answer loss; without it nothing moves."""
    prompts = federated.prompt_pool.select(range(32))
    labelled = federated.sft.select(range(16))
    model, processor = load_policy(tiny_policy)
    with torch.no_grad():
        before = answer_loss(model, processor, labelled).item()

    def constant(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    losses = {}
    for coef in (0.0, 1.0):
        settings = GRPOSettings(batch_size=8, steps_per_generation=1, max_steps=4, save_steps=0, learning_rate=1e-2,
                                beta=0.0, max_completion_length=4, ptx_coef=coef, ptx_batch_size=16)
        result = run_grpo(tiny_policy, prompts, constant, settings, tmp_path / str(coef), labelled=labelled)
        trained, _ = load_policy(result["policy_path"])
        with torch.no_grad():
            losses[coef] = answer_loss(trained, processor, labelled).item()
        logged = [e["ptx_loss"] for e in step_metrics(result["history"]) if "ptx_loss" in e]
        assert len(logged) == (4 if coef else 0)
    assert losses[0.0] == pytest.approx(before, abs=1e-4)
    assert losses[1.0] < before - 0.5, (before, losses)
    with pytest.raises(ValueError, match="needs the server's labelled questions"):
        run_grpo(tiny_policy, prompts, constant, replace(settings, max_steps=1), tmp_path / "none")

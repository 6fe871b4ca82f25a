"""Policy warm start (TRL's SFTTrainer) and evaluation (batched greedy decoding).

The warm start is deliberately short: the SFT policy answers part of the
held-out questions wrongly, so alignment has room to improve it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from transformers import PreTrainedModel, PrinterCallback, ProcessorMixin, TrainerCallback

from secure_mor.data import (
    FAMILIES,
    assistant_turn,
    column,
    encoded_images,
    normalize_text,
    question_family,
    stratified_indices,
    user_prompt,
)


@dataclass(frozen=True)
class SFTSettings:
    """The warm start: how much of the server's SFT slice to use and how long to train."""

    examples: int = 3000
    epochs: float = 8.0
    batch_size: int = 32
    # Measured on the default tiny VLM: at 2e-3 the vision tower never starts to
    # learn (only language priors); at 3e-4 to 5e-4 colors are learnt after ~600
    # steps, shapes mostly not: a deliberately imperfect start.
    learning_rate: float = 5e-4
    seed: int = 0


def sft_dataset(rows: Dataset, examples: int | None = None, seed: int = 0) -> Dataset:
    """Prompt-completion pairs (TRL's conversational format) from VQA rows.

    `examples` are drawn evenly across question families: easy-VQA is 73%
    yes/no questions, and a policy warm-started on that mix learns little else.
    """
    if examples is not None and examples < len(rows):
        families = len(set(column(rows, "family")))
        rows = rows.select(stratified_indices(rows, -(-examples // families), seed))
    return Dataset.from_dict(
        {
            "image": encoded_images(rows),
            "prompt": [user_prompt(q) for q in column(rows, "question")],
            "completion": [assistant_turn(a) for a in column(rows, "answer")],
        }
    ).cast_column("image", ImageFeature())


class _ProgressCallback(TrainerCallback):
    """Forwards step progress to a callable (the CLI's progress bar)."""

    def __init__(self, on_step: Callable[[int, int], None]) -> None:
        self.on_step = on_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on_step(state.global_step, state.max_steps)


def run_sft(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Dataset,
    settings: SFTSettings,
    output_dir: Path | str,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Supervised warm start on `rows`; trains `model` in place, returns TRL's log history."""
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    config = SFTConfig(
        output_dir=str(output_dir / "sft-trainer"),
        use_cpu=True,
        bf16=False,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        seed=settings.seed,
        max_length=None,  # truncation would cut image tokens
        completion_only_loss=True,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        disable_tqdm=True,
        dataloader_num_workers=0,
        activation_checkpointing=False,  # TRL turns it on by default: pure overhead on a tiny model
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=sft_dataset(rows, settings.examples, settings.seed),
        processing_class=processor,
        callbacks=[_ProgressCallback(on_step)] if on_step else None,
    )
    trainer.remove_callback(PrinterCallback)  # the log history goes to sft_log.json instead
    trainer.train()
    history = trainer.state.log_history
    (output_dir / "sft_log.json").write_text(json.dumps({"settings": asdict(settings), "history": history}, indent=2))
    return {"history": history}


def extract_answer(completion: str, question: str, answers_by_family: dict[str, list[str]]) -> str:
    """The first word of `completion` that answers the question's family.

    "red", "Red." and "The color is red." all yield "red"; words of other
    families ("The circle is red" to a color question) are skipped.
    """
    family = question_family(question)
    candidates = set(answers_by_family.get(family, [])) or {a for v in answers_by_family.values() for a in v}
    for word in normalize_text(completion).split():
        if word in candidates:
            return word
    return ""


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Dataset,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions for every (image, question) row."""
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    outputs: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(user_prompt(q), add_generation_prompt=True, tokenize=False)
            for q in batch["question"]
        ]
        images = [image.convert("RGB") for image in batch["image"]]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if on_batch:
            on_batch(len(prompts))
    return outputs


def accuracy_report(completions: list[str], rows: Dataset, answers_by_family: dict[str, list[str]]) -> dict[str, Any]:
    """Per-family and overall accuracy of completions against `rows`' answers.

    `accuracy`: the extracted answer word is right (style-independent);
    `exact_match`: the normalised completion equals the answer.
    """
    per_family: dict[str, dict[str, float]] = {}
    totals = {"n": 0, "correct": 0, "exact": 0}
    for completion, question, answer, family in zip(
        completions, column(rows, "question"), column(rows, "answer"), column(rows, "family"), strict=True
    ):
        stats = per_family.setdefault(family, {"n": 0, "correct": 0, "exact": 0})
        correct = extract_answer(completion, question, answers_by_family) == normalize_text(answer)
        exact = normalize_text(completion) == normalize_text(answer)
        for bucket in (stats, totals):
            bucket["n"] += 1
            bucket["correct"] += int(correct)
            bucket["exact"] += int(exact)

    def summarise(bucket: dict[str, float]) -> dict[str, float]:
        n = max(bucket["n"], 1)
        return {"n": bucket["n"], "accuracy": bucket["correct"] / n, "exact_match": bucket["exact"] / n}

    ordered = [f for f in FAMILIES if f in per_family] + sorted(set(per_family) - set(FAMILIES))
    return {
        "overall": summarise(totals),
        "per_family": {family: summarise(per_family[family]) for family in ordered},
    }


def evaluate_policy(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Dataset,
    answers_by_family: dict[str, list[str]],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    examples_to_keep: int = 12,
    seed: int = 0,
) -> dict[str, Any]:
    completions = generate_answers(model, processor, rows, batch_size, on_batch=on_batch)
    report = accuracy_report(completions, rows, answers_by_family)
    shown = random.Random(seed).sample(range(len(rows)), min(examples_to_keep, len(rows)))
    report["examples"] = [
        {"question": rows[i]["question"], "answer": rows[i]["answer"], "completion": completions[i]} for i in shown
    ]
    return report

"""Policy warm start and evaluation (batched greedy decoding).

The warm start has two phases, both on the server's own labelled slice:

1. vision warm-up (the locally built tiny policy only; a pretrained VLM skips it): the
   vision tower learns to see what the answers name. Each image's labels are the
   answers of its open (not yes/no) questions ("red", "circle"), predicted from the
   max over its patch tokens. Measured: trained only through SFT's language-model
   loss, the tower never learned shapes (3,000 examples x 8 epochs: shape at chance,
   0.33-0.43, with patch 16 or a 4x larger tower); with this warm-up (patch 8) a probe
   reads the shape of held-out images right 92 % of the time (colours 99 %), and a
   mean over the tokens instead of the max stays at 0.74: a small shape is one token.
2. SFT with TRL's SFTTrainer, the vision tower frozen (it keeps what phase 1 learned).
   A share of the completions are sentences ("The color is red."), so the policy can
   write both styles and the `sentences` objective has something to reinforce.

SFT runs until the policy stops gaining on held-out questions (SFTSettings): GRPO is measured
against the best policy the server's own labels give, not against an under-trained one.
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
    YES_NO,
    assistant_turn,
    column,
    encoded_images,
    is_sentence,
    normalize_text,
    ordered_families,
    stratified_indices,
    styled_answer,
    user_prompt,
)
from secure_mor.device import trainer_arguments


@dataclass(frozen=True)
class SFTSettings:
    """The warm start (module docstring): vision warm-up, then SFT on a slice of the server's data.

    vision_epochs: passes of the vision warm-up over the slice's images (0: none; a VLM not
    built here never gets one); sentence_rate: share of SFT completions written as a sentence.
    """

    # 2,700 of the server's labelled questions, 12 epochs. Measured (held-out, seeds 0 / 1 / 2): 900 x 6 (the default
    # until session 7) gave 0.775 / 0.608 / 0.658; 2,700 x 6 (until session 13) 0.898 / 0.897 / 0.903 with presence
    # under-fitted (the SFT questions' own presence answers 0.68 right where a shape is asked); 2,700 x 12 gives
    # 0.917 / 0.928 / 0.907 (presence 0.815 / 0.84 / 0.795), 2,700 x 24 0.913 (seed 0). README, "Policy".
    examples: int = 2700
    epochs: float = 12.0
    batch_size: int = 32
    learning_rate: float = 5e-4
    sentence_rate: float = 0.25
    vision_epochs: int = 40
    vision_learning_rate: float = 2e-3
    train_vision: bool = False  # also train the vision tower during SFT (after the warm-up)
    seed: int = 0


def sft_dataset(rows: Dataset, examples: int | None = None, seed: int = 0, sentence_rate: float = 0.0) -> Dataset:
    """Prompt-completion pairs (TRL's conversational format) from VQA rows.

    `examples` are drawn evenly across question families: easy-VQA is 73%
    yes/no questions, and a policy warm-started on that mix learns little else.
    A share `sentence_rate` of the completions (drawn with `seed`) is written as a sentence.
    """
    if examples is not None and examples < len(rows):
        families = len(set(column(rows, "family")))
        rows = rows.select(stratified_indices(rows, -(-examples // families), seed))
    rng = random.Random(seed)
    completions = [
        styled_answer(answer, family, "sentence" if rng.random() < sentence_rate else "word")
        for answer, family in zip(column(rows, "answer"), column(rows, "family"), strict=True)
    ]
    return Dataset.from_dict(
        {
            "image": encoded_images(rows),
            "prompt": [user_prompt(q) for q in column(rows, "question")],
            "completion": [assistant_turn(c) for c in completions],
        }
    ).cast_column("image", ImageFeature())


def image_attributes(rows: Dataset) -> tuple[list[Any], torch.Tensor, list[str]]:
    """The vision warm-up's targets: every image of `rows` that has an open (not yes/no)
    question, its multi-hot labels over the open answers, and the answers' names."""
    names = sorted({a for a in column(rows, "answer") if normalize_text(a) not in YES_NO})
    index = {name: i for i, name in enumerate(names)}
    first: dict[str, int] = {}
    labels: dict[str, set[int]] = {}
    for row, (image_id, answer) in enumerate(zip(column(rows, "image_id"), column(rows, "answer"), strict=True)):
        first.setdefault(image_id, row)
        if answer in index:
            labels.setdefault(image_id, set()).add(index[answer])
    ids = sorted(labels, key=first.__getitem__)
    targets = torch.zeros((len(ids), len(names)))
    for row, image_id in enumerate(ids):
        targets[row, sorted(labels[image_id])] = 1.0
    return list(rows.select([first[i] for i in ids])["image"]), targets, names


def warm_up_vision(
    model: PreTrainedModel, processor: ProcessorMixin, rows: Dataset, settings: SFTSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Phase 1 of the warm start (module docstring): trains the tiny policy's vision tower in
    place to name each image's attributes from the max over its patch tokens (random 90-degree
    rotations and flips as augmentation: colour and shape names survive them); returns the loss per
    epoch. The linear head is thrown away afterwards."""
    images, targets, names = image_attributes(rows)
    if not names or settings.vision_epochs < 1:
        return []
    tower = model.model.vision_tower
    device = tower.device
    pixels = processor.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    generator = torch.Generator().manual_seed(settings.seed)  # on the CPU: the same draws on every device
    head = torch.nn.Linear(tower.config.hidden_size, len(names)).to(device)
    targets = targets.to(device)
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.vision_learning_rate, weight_decay=0.01)
    steps = settings.vision_epochs * -(-len(pixels) // settings.batch_size)
    losses, step = [], 0
    tower.train()
    for _ in range(settings.vision_epochs):
        total = 0.0
        for batch in torch.randperm(len(pixels), generator=generator).split(settings.batch_size):
            x = torch.rot90(pixels[batch], int(torch.randint(4, (), generator=generator)), (2, 3))
            x = (x.flip(-1) if torch.rand((), generator=generator) < 0.5 else x).to(device)
            tokens = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]  # CLS dropped
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(tokens.amax(1)), targets[batch.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            step += 1
            if on_step:
                on_step(step, steps)
        losses.append(total / len(pixels))
    tower.eval()
    return losses


class StepProgress(TrainerCallback):
    """Forwards a Trainer's step progress, (global_step, max_steps), to a callable (a progress bar or file)."""

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
    device: str = "cpu",
) -> dict[str, Any]:
    """The warm start on `rows` (module docstring) on `device` ("cpu" or "cuda"); trains `model` in place
    and returns the vision warm-up's losses per epoch (`vision`, empty for a VLM not built here) and TRL's
    log history. `on_step(done, total)` reports the vision warm-up's steps, then SFT's."""
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    model.to(device)
    vision: list[float] = []
    if is_tiny_policy(model):
        vision = warm_up_vision(model, processor, rows, settings, on_step)
        model.model.vision_tower.requires_grad_(settings.train_vision)
    config = SFTConfig(
        output_dir=str(output_dir / "sft-trainer"),
        **trainer_arguments(device),
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
        train_dataset=sft_dataset(rows, settings.examples, settings.seed, settings.sentence_rate),
        processing_class=processor,
        callbacks=[StepProgress(on_step)] if on_step else None,
    )
    trainer.remove_callback(PrinterCallback)  # the log history goes to sft_log.json instead
    try:
        trainer.train()
    finally:
        model.requires_grad_(True)
    history = trainer.state.log_history
    log = {"settings": asdict(settings), "vision_losses": vision, "history": history}
    (output_dir / "sft_log.json").write_text(json.dumps(log, indent=2))
    return {"vision": vision, "history": history}


def is_tiny_policy(model: PreTrainedModel) -> bool:
    """The policy was built here from scratch (`vlm.build_tiny_vlm`): its vision tower needs the warm-up."""
    return "tiny_vlm" in model.config.to_dict()


def extract_answer(completion: str, family: str, answers_by_family: dict[str, list[str]]) -> str:
    """The first answer of the question's `family` that `completion` states, normalised ("" if none).

    "red", "Red." and "The color is red." all yield "red"; answers of other families ("The circle is
    red" to a color question) are skipped; an answer of several words ("light blue") counts where
    they stand together, and of two answers starting at the same word the longer one does.
    """
    candidates = answers_by_family.get(family) or [a for v in answers_by_family.values() for a in v]
    words = normalize_text(completion).split()
    phrases = sorted({tuple(normalize_text(a).split()) for a in candidates} - {()}, key=len, reverse=True)
    for start in range(len(words)):
        for phrase in phrases:
            if tuple(words[start : start + len(phrase)]) == phrase:
                return " ".join(phrase)
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
    """Greedy completions for every (image, question) row. The image token is never generated: TRL's
    GRPO sampler suppresses it too, so its probability is never trained down, and a greedy decoder
    that allowed it would answer with it (measured: after GRPO, colour questions got "<image>")."""
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(model.config, "image_token_id", None)
    outputs: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(user_prompt(q), add_generation_prompt=True, tokenize=False)
            for q in batch["question"]
        ]
        images = [image.convert("RGB") for image in batch["image"]]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            suppress_tokens=None if image_token is None else [image_token],
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if on_batch:
            on_batch(len(prompts))
    return outputs


def accuracy_report(completions: list[str], rows: Dataset, answers_by_family: dict[str, list[str]]) -> dict[str, Any]:
    """Per-family and overall accuracy of completions against `rows`' answers.

    `accuracy`: the extracted answer word is right (style-independent);
    `exact_match`: the normalised completion equals the answer;
    `sentences`: the share of completions that are full sentences (`is_sentence`);
    `right_sentences`: the share that are both right and full sentences (the `sentences` objective).
    """
    per_family: dict[str, dict[str, float]] = {}
    totals = {"n": 0, "correct": 0, "exact": 0, "sentences": 0, "right_sentences": 0}
    for completion, answer, family in zip(completions, column(rows, "answer"), column(rows, "family"), strict=True):
        stats = per_family.setdefault(family, {"n": 0, "correct": 0, "exact": 0, "sentences": 0, "right_sentences": 0})
        correct = extract_answer(completion, family, answers_by_family) == normalize_text(answer)
        exact = normalize_text(completion) == normalize_text(answer)
        for bucket in (stats, totals):
            bucket["n"] += 1
            bucket["correct"] += int(correct)
            bucket["exact"] += int(exact)
            bucket["sentences"] += int(is_sentence(completion))
            bucket["right_sentences"] += int(correct and is_sentence(completion))

    def summarise(bucket: dict[str, float]) -> dict[str, float]:
        n = max(bucket["n"], 1)
        return {"n": bucket["n"], "accuracy": bucket["correct"] / n, "exact_match": bucket["exact"] / n,
                "sentences": bucket["sentences"] / n, "right_sentences": bucket["right_sentences"] / n}

    ordered = ordered_families(per_family)
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

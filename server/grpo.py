"""GRPO on the server's policy VLM (docs/architecture.md, "One GRPO step", row 10).

`run_grpo` drives TRL's `GRPOTrainer` on a saved policy with any reward
callable: in production the federated, router-fused reward; in tests a
plaintext one. The trainer samples `num_generations` answers per prompt,
scores them with the callable, turns the scores into group-relative
advantages and minimises the clipped policy-gradient loss with a KL penalty
(`beta`) towards the frozen reference, which TRL rebuilds from the same saved
path.

What TRL calls a *generation round*
-----------------------------------
TRL's dataloader yields one *generation batch* of
`generation_batch_size = batch_size * steps_per_generation` completions
(= `generation_batch_size / num_generations` distinct prompts, each repeated
`num_generations` times). `_prepare_inputs` generates and scores the whole
batch once (so the reward function, i.e. one federated scoring round, is
called once per round with all of it), shuffles it and splits it into
`steps_per_generation` slices of `batch_size` completions. Each slice is one
forward/backward pass. With `gradient_accumulation_steps = 1` every pass is an
optimizer step, so one round feeds `steps_per_generation * num_iterations`
optimizer steps (`num_iterations`, the μ of the GRPO paper, replays the same
round that many times). When a round spans several optimizer steps
(`gradient_accumulation_steps` not a multiple of `steps_per_generation *
num_iterations`), TRL also computes the sampling policy's ("old")
log-probabilities once per round and the PPO-style clipped ratio corrects for
the policy having moved since generation; with one step per round the update
is exactly on-policy. The reward metrics (`reward`, ...) of a round are logged
at the optimizer step that generated it.

The reward callable
-------------------
TRL calls `reward_fn(prompts=..., completions=..., completion_ids=..., **kwargs)`
once per generation round (all N = B*G items of the round, the G answers to a
prompt adjacent) and expects a list of N floats (or None for "not applicable").
It receives:

- `prompts`: list of N conversations, `[{"role": "user", "content":
  [{"type": "image", "text": None, "image": <PIL.Image>}, {"type": "text",
  "text": question}]}]` (TRL injects the PIL image into the placeholder;
  the `"text": None` key comes from the Arrow struct schema);
- `completions`: list of N conversations `[{"role": "assistant", "content":
  answer_text}]`, content a plain string: the sampled tokens decoded with
  special tokens (`</s>`, `<pad>`) removed, e.g. `"yes"`, `"The color is
  red."`, or `""` when the first token was `</s>`;
- `completion_ids`: list of N lists of token ids, cut after the first `</s>`
  (which they then end with) or at `max_completion_length` (no `</s>`);
- one keyword per extra dataset column, each a list of N values aligned with
  `prompts`: `image` (PIL image), `question` (str), `family` (str),
  `image_id` (str);
- `trainer_state` (the trainer's live `TrainerState`: read `global_step`
  during the call, it is the optimizer step that starts the round),
  `log_extra(column, values)` and `log_metric(name, value)` (add a column to
  TRL's completion table / a scalar to the step's logs).

`global_step` is not a unique round id across a resume: the round that
starts at the checkpoint's step is generated and scored again, with the same
`global_step`. A federated reward must therefore give each scoring request a
fresh nonce (or a run-scoped counter), not just the step number, or the key
authority's replay check will refuse the re-scored round.

A callable must therefore accept `**kwargs`. Its name (`__name__`, or the
class name of a callable object) names its log entry `rewards/<name>/mean`;
`reward` is the mean total reward of the round.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from transformers import AutoProcessor, PrinterCallback, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from secure_mor.data import assistant_turn, column, encoded_images, user_prompt
from secure_mor.device import trainer_arguments
from secure_mor.files import write_json
from secure_mor.policy import StepProgress

RewardFn = Callable[..., list[float | None]]

LOG_FILE = "grpo_log.json"
POLICY_DIR = "policy"
BEST_DIR = "best-policy"  # the policy with the best held-out `select` metric so far (run_grpo)
BEST_FILE = "best.json"
PASSTHROUGH_COLUMNS = ("question", "family", "image_id")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")

_MESSAGE = [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}]


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO run. Sizes count *completions* unless they say prompts.

    Batching (see the module docstring for TRL's generation rounds):

    - `num_generations` (G): answers sampled per prompt; advantages are
      computed within each group of G, so G >= 2.
    - `batch_size`: completions per forward/backward pass
      (TRL's `per_device_train_batch_size`; one process on CPU).
    - `steps_per_generation`: passes fed by one generation round. A round holds
      `batch_size * steps_per_generation` completions, i.e.
      `prompts_per_round` = that / G prompts, and must hold whole groups.
      With `gradient_accumulation_steps = 1` each pass is an optimizer step,
      so one round of (federated) scoring serves `steps_per_generation`
      optimizer steps. Set it to 1 for strictly on-policy GRPO.
    - `num_iterations` (μ): times each round is replayed (more optimizer
      steps per round, no new scoring).
    - `gradient_accumulation_steps`: passes per optimizer step.
      Optimizer steps per round = steps_per_generation * num_iterations /
      gradient_accumulation_steps.

    Objective:

    - `learning_rate` (constant by default): 1e-3 suits the tiny policy
      (measured: the test's reward doubles in 30 steps); TRL's default for
      pretrained VLMs is 1e-6.
    - `beta`: KL coefficient to the frozen reference (the starting policy);
      > 0 makes TRL load a second copy of the policy and log `kl`.
    - `loss_type`: TRL's token aggregation, one of LOSS_TYPES: "grpo" (per
      sequence mean, the paper's), "dapo" (TRL's default: mean over the
      round's active tokens), "dr_grpo" (constant normaliser
      max_completion_length), "bnpo", ... .
    - `epsilon`: PPO clip range of the importance ratio.
    - `scale_rewards`: "group" (divide advantages by the group's std),
      "batch" or "none" (Dr. GRPO).

    Sampling: `temperature` (> 0, multinomial sampling; log-probs are computed
    at the same temperature), `top_p`, `top_k` (0 = off),
    `max_completion_length` (new tokens; generation stops earlier at `</s>`).
    An answer cut at this length has no `</s>`; `mask_truncated_completions`
    drops such answers from the loss.

    Bookkeeping: `logging_steps` (1 logs every optimizer step),
    `save_steps` (a checkpoint every so many optimizer steps; a multiple of
    the steps per round, so a resumed run starts at a round boundary; 0 = no
    checkpoints), `save_total_limit` (checkpoints kept; 0 = all), `seed`.
    """

    num_generations: int = 4
    batch_size: int = 16
    steps_per_generation: int = 2
    num_iterations: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 50
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.04
    loss_type: str = "dapo"
    epsilon: float = 0.2
    scale_rewards: str = "group"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 12
    mask_truncated_completions: bool = False
    logging_steps: int = 1
    held_out_steps: int = 10  # the held-out curve's interval in optimizer steps (run_grpo's `held_out`)
    # A measured step replaces the kept policy only if its `select` metric beats the kept one's by more than
    # this: 300 validation questions at accuracy ~0.88 have a standard error of ~0.019, and measured (converged
    # SFT start, seeds 0-2, oracle and fused rewards) steps chosen for gains of 0.003-0.010 lost 0.009-0.023 of
    # held-out accuracy; 0 keeps any gain.
    min_validation_gain: float = 0.02
    save_steps: int = 10
    save_total_limit: int = 2
    seed: int = 0
    # The vision tower and projector stay as SFT left them. Measured (oracle reward, lr 3e-4): training
    # them too lost 0.2 of held-out accuracy in 80 steps, frozen the same run gained 0.045; GRPO's
    # noisy gradients wear down features the policy can only relearn from its own samples.
    train_vision: bool = False
    # InstructGPT's PPO-ptx: each optimizer step also minimises `ptx_coef` times the SFT loss (answer tokens
    # only) on `ptx_batch_size` of the server's own labelled questions (run_grpo's `labelled`), so GRPO's
    # noisy gradients do not wear down what SFT taught on the families its reward cannot improve. 0 = off.
    ptx_coef: float = 0.0
    ptx_batch_size: int = 32
    extra: dict[str, Any] = field(default_factory=dict)  # further GRPOConfig fields, passed through verbatim

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (advantages are relative to the group), got {self.num_generations}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.ptx_coef < 0 or self.ptx_batch_size < 1:
            raise ValueError(f"ptx_coef must be >= 0 and ptx_batch_size >= 1, got {self.ptx_coef}, "
                             f"{self.ptx_batch_size}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        for name in (
            "batch_size",
            "steps_per_generation",
            "num_iterations",
            "gradient_accumulation_steps",
            "max_steps",
            "max_completion_length",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"a generation round of batch_size * steps_per_generation = {self.generation_batch_size} completions "
                f"must hold whole groups of num_generations = {self.num_generations}"
            )
        passes, accumulation = self.steps_per_generation * self.num_iterations, self.gradient_accumulation_steps
        if passes % accumulation and accumulation % passes:
            raise ValueError(
                f"steps_per_generation * num_iterations ({passes}) and gradient_accumulation_steps ({accumulation}) "
                "must divide one another: an optimizer step must not straddle the boundary of a generation round"
            )
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0, got {self.save_steps}")
        if self.save_steps % self.steps_per_round:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of the optimizer steps per generation round "
                f"({self.steps_per_round}) so that a resumed run starts at a round boundary"
            )

    @property
    def generation_batch_size(self) -> int:
        """Completions generated and scored per round (N = B * G of docs/architecture.md)."""
        return self.batch_size * self.steps_per_generation

    @property
    def prompts_per_round(self) -> int:
        """Distinct prompts per round (B of docs/architecture.md)."""
        return self.generation_batch_size // self.num_generations

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps fed by one generation round (1 when one step spans several rounds)."""
        return max(1, self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps)


def grpo_prompt_dataset(rows: Dataset, passthrough: Sequence[str] = PASSTHROUGH_COLUMNS) -> Dataset:
    """TRL's conversational prompt dataset from prompt-pool rows (image, question, ...).

    Columns: `prompt` (one user turn: an image placeholder and the question),
    `image` (TRL fills the placeholder with it), and the `passthrough`
    columns the rows have (they reach the reward function as keyword lists).
    Images are copied undecoded.
    """
    for required in ("image", "question"):
        if required not in rows.column_names:
            raise ValueError(f"prompt rows need columns 'image' and 'question'; they have {rows.column_names}")
    kept = [name for name in passthrough if name in rows.column_names and name not in ("image", "prompt")]
    data: dict[str, list[Any]] = {
        "prompt": [user_prompt(q) for q in column(rows, "question")],
        "image": encoded_images(rows),
    }
    features: dict[str, Any] = {"prompt": _MESSAGE, "image": ImageFeature()}
    for name in kept:
        data[name] = column(rows, name)
        features[name] = rows.features[name]
    return Dataset.from_dict(data, features=Features(features))


HeldOutFn = Callable[[Any, ProcessorMixin], dict[str, float]]  # (policy, processor) -> metrics


class _StepCallback(TrainerCallback):
    """The held-out curve, and the log history to `grpo_log.json` at every log event.

    Writing on every log keeps the history of a run that is killed; a resumed
    run reloads the history up to its checkpoint from the checkpoint's trainer
    state and continues it (held-out points are log entries too, `held_out/<metric>`).
    """

    def __init__(self, log_path: Path, settings: GRPOSettings, held_out: HeldOutFn | None, select: str | None) -> None:
        self.log_path = log_path
        self.settings = settings
        self.held_out = held_out
        self.select = select
        self.best_dir = log_path.parent / BEST_DIR
        self.best: dict[str, Any] | None = None  # {"step", "value"} of the policy kept in best_dir

    def _measure(self, state: Any, model: Any, processing_class: Any) -> None:
        was_training = model.training
        metrics = self.held_out(model, processing_class)
        model.train(was_training)
        state.log_history.append({"step": state.global_step, **{f"held_out/{k}": v for k, v in metrics.items()}})
        write_log(self.log_path, self.settings, state.log_history)
        if self.select is not None and (self.best is None or metrics[self.select] > self.best["value"]
                                        + self.settings.min_validation_gain):
            model.save_pretrained(self.best_dir)
            self.best = {"step": state.global_step, "metric": self.select, "value": metrics[self.select]}
            (self.best_dir / BEST_FILE).write_text(json.dumps(self.best))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        if self.select is not None and (self.best_dir / BEST_FILE).exists():
            best = json.loads((self.best_dir / BEST_FILE).read_text())
            # A kept policy from after the checkpoint a resumed run restarts at belongs to a lost tail.
            self.best = best if best["step"] <= state.global_step and best["metric"] == self.select else None
        if self.held_out and state.global_step == 0:
            self._measure(state, model, processing_class)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        write_log(self.log_path, self.settings, state.log_history)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                    **kwargs: Any) -> None:
        if self.held_out and (state.global_step % self.settings.held_out_steps == 0
                              or state.global_step == state.max_steps):
            self._measure(state, model, processing_class)


def write_log(path: Path, settings: GRPOSettings, history: list[dict[str, Any]]) -> None:
    clean = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
        for entry in history
    ]
    write_json(path, {"settings": asdict(settings), "history": clean}, indent=2)


def step_metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-optimizer-step entries of a log history (not the final summary)."""
    return [entry for entry in history if "reward" in entry and "step" in entry]


def held_out_curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out points of a log history: [{"step", <metric>: value, ...}], in step order."""
    points = [{"step": e["step"], **{k.removeprefix("held_out/"): v for k, v in e.items() if k.startswith("held_out/")}}
              for e in history if any(k.startswith("held_out/") for k in e)]
    return sorted({p["step"]: p for p in points}.values(), key=lambda p: p["step"])


def load_processor(policy_path: Path | str) -> ProcessorMixin:
    """The policy's processor, set up for generation (left padding, a pad token)."""
    processor = AutoProcessor.from_pretrained(str(policy_path))
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return processor


# GRPOSettings' fields that are TRL's under another name; every other field of the same name as a GRPOConfig
# field is TRL's own and goes to GRPOConfig as it is (a new TRL setting is one new field).
TRL_NAMES = {"batch_size": "per_device_train_batch_size"}


def grpo_config(settings: GRPOSettings, output_dir: Path | str, device: str = "cpu") -> Any:
    """TRL's `GRPOConfig` for `settings` on `device` ("cpu" or "cuda", secure_mor.device), checkpoints in
    `output_dir` (`grpo_arguments`)."""
    from trl import GRPOConfig

    return GRPOConfig(**grpo_arguments(settings, output_dir, device))


def grpo_arguments(settings: GRPOSettings, output_dir: Path | str, device: str = "cpu") -> dict[str, Any]:
    """GRPOConfig's arguments: TRL's defaults, overridden by every GRPOSettings field TRL knows, then by
    `extra` (building the config checks the hardware: this is what a cuda run would be given)."""
    from trl import GRPOConfig

    trl_fields = {f.name for f in fields(GRPOConfig)}
    own = {TRL_NAMES.get(f.name, f.name): getattr(settings, f.name) for f in fields(settings)
           if TRL_NAMES.get(f.name, f.name) in trl_fields}  # fmt: skip
    own.update(
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=settings.save_total_limit or None,  # 0: keep every checkpoint
        data_seed=settings.seed,
    )
    return dict(
        output_dir=str(output_dir),
        **trainer_arguments(device),
        activation_checkpointing=False,  # TRL turns it on by default (and the old name warns); overhead here
        disable_dropout=True,  # the policy and the reference must score the same tokens alike
        remove_unused_columns=False,  # the passthrough columns feed the reward function
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **own,
        **settings.extra,
    )


def answer_loss(model: Any, processor: ProcessorMixin, rows: Dataset) -> Any:
    """The SFT loss of `rows` (image, question, answer): mean cross-entropy of the answer's tokens (and the
    turn's end) after the chat-formatted prompt, as SFT trained them."""
    questions, answers = column(rows, "question"), column(rows, "answer")
    images = [image.convert("RGB") for image in rows["image"]]
    prompts = [processor.apply_chat_template(user_prompt(q), add_generation_prompt=True, tokenize=False)
               for q in questions]
    full = [processor.apply_chat_template(user_prompt(q) + assistant_turn(a), tokenize=False)
            for q, a in zip(questions, answers, strict=True)]
    prompt_lengths = processor(text=prompts, images=images, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    inputs = processor(text=full, images=images, return_tensors="pt", padding=True).to(model.device)
    labels = inputs["input_ids"].clone()
    for row, (mask, prompt_length) in enumerate(zip(inputs["attention_mask"], prompt_lengths, strict=True)):
        real = mask.nonzero().squeeze(-1)  # the row's tokens, whichever side the tokenizer pads
        labels[row, mask == 0] = -100
        labels[row, real[: int(prompt_length)]] = -100
    return model(**inputs, labels=labels).loss


def _trainer_class(settings: GRPOSettings, labelled: Dataset | None) -> type:
    """TRL's GRPOTrainer, or with `ptx_coef` > 0 one whose loss adds the SFT loss of a random batch of
    `labelled` rows at every pass (GRPOSettings.ptx_coef)."""
    import random

    from trl import GRPOTrainer

    if not settings.ptx_coef:
        return GRPOTrainer
    if labelled is None or len(labelled) == 0:
        raise ValueError("ptx_coef > 0 needs the server's labelled questions (run_grpo's `labelled`)")
    rng = random.Random(settings.seed)

    class PtxGRPOTrainer(GRPOTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            batch = labelled.select(rng.sample(range(len(labelled)), min(settings.ptx_batch_size, len(labelled))))
            ptx = answer_loss(model, self.processing_class, batch)
            self._metrics["train"]["ptx_loss"].append(ptx.item())
            return loss + settings.ptx_coef * ptx

    return PtxGRPOTrainer


def build_grpo_trainer(
    policy_path: Path | str,
    prompts: Dataset,
    reward_fn: RewardFn,
    settings: GRPOSettings,
    output_dir: Path | str,
    callbacks: list[TrainerCallback] | None = None,
    device: str = "cpu",
    labelled: Dataset | None = None,
) -> Any:
    """TRL's `GRPOTrainer` on the saved policy, ready to `train()` (what `run_grpo` runs).

    The policy goes in as a path, so TRL loads it and builds the frozen
    reference from the same weights; the processor is passed explicitly.
    Generation (TRL's transformers path) samples at `temperature`, pads with
    the tokenizer's pad token on the left, stops a sequence at `</s>` (every
    eos id of the tokenizer and the model's generation config) and never
    samples the image token.
    """
    dataset = prompts if "prompt" in prompts.column_names else grpo_prompt_dataset(prompts)
    trainer = _trainer_class(settings, labelled)(
        model=str(policy_path),
        reward_funcs=[reward_fn],
        args=grpo_config(settings, output_dir, device),
        train_dataset=dataset,
        processing_class=load_processor(policy_path),
        callbacks=callbacks,
    )
    if not settings.train_vision:
        vision_modules(trainer.model).requires_grad_(False)  # the optimizer is made in train(): it skips them
    return trainer


_VISION_MODULES = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "mm_projector")


def vision_modules(model: Any) -> Any:
    """The policy's image encoder and projector (the modules of `_VISION_MODULES` names), as one ModuleList."""
    import torch

    found = [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in _VISION_MODULES]
    if not found:
        raise ValueError(f"{type(model).__name__} has none of the vision modules {_VISION_MODULES}: "
                         "set train_vision=True to train every parameter")
    return torch.nn.ModuleList(found)


def run_grpo(
    policy_path: Path | str,
    prompts: Dataset,
    reward_fn: RewardFn,
    settings: GRPOSettings,
    output_dir: Path | str,
    on_step: Callable[[int, int], None] | None = None,
    resume: bool = False,
    held_out: HeldOutFn | None = None,
    select: str | None = None,
    device: str = "cpu",
    labelled: Dataset | None = None,
) -> dict[str, Any]:
    """GRPO on the policy saved at `policy_path`, scored by `reward_fn`.

    `prompts`: prompt-pool rows (image, question, family, image_id), or a
    dataset already built by `grpo_prompt_dataset`. `reward_fn`: see the
    module docstring for exactly what it receives. `on_step(global_step,
    max_steps)` is called after every optimizer step; an exception it raises
    stops the run (the last checkpoint stays resumable).

    Writes to `output_dir`: `checkpoint-<step>/` every `save_steps` optimizer
    steps, `grpo_log.json` (settings and TRL's log history, rewritten at every
    log event: per step `loss`, `kl`, `entropy`, `grad_norm`, `learning_rate`,
    `step_time`; at the step that generated a round also `reward`,
    `reward_std`, `rewards/<name>/mean`, `frac_reward_zero_std`,
    `completions/mean_length`, ...), and the final policy (model + processor,
    `save_pretrained`) in `policy/`.

    `device`: "cpu" or "cuda" (secure_mor.device.resolve_device). `labelled`: the server's own labelled
    questions (image, question, answer) for the SFT term (`settings.ptx_coef`).

    `resume=True` continues from the last checkpoint in `output_dir` (global
    step, optimizer, scheduler, RNG states and the log history so far) if
    there is one; otherwise the run starts from step 0. Without `resume`, an
    `output_dir` that already holds checkpoints is refused rather than mixed
    with a new run.

    `held_out(policy, processor)`, if given, is measured before the first step and every
    `settings.held_out_steps` optimizer steps (and after the last): the held-out curve.
    `select`, one of its metrics: the saved policy is the one measured best on it (the first
    of equals, the starting policy included: step 0), not the last step's; early stopping
    that needs no second run.

    Returns `{"history", "held_out", "global_step", "resumed_from", "policy_path", "log_path",
    "selected"}` (`selected`: the kept policy's `{"step", "metric", "value"}`, or None).
    """
    if select is not None and held_out is None:
        raise ValueError("select names a held-out metric: pass held_out too")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last = get_last_checkpoint(str(output_dir))
    if last and not resume:
        raise FileExistsError(
            f"{output_dir} already holds checkpoints ({Path(last).name}); pass resume=True to continue that run "
            "or use a fresh output directory"
        )
    log_path = output_dir / LOG_FILE
    steps = _StepCallback(log_path, settings, held_out, select)
    callbacks = [steps, StepProgress(on_step)] if on_step else [steps]  # progress after the held-out point
    trainer = build_grpo_trainer(policy_path, prompts, reward_fn, settings, output_dir, callbacks, device, labelled)
    trainer.remove_callback(PrinterCallback)  # the history goes to grpo_log.json
    trainer.train(resume_from_checkpoint=last)

    history = trainer.state.log_history
    write_log(log_path, settings, history)
    policy_dir = output_dir / POLICY_DIR
    if steps.best is None:
        trainer.model.save_pretrained(policy_dir)
    else:
        shutil.copytree(steps.best_dir, policy_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(BEST_FILE))
    trainer.processing_class.save_pretrained(policy_dir)
    return {
        "history": history,
        "held_out": held_out_curve(history),
        "global_step": trainer.state.global_step,
        "resumed_from": last,
        "policy_path": policy_dir,
        "log_path": log_path,
        "selected": steps.best,
    }

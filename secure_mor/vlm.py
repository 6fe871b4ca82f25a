"""The policy VLM: a tiny LLaVA-class model built locally, or any
TRL-supported VLM given by path.

The tiny model is `LlavaForConditionalGeneration` (CLIP vision tower, Llama
text model, MLP projector) built from a config, with a word-level tokenizer
trained locally with `tokenizers` over the data's vocabulary, a plain-text chat
template and a PIL CLIP image processor. Nothing touches a model hub.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

# Plain "USER: ... ASSISTANT: ...</s>" turns. A rendered prompt with the
# generation prompt is a prefix of the rendered prompt + answer, as TRL needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %} {% endif %}"
    "{% if message['role'] == 'user' %}USER:{% elif message['role'] == 'system' %}SYSTEM:"
    "{% else %}ASSISTANT:{% endif %}"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
_TEMPLATE_WORDS = ["USER:", "ASSISTANT:", "SYSTEM:"]


@dataclass(frozen=True)
class TinyVLMConfig:
    """Size of the locally built policy. Patches of 8 pixels (64 image tokens): with 16, a small shape
    falls inside one patch and the tower never learned shapes (policy.warm_up_vision)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 128
    seed: int = 0


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word and punctuation mark in `texts`.

    Metaspace keeps the spaces as token prefixes, so decoding gives back the
    exact text ("The color is red.").
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(list(texts) + _TEMPLATE_WORDS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # generation pads on the left
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(texts: Iterable[str], config: TinyVLMConfig) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(texts),
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_vlm(
    texts: Iterable[str], config: TinyVLMConfig | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised tiny LLaVA and its processor, built from `texts`' vocabulary."""
    config = config or TinyVLMConfig()
    processor = build_processor(texts, config)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=4 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.tiny_vlm = asdict(config)
    return model, processor


def save_policy(model: PreTrainedModel, processor: ProcessorMixin, path: Path | str) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


VIDEO_EXTRA = "video-processors"  # pyproject's extra with the torch/torchvision pair that install together


class PolicyLoadError(RuntimeError):
    """A VLM cannot be loaded here; the message says why in one sentence."""


def load_policy(path_or_id: Path | str) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a policy saved by `save_policy`, or any image-text-to-text model TRL supports.

    A hub id works only where its weights are already in the local cache. Raises PolicyLoadError
    (a missing path, a model transformers cannot load, a processor that needs torchvision).
    """
    try:
        # local_files_only: nothing is fetched from a model hub at run time
        processor = AutoProcessor.from_pretrained(str(path_or_id), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(str(path_or_id), local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise PolicyLoadError(_load_failure(str(path_or_id), err)) from err
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, processor


def check_loadable(path_or_id: Path | str) -> None:
    """Raises PolicyLoadError unless the VLM's config and processor load here (no weights are read: a check
    to run before starting a long job)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path_or_id), local_files_only=True)
        AutoProcessor.from_pretrained(str(path_or_id), local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise PolicyLoadError(_load_failure(str(path_or_id), err)) from err


def _load_failure(model: str, err: Exception) -> str:
    local = Path(model)
    if local.is_absolute() or model.startswith("."):
        if not local.is_dir():
            return f"no saved VLM at {model!r}: no such directory"
        if not (local / "config.json").exists():
            return f"no saved VLM at {model!r}: it has no config.json"
    # Processors with a video slot (Qwen2-VL and kin) need torchvision: transformers says so with an
    # ImportError, or, depending on the files present, with an OSError about a missing video config.
    text = str(err).lower()
    if importlib.util.find_spec("torchvision") is None and ("torchvision" in text or "video_preprocessor" in text):
        return (f"the VLM {model!r} has a processor that needs torchvision, which is not installed: install the "
                f"extra with `pip install -e '.[{VIDEO_EXTRA}]'` (torch 2.14.1 and torchvision 0.29.1, about 5.5 GB)")
    return (f"cannot load the VLM {model!r} (a local path, or a hub id whose files are already in the local "
            f"cache): {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

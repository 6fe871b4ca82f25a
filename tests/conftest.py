"""Shared fixtures. Nothing in the suite may reach a model hub."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two BLAS threads on a shared 2-core machine slow small linear algebra down tenfold.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Passphrases the nodes store (the key authority's, in a simulation) go to a directory of this session.
_SECRETS = tempfile.TemporaryDirectory(prefix="secure-mor-secrets-")
os.environ.setdefault("SECURE_MOR_SECRETS_DIR", _SECRETS.name)

import pytest  # noqa: E402
import torch  # noqa: E402

from secure_mor.data import FederatedData, SplitConfig, build_federated_data, vocabulary_texts  # noqa: E402
from secure_mor.policy import SFTSettings, run_sft  # noqa: E402
from secure_mor.vlm import build_tiny_vlm, save_policy  # noqa: E402

# ChatML turns with an image placeholder, as Qwen2-class chat templates render them.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


OWN_FAMILIES = ("count", "side", "size")  # none of them easy-VQA's


def own_families_vqa(root: Path, images: dict[str, int], long_answers: bool = False) -> Path:
    """A VQA dataset unlike easy-VQA, saved with `save_to_disk` (what a user's `--dataset` holds): squares
    on a 32x32 image, one question per family per image ("How many squares are there?" two; "Which side
    are the squares on?" left; "How big are the squares?" small), `family` given. With `long_answers`
    every answer is a sentence ("there are two squares")."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image, ImageDraw

    words = {"count": ["one", "two", "three"], "side": ["left", "right"], "size": ["small", "large"]}
    questions = {"count": "How many squares are there?", "side": "Which side are the squares on?",
                 "size": "How big are the squares?"}
    long_form = {"count": "there are {} squares", "side": "they are on the {}", "size": "the squares are {}"}
    splits = {}
    for split, n in images.items():
        rows: dict[str, list] = {"image": [], "question": [], "answer": [], "family": [], "image_id": []}
        for i in range(n):
            count, side, size = i % 3, (i // 3) % 2, (i // 6) % 2
            image = Image.new("RGB", (32, 32), "white")
            draw, width = ImageDraw.Draw(image), 4 + 4 * size
            for j in range(count + 1):
                x, y = 2 + 16 * side, 2 + j * (width + 2)
                draw.rectangle([x, y, x + width, y + width], fill="black")
            path = root / f"{split}-{i}.png"
            image.save(path)
            for family, answer in (("count", words["count"][count]), ("side", words["side"][side]),
                                   ("size", words["size"][size])):
                rows["image"].append(str(path))
                rows["question"].append(questions[family])
                rows["answer"].append(long_form[family].format(answer) if long_answers else answer)
                rows["family"].append(family)
                rows["image_id"].append(f"{split}/{i}")
        features = Features({"image": ImageFeature(), **{c: Value("string") for c in rows if c != "image"}})
        splits[split] = Dataset.from_dict(rows, features=features)
    DatasetDict(splits).save_to_disk(root / "dataset")
    return root / "dataset"


@pytest.fixture(scope="session")
def own_families_dataset(tmp_path_factory) -> Path:
    """`own_families_vqa` large enough for a tiny alignment run (600 training images, 60 test images)."""
    return own_families_vqa(tmp_path_factory.mktemp("own-families"), {"train": 600, "test": 60})


@pytest.fixture(scope="session")
def federated() -> FederatedData:
    """The default federated split of easy-VQA (seed 0)."""
    return build_federated_data(SplitConfig())


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, federated):
    """The untrained tiny VLM, saved."""
    model, processor = build_tiny_vlm(vocabulary_texts(federated))
    return save_policy(model, processor, tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture(scope="session")
def warm_policy(tmp_path_factory, federated):
    """A very short SFT warm start: it answers in words, greedily "no" to every question."""
    torch.set_num_threads(1)
    model, processor = build_tiny_vlm(vocabulary_texts(federated))
    root = tmp_path_factory.mktemp("warm")
    settings = SFTSettings(examples=960, epochs=1.0, learning_rate=2e-3, vision_epochs=0, sentence_rate=0.0)
    run_sft(model, processor, federated.sft, settings, root)
    return save_policy(model, processor, root / "policy")


@pytest.fixture(scope="session")
def siglip_qwen2_policy(tmp_path_factory, federated):
    """A VLM not built by secure_mor.vlm: LLaVA with a SigLIP tower, a Qwen2 text model, a byte-level BPE
    tokenizer and a ChatML template, random weights, saved (what a user's `--model` directory holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    bpe.train_from_iterator(vocabulary_texts(federated) + ["user assistant"], trainers.BpeTrainer(
        vocab_size=800, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=CHATML)
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_policy(model, processor, tmp_path_factory.mktemp("siglip-qwen2") / "policy")

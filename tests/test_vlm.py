import torch
from PIL import Image

from secure_mor.data import assistant_turn, user_prompt, vocabulary_texts
from secure_mor.vlm import TinyVLMConfig, build_tiny_vlm, load_policy, save_policy

TEXTS = ["what color is the shape?", "The color is red.", "Yes, it is.", "is there a circle?", "blue", "no"]


def test_tokenizer_round_trips_text_and_the_chat_template_is_prefix_consistent():
    _, processor = build_tiny_vlm(TEXTS)
    tokenizer = processor.tokenizer
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    prompt = processor.apply_chat_template(
        user_prompt("is there a circle?"), add_generation_prompt=True, tokenize=False
    )
    full = processor.apply_chat_template(
        user_prompt("is there a circle?") + assistant_turn("Yes, it is."), tokenize=False
    )
    assert full.startswith(prompt) and full.endswith("</s>")
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert tokenizer(full)["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.unk_token_id not in tokenizer(full)["input_ids"]


def test_builds_offline_and_round_trips_save_load_with_identical_logits(tmp_path, federated):
    model, processor = build_tiny_vlm(vocabulary_texts(federated), TinyVLMConfig(seed=1))
    path = save_policy(model, processor, tmp_path / "policy")
    loaded, loaded_processor = load_policy(path)
    assert type(loaded) is type(model)
    prompt = processor.apply_chat_template(
        user_prompt("what color is the shape?"), add_generation_prompt=True, tokenize=False
    )
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    inputs = processor(text=[prompt] * 2, images=images, return_tensors="pt", padding=True)
    again = loaded_processor(text=[prompt] * 2, images=images, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    assert torch.equal(inputs["pixel_values"], again["pixel_values"])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)
    # the image reaches the language model: two images, two different answers' logits
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1])


def _qwen2_vl_files(path):
    """The config and processor files of a Qwen2-VL (a processor with a video slot), no weights."""
    import json

    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor

    from secure_mor.vlm import build_tokenizer

    build_tokenizer(TEXTS).save_pretrained(path)
    Qwen2VLConfig().save_pretrained(path)
    Qwen2VLImageProcessor().save_pretrained(path)
    config = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**config, "processor_class": "Qwen2VLProcessor"}))
    return path


def test_align_refuses_a_bad_model_or_one_needing_a_missing_extra_in_one_sentence_before_flower(tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from secure_mor.cli import app

    def refused(command: str, model) -> str:
        result = CliRunner().invoke(app, [command, "--out", str(tmp_path / "run"), "--model", str(model)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        return " ".join(result.output.split())  # the console wraps long lines

    assert f"error: no saved VLM at '{tmp_path / 'nope'}': no such directory" in refused("align", tmp_path / "nope")
    assert "it has no config.json" in refused("demo", tmp_path)
    video = _qwen2_vl_files(tmp_path / "qwen2-vl")
    if importlib.util.find_spec("torchvision") is None:
        said = refused("align", video)
        assert "needs torchvision, which is not installed: install the extra with" in said
        assert "'.[video-processors]'" in said
    assert not (tmp_path / "run").exists()  # refused before any work

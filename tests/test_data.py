from collections import Counter
from dataclasses import replace

import pytest
from conftest import OWN_FAMILIES, own_families_vqa
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from secure_mor.data import (
    ANSWER_STYLES,
    FAMILIES,
    ClientDataConfig,
    DatasetError,
    SplitConfig,
    answer_groups,
    build_federated_data,
    column,
    default_clients,
    easy_vqa_answers,
    load_easy_vqa,
    load_hf_vqa,
    question_family,
    sentence_style_problem,
    styled_answer,
)


def test_easy_vqa_counts_and_answers():
    train, test = load_easy_vqa("train"), load_easy_vqa("test")
    assert (len(train), len(test)) == (38_575, 9_673)
    answers = easy_vqa_answers()
    assert len(answers) == 13
    assert set(column(train, "answer")) == set(answers) == set(column(test, "answer"))
    assert set(train.column_names) == {"image", "question", "answer", "family", "image_id"}
    image = train[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)


def test_family_is_derived_from_the_question_and_matches_the_answer_type(federated):
    train = load_easy_vqa("train")
    by_family: dict[str, set[str]] = {}
    for family, answer in zip(column(train, "family"), column(train, "answer"), strict=True):
        by_family.setdefault(family, set()).add(answer)
    assert by_family == {
        "presence": {"yes", "no"},
        "shape": {"circle", "rectangle", "triangle"},
        "color": {"black", "blue", "brown", "gray", "green", "red", "teal", "yellow"},
    }
    assert question_family("what colour is it?") == "color"
    assert question_family("how many?") == "other"


def _images_of(rows) -> set[str]:
    return set(column(rows, "image_id"))


def test_partitions_are_disjoint_by_image(federated):
    parts = [federated.sft, federated.prompt_pool, federated.calibration, *federated.clients]
    seen: set[str] = set()
    for part in parts:
        images = _images_of(part)
        assert images, "every part holds data"
        assert not images & seen
        seen |= images
    assert all(i.startswith("train/") for i in seen)
    assert all(i.startswith("test/") for i in _images_of(federated.evaluation))
    assert "answer" not in federated.prompt_pool.column_names  # the pool carries no labels


def test_split_is_deterministic_under_a_seed(federated):
    again = build_federated_data(SplitConfig(seed=0))
    other = build_federated_data(SplitConfig(seed=1))
    for a, b in zip(federated.clients, again.clients, strict=True):
        assert column(a, "image_id") == column(b, "image_id")
        assert column(a, "chosen_text") == column(b, "chosen_text")
    assert column(federated.clients[0], "image_id") != column(other.clients[0], "image_id")


@pytest.mark.parametrize("skew", [0.5, 0.9])
def test_clients_are_non_iid_as_configured(skew):
    clients = tuple(ClientDataConfig(family=f) for f in ("color", "shape", "presence", "shape"))
    data = build_federated_data(SplitConfig(clients=clients, skew=skew, pairs_per_client=300, seed=3))
    assert len(data.clients) == 4
    for pairs, client in zip(data.clients, clients, strict=True):
        counts = Counter(column(pairs, "family"))
        assert len(pairs) == 300
        assert counts[client.family] == round(skew * 300)
        others = [counts[f] for f in FAMILIES if f != client.family]
        assert max(others) - min(others) <= 1  # the rest is spread evenly


def test_annotations_rank_every_answer_of_the_family(federated):
    by_style = {
        style: {styled_answer(a, f, style): (f, a) for f, answers in federated.answers.items() for a in answers}
        for style in ANSWER_STYLES
    }
    for annotations, client in zip(federated.clients, federated.config.clients, strict=True):
        other_style_rows = 0
        for row in annotations.select(range(400)):
            family, chosen = row["family"], row["chosen_text"]
            style = next(s for s in ANSWER_STYLES if chosen in by_style[s])
            rejected = [by_style[s].get(t) for t in row["rejected_texts"] for s in ANSWER_STYLES if t in by_style[s]]
            # every other answer of the family, in the row's style, is ranked below the chosen one
            same_family = {a for t in row["rejected_texts"] if t in by_style[style]
                           for f, a in [by_style[style][t]] if f == family}
            assert same_family == set(federated.answers[family]) - {by_style[style][chosen][1]}
            assert sum(f != family for f, _ in rejected) == client.wrong_type  # wrong-type answers
            if style == client.style:  # the annotator prefers its own style: the other style ranks below
                other = styled_answer(by_style[style][chosen][1], family, {"word": "sentence",
                                                                          "sentence": "word"}[style])
                assert other in row["rejected_texts"]
            else:
                other_style_rows += 1
            assert isinstance(row["image"], Image.Image)
        assert abs(other_style_rows / 400 - client.other_style_rate) < 0.07, other_style_rows
    rates = [sum(column(p, "label_flipped")) / len(p) for p in federated.clients]
    for rate, client in zip(rates, federated.config.clients, strict=True):
        assert abs(rate - client.noise_rate) < 0.04
    styles = {c.style for c in federated.config.clients}
    assert styles == {"word", "sentence"}  # clients really differ


def test_calibration_pairs_and_objectives(federated):
    from secure_mor.data import calibration_set

    pairs = calibration_set(federated)
    assert set(pairs["objective"]) == {"correctness", "sentences"}
    for row in pairs.select(range(40)):
        assert row["chosen_text"] != row["rejected_text"]
        if row["objective"] == "sentences":  # a sentence beats its one word, or a wrong sentence
            assert len(row["chosen_text"].split()) >= 3


def _tiny_vqa(n: int, tmp_path, broken_row: int | None = None) -> Dataset:
    colors = ["red", "blue", "green"]
    images, questions, answers = [], [], []
    for i in range(n):
        color = colors[i % 3]
        path = tmp_path / f"{i}.png"
        if i == broken_row:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (32, 32), color).save(path)
        images.append(str(path))
        questions.append("what color is the image?" if i % 2 else "is the image red?")
        answers.append(color if i % 2 else ("yes" if color == "red" else "no"))
    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string")})
    return Dataset.from_dict({"image": images, "question": questions, "answer": answers}, features=features)


def test_generic_adapter_on_a_saved_hf_dataset(tmp_path):
    DatasetDict({"train": _tiny_vqa(120, tmp_path), "test": _tiny_vqa(30, tmp_path)}).save_to_disk(tmp_path / "ds")
    train = load_hf_vqa(tmp_path / "ds", "train")
    test = load_hf_vqa(tmp_path / "ds", "test")
    assert set(column(train, "family")) == {"color", "presence"}
    clients = (ClientDataConfig(family="color"), ClientDataConfig(family="presence", style="sentence"))
    data = build_federated_data(
        SplitConfig(clients=clients, pairs_per_client=20, calibration_pairs=6, eval_per_family=5), train, test
    )
    assert [len(c) for c in data.clients] == [20, 20]
    assert len(data.evaluation) == 10
    assert data.answers["color"] == ["blue", "green", "red"]


def test_generic_adapter_on_a_parquet_file(tmp_path):
    _tiny_vqa(12, tmp_path).to_parquet(tmp_path / "vqa.parquet")
    rows = load_hf_vqa(tmp_path / "vqa.parquet")
    assert len(rows) == 12 and isinstance(rows[0]["image"], Image.Image)


def test_bad_datasets_raise_the_documented_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_hf_vqa(tmp_path / "nowhere")
    _tiny_vqa(6, tmp_path).remove_columns("answer").save_to_disk(tmp_path / "no_answer")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['answer'\]"):
        load_hf_vqa(tmp_path / "no_answer")
    _tiny_vqa(6, tmp_path).select([]).save_to_disk(tmp_path / "empty")
    with pytest.raises(DatasetError, match="empty"):
        load_hf_vqa(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    _tiny_vqa(6, broken, broken_row=4).cast_column("image", ImageFeature(decode=False)).save_to_disk(tmp_path / "bad")
    with pytest.raises(DatasetError, match="row 4: unreadable image"):
        load_hf_vqa(tmp_path / "bad")
    DatasetDict({"train": _tiny_vqa(6, tmp_path)}).save_to_disk(tmp_path / "only_train")
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_hf_vqa(tmp_path / "only_train", "test")


def test_clients_specialise_in_the_datasets_own_families(tmp_path):
    source = own_families_vqa(tmp_path, {"train": 300, "test": 30})
    train, test = load_hf_vqa(source, "train"), load_hf_vqa(source, "test")
    split = SplitConfig(clients=default_clients(4), pairs_per_client=20, calibration_pairs=60, eval_per_family=5)
    data = build_federated_data(split, train, test)
    assert data.families == OWN_FAMILIES
    # client k: the dataset's family k (mod 3), most of its annotations from it
    assert [c.family for c in data.config.clients] == [*OWN_FAMILIES, OWN_FAMILIES[0]]
    for annotations, client in zip(data.clients, data.config.clients, strict=True):
        counts = Counter(column(annotations, "family"))
        assert counts[client.family] == round(split.skew * 20) and set(counts) == set(OWN_FAMILIES)
    # the sentence style and the negatives are the dataset's own answers
    row = next(r for r in data.clients[1] if not r["label_flipped"] and r["chosen_text"].startswith("The answer"))
    answer = row["chosen_text"].removeprefix("The answer is ").rstrip(".")
    assert answer in data.answers[row["family"]]
    wrong = {styled_answer(a, row["family"], "sentence") for a in data.answers[row["family"]] if a != answer}
    assert wrong <= set(row["rejected_texts"])
    assert sentence_style_problem(data.answers) is None
    assert set(data.evaluation["family"]) == set(OWN_FAMILIES) and len(data.evaluation) == 15
    with pytest.raises(DatasetError, match="'color', a family the dataset does not have"):
        build_federated_data(replace(split, clients=(ClientDataConfig(family="color"),)), train, test)


def test_the_sentences_style_is_refused_where_the_answers_are_sentences_already(tmp_path):
    source = own_families_vqa(tmp_path, {"train": 6}, long_answers=True)
    rows = load_hf_vqa(source, "train")
    problem = sentence_style_problem(answer_groups(column(rows, "answer"), column(rows, "family")))
    assert "6 of the dataset's answers are already sentences (for example 'the squares are small')" in problem

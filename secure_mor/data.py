"""Data: easy-VQA (shipped by the `easy-vqa` package) or any Hugging Face VQA
dataset, and the federated splits built on top of it.

Every dataset here has the columns `image` (PIL), `question`, `answer`,
`family` and `image_id`. The federated split partitions the training *images*
(so an image, and every question about it, belongs to exactly one party) into:
the server's SFT slice, the server's public prompt pool, the server's public
calibration set and one private partition per client. Client partitions are
non-IID: a fraction `skew` of each client's questions comes from its own
question family.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from secure_mor.protocol import OBJECTIVES

FAMILIES = ("color", "shape", "presence")  # easy-VQA's; another dataset brings its own (FederatedData.families)
OTHER_FAMILY = "other"
REQUIRED_COLUMNS = ("image", "question", "answer")
ANSWER_STYLES = ("word", "sentence")
_YES_NO_OPENERS = {"is", "are", "does", "do", "can", "was", "were", "has", "have"}
YES_NO = ("yes", "no")


class DatasetError(ValueError):
    """A dataset cannot be used: the message names the column, row or split at fault."""


def question_family(question: str) -> str:
    """The alignment-relevant type of a question: presence (yes/no), color or shape."""
    words = question.lower().strip().rstrip("?").split()
    if not words:
        return OTHER_FAMILY
    if words[0] in _YES_NO_OPENERS:
        return "presence"
    if "color" in words or "colour" in words:
        return "color"
    if "shape" in words:
        return "shape"
    return OTHER_FAMILY


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, single spaces: the exact-match form."""
    table = str.maketrans({c: " " for c in string.punctuation})
    return " ".join(text.lower().translate(table).split())


def ordered_families(families: Iterable[str]) -> tuple[str, ...]:
    """Distinct families in a stable order: easy-VQA's in their usual order, then any other, sorted."""
    present = set(families)
    return tuple(f for f in FAMILIES if f in present) + tuple(sorted(present - set(FAMILIES)))


def column(rows: Dataset, name: str) -> list[Any]:
    """One column as a plain list (much faster than iterating datasets' lazy column)."""
    return rows.with_format("arrow")[name].to_pylist()


def _features() -> Features:
    return Features(
        {
            "image": ImageFeature(),
            "question": Value("string"),
            "answer": Value("string"),
            "family": Value("string"),
            "image_id": Value("string"),
        }
    )


# ---------------------------------------------------------------- easy-VQA


def load_easy_vqa(split: str) -> Dataset:
    """easy-VQA's `train` (38,575 questions) or `test` (9,673) split, as shipped."""
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise DatasetError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    return Dataset.from_dict(
        {
            "image": [paths[i] for i in image_ids],  # decoded lazily by the Image feature
            "question": list(questions),
            "answer": list(answers),
            "family": [question_family(q) for q in questions],
            "image_id": [f"{split}/{i}" for i in image_ids],
        },
        features=_features(),
    )


def easy_vqa_answers() -> list[str]:
    import easy_vqa

    return list(easy_vqa.get_answers())


# ------------------------------------------------------- generic HF adapter


def load_hf_vqa(source: str | Path, split: str | None = None, check_images: bool = True) -> Dataset:
    """Any Hugging Face dataset with columns image/question/answer (family
    optional), from a `save_to_disk` directory or from local data files
    (parquet, json, csv, arrow; a directory is handed to `datasets.load_dataset`).

    Raises DatasetError naming the problem: missing source, split or column,
    an empty split, a row whose image cannot be read.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"dataset source {source} does not exist")
    try:
        if (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(source))
        elif source.is_file():
            builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
            if source.suffix not in builder:
                raise DatasetError(f"cannot read {source}: unsupported file type {source.suffix!r}")
            loaded = datasets.load_dataset(builder[source.suffix], data_files=str(source))
        else:
            loaded = datasets.load_dataset(str(source))
    except DatasetError:
        raise
    except Exception as err:  # datasets raises many types; name the source and the cause
        raise DatasetError(f"cannot load dataset from {source}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or ("train" if "train" in loaded else next(iter(loaded), None))
        if chosen not in loaded:
            raise DatasetError(f"{source} has no split {chosen!r}; it has {sorted(loaded)}")
        dataset = loaded[chosen]
    else:
        dataset = loaded
    return _conform(dataset, str(source), check_images)


def _conform(dataset: Dataset, name: str, check_images: bool) -> Dataset:
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DatasetError(
            f"{name}: missing column(s) {missing}; a VQA dataset needs {list(REQUIRED_COLUMNS)} "
            f"(it has {dataset.column_names})"
        )
    if len(dataset) == 0:
        raise DatasetError(f"{name}: the split is empty")
    if not isinstance(dataset.features["image"], ImageFeature):
        dataset = dataset.cast_column("image", ImageFeature())
    if "family" not in dataset.column_names:
        dataset = dataset.map(lambda row: {"family": question_family(row["question"])}, desc="families")
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", [f"{name}/{i}" for i in range(len(dataset))])
    dataset = dataset.select_columns(list(_features())).cast(_features())
    if check_images:
        raw = dataset.cast_column("image", ImageFeature(decode=False))
        for index, image in enumerate(raw["image"]):
            try:
                _open_image(image)
            except Exception as err:
                raise DatasetError(f"{name}: row {index}: unreadable image ({err})") from err
    return dataset


def _open_image(encoded: dict[str, Any]) -> None:
    import io

    if encoded.get("bytes"):
        Image.open(io.BytesIO(encoded["bytes"])).load()
    elif encoded.get("path"):
        Image.open(encoded["path"]).load()
    else:
        raise ValueError("no image bytes or path")


# ----------------------------------------------------------- preference pairs


def encoded_images(rows: Dataset) -> list[dict[str, Any]]:
    """The image column undecoded (path or bytes), to copy images without re-encoding them."""
    return column(rows, "image")


def answer_groups(answers: Iterable[str], families: Iterable[str]) -> dict[str, list[str]]:
    """Answers seen per family: a rejected answer is drawn from the same group."""
    groups: dict[str, set[str]] = {}
    for answer, family in zip(answers, families, strict=True):
        groups.setdefault(family, set()).add(answer)
    return {family: sorted(values) for family, values in groups.items()}


_SENTENCES = {
    "color": "The color is {a}.",
    "shape": "The shape is a {a}.",
    "presence": "{A}, it is.",
    OTHER_FAMILY: "The answer is {a}.",
}


_OTHER_STYLE = {"word": "sentence", "sentence": "word"}
_NON_ANSWERS = ("", ".", "?", ",")  # what a policy's sample may hold instead of an answer


def styled_answer(answer: str, family: str, style: str) -> str:
    """An answer in a client's annotation style: one word, or a short sentence."""
    if style == "word":
        return answer
    if style == "sentence":
        return _SENTENCES.get(family, _SENTENCES[OTHER_FAMILY]).format(a=answer, A=answer.capitalize())
    raise ValueError(f"unknown answer style {style!r}; expected one of {ANSWER_STYLES}")


def is_sentence(completion: str) -> bool:
    """The `sentences` objective's style: a full sentence ("The color is red.", "Yes, it is."), not one word."""
    return len(normalize_text(completion).split()) >= 3


def sentence_style_problem(answers: dict[str, list[str]]) -> str | None:
    """Why the `sentences` objective cannot be told from `correctness` on a dataset (None: it can): an
    answer that is already a sentence (`is_sentence`) in its one-word form has no second style."""
    long = sorted(a for values in answers.values() for a in values if is_sentence(a))
    if not long:
        return None
    return (f"{len(long)} of the dataset's answers are already sentences (for example {long[0]!r}): the "
            f"`sentences` style cannot be told apart from a plain answer; use the objective `correctness`")


def user_prompt(question: str) -> list[dict[str, Any]]:
    """A conversational prompt with one image, in TRL's format."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def assistant_turn(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


_TEXT_LIST = datasets.Sequence(Value("string"))


def _annotation_features() -> Features:
    return Features(
        {
            "image": ImageFeature(),
            "question": Value("string"),
            "chosen_text": Value("string"),
            "rejected_texts": _TEXT_LIST,
            "family": Value("string"),
            "image_id": Value("string"),
            "label_flipped": Value("bool"),
        }
    )


def make_annotations(
    rows: Dataset,
    groups: dict[str, list[str]],
    *,
    style: str = "word",
    noise_rate: float = 0.0,
    other_style_rate: float = 0.0,
    wrong_type: int = 2,
    non_answers: int = 2,
    seed: int = 0,
) -> Dataset:
    """One annotation per question: the answer the annotator ranks first (`chosen_text`) and
    the answers it ranks below it (`rejected_texts`). One row is one annotation, the privacy
    unit of DP training.

    The rejected answers are every other answer of the question's family (a reward model that
    saw one random wrong answer per question learns answer priors: measured, its argmax was
    the same answer for 74-100 % of images), `wrong_type` answers of other families and
    `non_answers` texts that answer nothing (empty, punctuation, a word of the question): a
    policy's samples make such mistakes, and a reward model that never saw one is exploited by
    them (measured: GRPO on models trained without non-answers learnt to answer "."). In a row
    written in the annotator's own `style`, the true answer in the other style ranks below
    too (an annotator prefers answers in its own style). With probability `other_style_rate`
    a row is written in the other style (no style preference in it), and with probability
    `noise_rate` the annotator ranks a wrong answer of the family first.
    """
    if not 0.0 <= noise_rate < 0.5:
        raise ValueError(f"noise_rate must be in [0, 0.5), got {noise_rate}")
    if not 0.0 <= other_style_rate <= 1.0 or wrong_type < 0:
        raise ValueError("other_style_rate must lie in [0, 1] and wrong_type be >= 0")
    rng = random.Random(seed)
    other_style = _OTHER_STYLE[style]
    chosen, rejected, flipped = [], [], []
    for question, answer, family in zip(column(rows, "question"), column(rows, "answer"), column(rows, "family"),
                                        strict=True):
        alternatives = [a for a in groups.get(family, []) if a != answer]
        if not alternatives:
            raise DatasetError(f"family {family!r} has a single answer {answer!r}: no rejected answer to draw")
        row_style = other_style if rng.random() < other_style_rate else style
        wrong = [(a, f) for f in sorted(groups) if f != family for a in groups[f]]
        first = answer
        if rng.random() < noise_rate:
            first = rng.choice(alternatives)
            alternatives = [a for a in groups[family] if a != first]
        ranked_below = [styled_answer(a, family, row_style) for a in alternatives]
        ranked_below += [styled_answer(a, f, row_style) for a, f in rng.sample(wrong, min(wrong_type, len(wrong)))]
        answer_words = {w for values in groups.values() for a in values for w in normalize_text(a).split()}
        blanks = [*_NON_ANSWERS, *sorted(set(normalize_text(question).split()) - answer_words)]
        ranked_below += rng.sample(blanks, min(non_answers, len(blanks)))
        if row_style == style:
            ranked_below.append(styled_answer(first, family, other_style))
        chosen.append(styled_answer(first, family, row_style))
        rejected.append(ranked_below)
        flipped.append(first != answer)
    return _annotation_rows(rows, chosen, rejected, flipped)


def _annotation_rows(rows: Dataset, chosen: list[str], rejected: list[list[str]], flipped: list[bool]) -> Dataset:
    """The annotation schema (ANNOTATION_COLUMNS) over the VQA `rows` the texts were written for."""
    return Dataset.from_dict(
        {
            "image": encoded_images(rows),
            "question": column(rows, "question"),
            "chosen_text": chosen,
            "rejected_texts": rejected,
            "family": column(rows, "family"),
            "image_id": column(rows, "image_id"),
            "label_flipped": flipped,
        },
        features=_annotation_features(),
    )


def make_preference_pairs(
    rows: Dataset,
    groups: dict[str, list[str]],
    *,
    style: str = "word",
    noise_rate: float = 0.0,
    cross_family_rate: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """One pair per question, in the annotation schema with a single rejected answer:
    chosen = the true answer, rejected = another answer of the same family (with probability
    `cross_family_rate` one of another family instead), both in `style`; with probability
    `noise_rate` the two are swapped. Used for the public calibration set (the router's
    Bradley-Terry loss is pairwise), held-out pairwise accuracy and the audit's canaries."""
    if not 0.0 <= noise_rate < 0.5:
        raise ValueError(f"noise_rate must be in [0, 0.5), got {noise_rate}")
    if not 0.0 <= cross_family_rate <= 1.0:
        raise ValueError("cross_family_rate must lie in [0, 1]")
    rng = random.Random(seed)
    chosen, rejected, flipped = [], [], []
    for answer, family in zip(column(rows, "answer"), column(rows, "family"), strict=True):
        alternatives = [a for a in groups.get(family, []) if a != answer]
        if not alternatives:
            raise DatasetError(f"family {family!r} has a single answer {answer!r}: no rejected answer to draw")
        others = [f for f in groups if f != family and groups[f]]
        good = styled_answer(answer, family, style)
        if others and rng.random() < cross_family_rate:
            wrong_family = rng.choice(sorted(others))
            bad = styled_answer(rng.choice(groups[wrong_family]), wrong_family, style)
        else:
            bad = styled_answer(rng.choice(alternatives), family, style)
        swap = rng.random() < noise_rate
        chosen.append(bad if swap else good)
        rejected.append([good if swap else bad])
        flipped.append(swap)
    return _annotation_rows(rows, chosen, rejected, flipped)


# ----------------------------------------------------------- federated split


@dataclass(frozen=True)
class ClientDataConfig:
    """One institution's private annotations (`make_annotations`): the family it specialises in (None:
    assigned from the dataset's families when the split is built, `assign_families`), its answer style
    (and how often it writes in the other), its label-noise rate, how many wrong-type answers each
    annotation ranks."""

    family: str | None = None
    style: str = "word"
    noise_rate: float = 0.05
    wrong_type: int = 2
    other_style_rate: float = 0.25


def default_clients(num_clients: int = 3) -> tuple[ClientDataConfig, ...]:
    """Client k specialises in the dataset's family k (mod the number of families, `assign_families`);
    odd clients annotate in sentences."""
    return tuple(
        ClientDataConfig(style=ANSWER_STYLES[k % 2], noise_rate=0.05 + 0.05 * k) for k in range(num_clients)
    )


def assign_families(clients: Sequence[ClientDataConfig], families: Sequence[str]) -> tuple[ClientDataConfig, ...]:
    """Each client with its family: client k without one takes `families[k mod len(families)]`; a named
    family the dataset does not have is an error (that client would be nobody's specialist)."""
    assigned = []
    for k, client in enumerate(clients):
        if client.family is None:
            client = replace(client, family=families[k % len(families)])
        elif client.family not in families:
            raise DatasetError(f"client {k} specialises in {client.family!r}, a family the dataset does not have "
                               f"(it has {list(families)})")
        assigned.append(client)
    return tuple(assigned)


@dataclass(frozen=True)
class SplitConfig:
    """How the training split is divided between the server and the clients.

    Fractions are of the training *images*; the client share is divided equally.
    `pairs_per_client` questions are then drawn from each client's images, a
    fraction `skew` of them from the client's own family (fewer if its images
    do not hold enough).
    """

    clients: tuple[ClientDataConfig, ...] = field(default_factory=default_clients)
    skew: float = 0.8
    pairs_per_client: int = 800
    sft_image_fraction: float = 0.2
    pool_image_fraction: float = 0.1
    # Router training may use each calibration pair in one step only (repeated
    # fused releases of the same items would reveal every client's margins), so
    # the calibration set must be large enough for all router steps: 3,000 pairs
    # for 30 steps of 96 (with 15 the router's colour weights still depended on the
    # order of the batches: 0.02-0.68 on the colour specialist; with 30, 0.62-0.85).
    calibration_image_fraction: float = 0.2
    calibration_pairs: int = 3000
    # Public questions the clients warm-start on (data.public_annotations). Images apart from the
    # calibration set's: a router calibrated on the questions the clients trained on sees every
    # client fit them and cannot tell the specialists (measured: it put 0.70 on the presence
    # model for colour questions). A cap per family of a third of `public_annotations`: with 6,000, every
    # public colour and shape question at the default fraction (about 500 each) and 2,000 presence ones.
    # The presence client learns to compare the image with the question from many of them (seed 0,
    # epsilon 4, top-1): 0.975 with 2,000, 0.855 with 1,267; with 500 (the former 1,500) it never did.
    public_image_fraction: float = 0.1
    public_annotations: int = 6000
    eval_per_family: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("at least one client is needed")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {self.skew}")
        server = (self.sft_image_fraction + self.pool_image_fraction + self.calibration_image_fraction
                  + self.public_image_fraction)
        if not 0.0 < server < 1.0:
            raise ValueError(f"server image fractions must sum to (0, 1), got {server}")


@dataclass
class FederatedData:
    """Everything the parties hold, built deterministically from a SplitConfig."""

    config: SplitConfig
    sft: Dataset  # server: supervised warm start (image, question, answer)
    prompt_pool: Dataset  # server: public prompts for GRPO (no answers)
    calibration: Dataset  # server: public preference pairs for the router
    clients: list[Dataset]  # client k: private annotations
    evaluation: Dataset  # held out (test split), stratified per family
    answers: dict[str, list[str]]  # answer set per family
    # Public questions with answers (image, question, answer, family), stratified per family: what every
    # client warm-starts on (data.public_annotations).
    public: Dataset | None = None
    families: tuple[str, ...] = FAMILIES  # the training split's question families (`ordered_families`)
    # The prompt pool's true answers, aligned with its rows: for the oracle diagnostic only (it calibrates
    # the alignment stage with a reward that reads the answers); no party of the protocol holds them.
    pool_answers: list[str] = field(default_factory=list)


def _shuffled_image_partition(image_ids: Sequence[str], fractions: Sequence[float], seed: int) -> list[set[str]]:
    unique = sorted(set(image_ids))
    random.Random(seed).shuffle(unique)
    bounds, start, parts = [], 0.0, []
    for fraction in fractions:
        bounds.append((start, start + fraction))
        start += fraction
    for low, high in bounds:
        parts.append(set(unique[round(low * len(unique)) : round(high * len(unique))]))
    return parts


def _indices_by_image(image_ids: Sequence[str], images: set[str]) -> list[int]:
    return [i for i, image in enumerate(image_ids) if image in images]


def stratified_indices(rows: Dataset, per_family: int, seed: int) -> list[int]:
    """Up to `per_family` random rows of each family (all of a smaller family), in order."""
    rng = random.Random(seed)
    chosen: list[int] = []
    by_family: dict[str, list[int]] = {}
    for index, family in enumerate(column(rows, "family")):
        by_family.setdefault(family, []).append(index)
    for family in sorted(by_family):
        indices = by_family[family]
        chosen += rng.sample(indices, min(per_family, len(indices)))
    return sorted(chosen)


def _client_indices(
    families: Sequence[str], candidates: list[int], own: str, count: int, skew: float, rng: random.Random
) -> list[int]:
    own_pool = [i for i in candidates if families[i] == own]
    other_pool = [i for i in candidates if families[i] != own]
    rng.shuffle(own_pool)
    rng.shuffle(other_pool)
    n_own = min(round(skew * count), len(own_pool))
    n_other = min(count - n_own, len(other_pool))
    # Other families are drawn evenly, not in proportion to their (very unequal) sizes.
    by_family: dict[str, list[int]] = {}
    for i in other_pool:
        by_family.setdefault(families[i], []).append(i)
    others: list[int] = []
    while len(others) < n_other and any(by_family.values()):
        for family in sorted(by_family):
            if by_family[family] and len(others) < n_other:
                others.append(by_family[family].pop())
    return sorted(own_pool[:n_own] + others)


def build_federated_data(
    config: SplitConfig | None = None, train: Dataset | None = None, test: Dataset | None = None
) -> FederatedData:
    """Deterministic federated split of `train` (default: easy-VQA's) and `test`."""
    config = config or SplitConfig()
    train = train if train is not None else load_easy_vqa("train")
    test = test if test is not None else load_easy_vqa("test")
    image_ids, families = column(train, "image_id"), column(train, "family")
    family_names = ordered_families(families)
    config = replace(config, clients=assign_families(config.clients, family_names))
    server_fractions = [config.sft_image_fraction, config.pool_image_fraction, config.calibration_image_fraction,
                        config.public_image_fraction]
    client_fraction = (1.0 - sum(server_fractions)) / len(config.clients)
    parts = _shuffled_image_partition(
        image_ids, server_fractions + [client_fraction] * len(config.clients), config.seed
    )
    groups = answer_groups(column(train, "answer"), families)
    sft = train.select(_indices_by_image(image_ids, parts[0]))
    pool = train.select(_indices_by_image(image_ids, parts[1]))
    pool_answers = column(pool, "answer")
    pool = pool.remove_columns("answer")
    calibration_rows = train.select(_indices_by_image(image_ids, parts[2]))
    calibration_rows = calibration_rows.select(
        stratified_indices(calibration_rows, -(-config.calibration_pairs // len(family_names)), config.seed)
    )
    calibration = make_preference_pairs(calibration_rows, groups, style="word", cross_family_rate=0.25,
                                        seed=config.seed)
    public = train.select(_indices_by_image(image_ids, parts[3]))
    public = public.select(stratified_indices(public, -(-config.public_annotations // len(family_names)), config.seed))
    clients = []
    for k, client in enumerate(config.clients):
        rng = random.Random(f"{config.seed}/client/{k}")
        candidates = _indices_by_image(image_ids, parts[4 + k])
        indices = _client_indices(families, candidates, client.family, config.pairs_per_client, config.skew, rng)
        if not indices:
            raise DatasetError(f"client {k} received no questions: too few training images")
        clients.append(
            make_annotations(
                train.select(indices),
                groups,
                style=client.style,
                noise_rate=client.noise_rate,
                wrong_type=client.wrong_type,
                other_style_rate=client.other_style_rate,
                seed=rng.randrange(2**31),
            )
        )
    evaluation = test.select(stratified_indices(test, config.eval_per_family, config.seed))
    parts_by_name = [("sft", sft), ("prompt pool", pool), ("calibration", calibration), ("public", public),
                     ("evaluation", evaluation)]
    for name, part in parts_by_name:
        if len(part) == 0:
            raise DatasetError(f"the {name} split is empty: enlarge its fraction or the dataset")
    return FederatedData(config, sft, pool, calibration, clients, evaluation, groups, public, family_names,
                         pool_answers)


def family_counts(rows: Dataset) -> dict[str, int]:
    return dict(sorted(Counter(column(rows, "family")).items()))


def vocabulary_texts(data: FederatedData) -> list[str]:
    """Every text the policy must be able to read or write (for its tokenizer)."""
    texts = column(data.sft, "question") + column(data.sft, "answer") + column(data.evaluation, "question")
    texts += column(data.prompt_pool, "question")
    for pairs in [data.calibration, *data.clients]:
        texts += column(pairs, "chosen_text") + [t for texts_ in column(pairs, "rejected_texts") for t in texts_]
    for family, answers in data.answers.items():
        texts += [styled_answer(a, family, s) for a in answers for s in ANSWER_STYLES]
    return texts


# ----------------------------------------------------------- an institution's own annotations

ANNOTATION_COLUMNS = ("image", "question", "chosen_text", "rejected_texts")


def save_annotations(annotations: Dataset, directory: Path) -> Path:
    """Write annotations (one row = one annotation, the privacy unit; `make_annotations`) where a
    client node reads its private data (node config `data-dir`): a `datasets` save_to_disk directory."""
    missing = [c for c in ANNOTATION_COLUMNS if c not in annotations.column_names]
    if missing:
        raise DatasetError(f"annotations need the columns {ANNOTATION_COLUMNS}; missing {missing}")
    annotations.save_to_disk(str(directory))
    return directory


def directory_digest(directory: Path) -> str:
    """SHA-256 over every file's relative path and bytes: which data a reward model was trained on."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def load_annotations(directory: Path) -> Dataset:
    """An institution's annotations from `directory` (`save_annotations`), checked: the columns a
    reward model trains on, at least one row, at least one rejected answer per row, readable images."""
    if not Path(directory).is_dir():
        raise DatasetError(f"no annotation data at {directory} (a `datasets` save_to_disk directory)")
    try:
        annotations = datasets.load_from_disk(str(directory))
    except (FileNotFoundError, ValueError) as err:
        raise DatasetError(f"cannot read annotation data at {directory}: {err}") from err
    if not isinstance(annotations, Dataset):
        raise DatasetError(f"{directory} holds several splits; save one Dataset of annotations")
    missing = [c for c in ANNOTATION_COLUMNS if c not in annotations.column_names]
    if missing:
        raise DatasetError(f"{directory}: annotations need the columns {ANNOTATION_COLUMNS}; missing {missing}")
    if len(annotations) == 0:
        raise DatasetError(f"{directory}: no annotations")
    empty = [i for i, texts in enumerate(column(annotations, "rejected_texts")) if not texts]
    if empty:
        raise DatasetError(f"{directory}: row {empty[0]} ranks no answer below its chosen one")
    for index, encoded in enumerate(annotations.cast_column("image", ImageFeature(decode=False))["image"]):
        try:
            _open_image(encoded)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad row
            raise DatasetError(f"{directory}: row {index}: unreadable image ({err})") from err
    return annotations


# ----------------------------------------------------------- the public calibration set


def calibration_set(data: FederatedData) -> Dataset:
    """The server's public calibration preferences, one objective per item (alternating):
    for "correctness" the pair as built by the split (true vs wrong answer, one word);
    for "sentences" (the true answer in a full sentence) the true answer as a sentence vs
    either the same answer as one word (style) or the pair's wrong answer as a sentence
    (correctness), alternately: the router must weigh both. The server and every client
    build the same set from the public split."""
    calibration = data.calibration
    answers, families = column(calibration, "chosen_text"), column(calibration, "family")
    rejected = [texts[0] for texts in column(calibration, "rejected_texts")]
    objectives, chosen_out, rejected_out = [], [], []
    for i, (answer, family) in enumerate(zip(answers, families, strict=True)):
        objective = OBJECTIVES[i % len(OBJECTIVES)]
        objectives.append(objective)
        if objective == "sentences":
            chosen_out.append(styled_answer(answer, family, "sentence"))
            wrong = rejected[i]
            style_pair = (i // len(OBJECTIVES)) % 2 == 0
            wrong_sentence = styled_answer(wrong, answer_family(wrong, data.answers), "sentence")
            rejected_out.append(answer if style_pair else wrong_sentence)
        else:
            chosen_out.append(answer)
            rejected_out.append(rejected[i])
    return Dataset.from_dict(
        {
            "image": column(calibration, "image"),
            "question": column(calibration, "question"),
            "family": families,
            "objective": objectives,
            "chosen_text": chosen_out,
            "rejected_text": rejected_out,
        },
        features=None,
    ).cast_column("image", calibration.features["image"])


def public_annotations(data: FederatedData, style: str, family: str | None = None, other_style_rate: float = 0.25,
                       seed: int = 0) -> Dataset:
    """The split's public questions (`FederatedData.public`) of `family` (None: every family) as annotations
    in `style` (`make_annotations`, no label noise): what a client may train on before its private data, at
    no privacy cost (public by the threat model, like the calibration set, whose images they do not share).

    A client warm-starts on its own family's questions: on every family's, the presence client's head
    (minilm-head) learns them all from public data alone (top-1 colour 1.0, shape 1.0, presence 0.91
    before any private row, seed 0), every client becomes the same generalist and the router has no
    specialist to find."""
    if data.public is None:
        raise DatasetError("this split has no public questions for the clients' warm start")
    rows = data.public
    if family is not None:
        rows = rows.select([i for i, f in enumerate(column(rows, "family")) if f == family])
        if len(rows) == 0:
            raise DatasetError(f"the split has no public {family} questions for the warm start")
    return make_annotations(rows, data.answers, style=style, other_style_rate=other_style_rate, seed=seed)


def answer_family(answer: str, answers: dict[str, list[str]]) -> str:
    """The family whose answer set holds `answer` (a wrong-type answer is styled as its own family's)."""
    return next((f for f, values in answers.items() if answer in values), OTHER_FAMILY)

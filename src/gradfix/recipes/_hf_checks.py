"""Checks of a Hugging Face model folder that keep ``transformers`` from building a wrong model.

``transformers`` builds the model from ``config.json`` and fills it from the weights: a layer the
weights lack is initialised at random, and a folder without tokenizer files gets a fallback
tokenizer that maps every word to ``[UNK]``. These checks refuse both, each with one line naming
the folder, the key and both values:

- :func:`check_config_against_weights` compares the config's layer count, hidden size,
  vocabulary size and feed-forward width with the tensor names and shapes of the weights
  (headers only, before ``transformers`` reads anything);
- :func:`check_loading_info` refuses what ``from_pretrained`` reports as missing, mismatched or
  (inside the model's own modules) unexpected;
- :func:`check_tokenizer_files` and :func:`check_tokenizer_size` refuse a folder without
  tokenizer files and a tokenizer far smaller than the embedding matrix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gradfix.errors import CheckpointError
from gradfix.io import open_checkpoint

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_INNER_KEYS = ("intermediate_size", "n_inner")
_EMBEDDINGS = ("word_embeddings.weight", "wte.weight", "embed_tokens.weight")
_LAYER = re.compile(r"^((?:.*?\.)?(?:layer|layers|h|block|blocks))\.(\d+)\.")  # the first numbered list
# feed-forward input projections: name suffix and the axis of their width ([out, in] or Conv1D)
_INNER = (
    ("intermediate.dense.weight", 0),
    ("mlp.up_proj.weight", 0),
    ("mlp.fc1.weight", 0),
    ("mlp.c_fc.weight", 1),
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json with merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
"""What counts as a usable tokenizer in a model folder (one of these)."""
_SINGLE_TOKENIZER_FILES = {n for n in TOKENIZER_FILES if " " not in n}
_MIN_TOKENIZER_SHARE = 0.5


def _read_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` as a mapping, or ``None`` when it is missing or unreadable."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers reports these itself
    return config if isinstance(config, dict) else None


def _config_int(config: Mapping[str, Any], keys: Sequence[str], where: Path) -> tuple[str, int] | None:
    """The first of ``keys`` that ``config`` sets (``null`` counts as unset), with its value."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{where}: {key} is {value!r}, not a positive integer")
        return key, value
    return None


def _layer_stacks(names: Iterable[str]) -> dict[str, set[int]]:
    """``{stack prefix: layer indices}`` of the numbered layers among ``names``."""
    stacks: dict[str, set[int]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            stacks.setdefault(match.group(1), set()).add(int(match.group(2)))
    return stacks


def _describe_layers(prefix: str, indices: set[int]) -> str:
    """``encoder.layer.0-1`` for contiguous indices from 0, else ``encoder.layer.{0, 2}``."""
    ordered = sorted(indices)
    if len(ordered) == 1:
        return f"{prefix}.{ordered[0]}"
    if ordered == list(range(len(ordered))):
        return f"{prefix}.0-{ordered[-1]}"
    return f"{prefix}.{{{', '.join(map(str, ordered))}}}"


def _first_with_suffix(shapes: Mapping[str, tuple[int, ...]], suffix: str) -> str | None:
    return next((n for n in shapes if n == suffix or n.endswith("." + suffix)), None)


def check_config_against_weights(folder: str | Path) -> None:
    """Raise a one-line :class:`CheckpointError` if ``config.json`` disagrees with the weights.

    Compared (when both sides have them): the layer count (``num_hidden_layers``/``n_layer``)
    with the numbered layers of the one layer stack, the hidden size (``hidden_size``/``n_embd``)
    and ``vocab_size`` with the word-embedding matrix, and the feed-forward width
    (``intermediate_size``/``n_inner``) with the first feed-forward projection. Only the headers of
    safetensors files are read (a pickled checkpoint is read whole, with ``weights_only=True``).
    """
    folder = Path(folder)
    config = _read_config(folder)
    if config is None:
        return
    where = folder / "config.json"
    with open_checkpoint(folder) as reader:
        shapes = reader.shapes()
    _check_layers(config, shapes, where)
    _check_embeddings(config, shapes, where)
    _check_inner(config, shapes, where)


def _check_layers(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: Path) -> None:
    claimed = _config_int(config, _LAYER_KEYS, where)
    stacks = _layer_stacks(shapes)
    if claimed is None or len(stacks) != 1:
        return  # no layer count, or several stacks (encoder-decoder): loading info decides
    prefix, indices = next(iter(stacks.items()))
    key, value = claimed
    if len(indices) != value:
        raise CheckpointError(
            f"{where}: {key} is {value} but the weights hold {len(indices)} layer"
            f"{'s' if len(indices) != 1 else ''} ({_describe_layers(prefix, indices)})"
        )


def _check_embeddings(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: Path) -> None:
    name = next((n for s in _EMBEDDINGS if (n := _first_with_suffix(shapes, s))), None)
    if name is None or len(shapes[name]) != 2:
        return
    rows, width = shapes[name]
    held = f"the weights' {name} is [{rows}, {width}]"
    hidden = _config_int(config, _HIDDEN_KEYS, where)
    factorised = config.get("embedding_size") is not None or config.get("word_embed_proj_dim") is not None
    if hidden is not None and not factorised and hidden[1] != width:
        raise CheckpointError(f"{where}: {hidden[0]} is {hidden[1]} but {held} (hidden size {width})")
    vocab = _config_int(config, ("vocab_size",), where)
    if vocab is not None and vocab[1] != rows:
        raise CheckpointError(f"{where}: vocab_size is {vocab[1]} but {held} ({rows} tokens)")


def _check_inner(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: Path) -> None:
    inner = _config_int(config, _INNER_KEYS, where)
    if inner is None:
        return
    for suffix, axis in _INNER:
        name = _first_with_suffix(shapes, suffix)
        if name is not None and len(shapes[name]) == 2:
            width = shapes[name][axis]
            if width != inner[1]:
                raise CheckpointError(
                    f"{where}: {inner[0]} is {inner[1]} but the weights' {name} is "
                    f"{list(shapes[name])} (feed-forward width {width})"
                )
            return


def _listed(names: Collection[str], limit: int = 3) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def check_loading_info(
    folder: Path, model: nn.Module, info: Mapping[str, Any], unused: Sequence[str] = ()
) -> None:
    """Refuse what ``from_pretrained(..., output_loading_info=True)`` reports as not loaded.

    Missing tensors (initialised at random; those starting with a prefix in ``unused`` are
    allowed: the recipe never reads them), tensors whose shape differs from the config's, and
    unexpected tensors inside the model's own modules (a head the model class has no place for,
    such as a classifier under ``AutoModel``, is allowed). Each is one line naming the tensors.
    """
    errors = [str(e).splitlines()[0] for e in info.get("error_msgs") or []]
    if errors:
        raise CheckpointError(f"{folder}: cannot load the weights: {errors[0]}")
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, held, built = mismatched[0]
        more = f" ({len(mismatched) - 1} more tensor(s) differ)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{folder}: tensor {key} is {list(held)} in the weights but config.json makes it "
            f"{list(built)}{more}"
        )
    missing = [k for k in info.get("missing_keys") or [] if not k.startswith(tuple(unused))]
    if missing:
        raise CheckpointError(
            f"{folder}: config.json describes {len(missing)} tensor(s) that the weights lack "
            f"({_listed(missing)}); they would be initialised at random"
        )
    modules = {name for name, _ in model.named_children()}
    stray = [k for k in info.get("unexpected_keys") or [] if k.split(".", 1)[0] in modules]
    if stray:
        raise CheckpointError(
            f"{folder}: the weights hold {len(stray)} tensor(s) that the model built from config.json "
            f"has no place for ({_listed(stray)})"
        )


def check_tokenizer_files(folder: Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``folder`` holds tokenizer files."""
    present = {p.name for p in folder.iterdir() if p.is_file()}
    if _SINGLE_TOKENIZER_FILES & present or {"vocab.json", "merges.txt"} <= present:
        return
    raise CheckpointError(
        f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
        "copy them from the model these weights come from"
    )


def check_tokenizer_size(folder: Path, model: nn.Module, tokenizer: Any) -> None:
    """Refuse a tokenizer with fewer than half as many tokens as the model's embedding has rows.

    A model of two towers (CLIP) has no input embedding of its own: its text tower's is read.
    """
    weight = _input_embedding(model)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return
    rows, size = int(weight.shape[0]), len(tokenizer)
    if size < _MIN_TOKENIZER_SHARE * rows:
        raise CheckpointError(
            f"{folder}: the tokenizer has {size} tokens but the model's embedding has {rows} rows; "
            "the tokenizer files do not belong to this model"
        )


def _input_embedding(model: nn.Module) -> Any:
    """The weight of the model's (or its text tower's) input embedding, or ``None``."""
    for owner in (model, getattr(model, "text_model", None)):
        getter = getattr(owner, "get_input_embeddings", None)
        try:
            embedding = getter() if callable(getter) else None
        except NotImplementedError:  # transformers: the class defines none
            continue
        return getattr(embedding, "weight", None)
    return None

"""How a sentence-transformers model folder turns token states into one sentence embedding.

A folder saved by ``sentence-transformers`` states its pipeline in ``modules.json`` (a
``Transformer``, a ``Pooling`` module and optionally ``Normalize``), the pooling mode in the
pooling module's ``config.json`` (``1_Pooling/config.json``) and the token limit and lower-casing
in ``sentence_bert_config.json``. :func:`read_sentence_config` reads them into a
:class:`SentenceConfig`; :func:`pool` applies the modes as the library does. A folder without
these files gets gradfix's default: mean pooling followed by L2 normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradfix.errors import CheckpointError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
"""The pooling modes of ``sentence_transformers.models.Pooling`` that gradfix applies."""

_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
"""The boolean keys of older pooling configs, in the order the library concatenates their modes."""

_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceConfig:
    """A folder's sentence-embedding pipeline: pooling ``modes`` (concatenated when several),
    whether the embedding is L2-normalised, the token limit (``None``: not stated) and whether
    texts are lower-cased first. ``source`` names the files it was read from (empty: the default)."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_length: int | None = None
    lowercase: bool = False
    source: str = ""


def read_sentence_config(folder: str | Path) -> SentenceConfig:
    """The pipeline stated by ``folder``'s sentence-transformers files, or the default.

    ``modules.json`` must list a ``Transformer`` at the folder's top level, then ``Pooling``, then
    optionally ``Normalize``; any other module (``Dense``, ...) or an unknown pooling mode is a
    :class:`CheckpointError` naming the file, since gradfix would compute other embeddings than
    the library. A ``1_Pooling/config.json`` without ``modules.json`` is read too (not normalised).
    """
    root = Path(folder)
    modules_file = root / "modules.json"
    pooling_dir: Path | None = None
    normalize = True
    if modules_file.is_file():
        pooling_dir, normalize = _read_modules(modules_file)
    elif (root / "1_Pooling" / "config.json").is_file():
        pooling_dir, normalize = root / "1_Pooling", False
    sources = []
    modes: tuple[str, ...] = ("mean",)
    if pooling_dir is not None:
        modes = _read_pooling(pooling_dir / "config.json")
        sources.append(str(pooling_dir / "config.json"))
    max_length, lowercase = None, False
    bert_config = root / "sentence_bert_config.json"
    if bert_config.is_file():
        max_length, lowercase = _read_bert_config(bert_config)
        sources.append(str(bert_config))
    return SentenceConfig(modes, normalize, max_length, lowercase, ", ".join(sources))


def _read_json_object(path: Path) -> Any:
    """The JSON in ``path``; :class:`CheckpointError` naming it when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: cannot read the sentence-transformers config ({reason})") from exc


def _read_modules(path: Path) -> tuple[Path | None, bool]:
    """The pooling module's folder and whether ``Normalize`` follows, from ``modules.json``."""
    entries = _read_json_object(path)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CheckpointError(f"{path}: expected a list of module objects")
    kinds = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
    unknown = [str(e.get("type")) for e, kind in zip(entries, kinds, strict=True) if kind not in _MODULES]
    if unknown:
        raise CheckpointError(
            f"{path}: module {unknown[0]} is not supported (gradfix applies only "
            f"{', '.join(_MODULES)}, in that order)"
        )
    if not kinds or kinds[0] != "Transformer" or kinds != sorted(kinds, key=_MODULES.index):
        raise CheckpointError(f"{path}: modules {kinds} are not Transformer, Pooling[, Normalize] in order")
    if len(set(kinds)) != len(kinds):
        raise CheckpointError(f"{path}: a module is listed twice: {kinds}")
    if str(entries[0].get("path", "")).strip("./"):
        raise CheckpointError(
            f"{path}: the transformer is saved in {entries[0]['path']!r}, not at the folder's top level; "
            "give that folder"
        )
    pooling = [e for e, kind in zip(entries, kinds, strict=True) if kind == "Pooling"]
    folder = path.parent / str(pooling[0].get("path", "")) if pooling else None
    if folder is not None and not (folder / "config.json").is_file():
        raise CheckpointError(f"{path}: the pooling module's {folder / 'config.json'} is missing")
    return folder, "Normalize" in kinds


def _read_pooling(path: Path) -> tuple[str, ...]:
    """The pooling modes of a pooling ``config.json`` (``pooling_mode`` or the older booleans)."""
    config = _read_json_object(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "pooling_mode" in config:
        value = config["pooling_mode"]
        modes = (value,) if isinstance(value, str) else value
        if not isinstance(modes, (list, tuple)) or not modes:
            raise CheckpointError(f"{path}: pooling_mode must be a mode or a list of modes, got {value!r}")
    else:
        stray = [
            k.removeprefix("pooling_mode_")
            for k, v in config.items()
            if k.startswith("pooling_mode_") and k not in _LEGACY_KEYS and v
        ]
        modes = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key)] + stray or ["mean"]
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise CheckpointError(
            f"{path}: pooling mode {bad[0]!r} is not supported (supported: {', '.join(POOLING_MODES)})"
        )
    return tuple(str(m) for m in modes)


def _read_bert_config(path: Path) -> tuple[int | None, bool]:
    """``max_seq_length`` (``None`` when absent or null) and ``do_lower_case``."""
    config = _read_json_object(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    limit = config.get("max_seq_length")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CheckpointError(f"{path}: max_seq_length must be a positive integer, got {limit!r}")
    return limit, bool(config.get("do_lower_case", False))


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over non-padding tokens: ``[B, T, H]`` and ``[B, T]`` → ``[B, H]``."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def _pool_one(mode: str, states: Tensor, attention_mask: Tensor) -> Tensor:
    """One pooling mode over right-padded token states ``[B, T, H]`` → ``[B, H]``."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    if mode == "mean":
        return mean_pool(states, attention_mask)
    if mode == "mean_sqrt_len_tokens":
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9).sqrt()
    if mode == "cls":
        return states[:, 0]
    if mode == "max":
        return states.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":
        weights = torch.arange(1, states.shape[1] + 1, device=states.device, dtype=states.dtype)
        weighted = mask * weights.view(1, -1, 1)
        return (states * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9)
    if mode == "lasttoken":
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0).long()
        index = last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])
        return states.gather(1, index).squeeze(1)
    raise CheckpointError(f"pooling mode {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})")


def pool(config: SentenceConfig, states: Tensor, attention_mask: Tensor) -> Tensor:
    """The pooled states ``[B, len(modes)·H]`` of right-padded token states ``[B, T, H]``: each
    mode of ``config`` in turn, concatenated (not normalised; see :func:`sentence_embeddings`)."""
    pooled = [_pool_one(mode, states, attention_mask) for mode in config.modes]
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)


def sentence_embeddings(config: SentenceConfig, states: Tensor, attention_mask: Tensor) -> Tensor:
    """:func:`pool`, L2-normalised when ``config.normalize``: what ``SentenceTransformer.encode``
    computes for the folder."""
    embeddings = pool(config, states, attention_mask)
    return F.normalize(embeddings, dim=-1) if config.normalize else embeddings

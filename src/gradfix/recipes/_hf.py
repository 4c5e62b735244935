"""Helpers shared by the Hugging Face ``transformers`` recipes.

``transformers`` is imported only inside functions, so ``import gradfix`` works without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradfix.errors import CheckpointError, ConfigError, DataError
from gradfix.recipes import _hf_checks
from gradfix.recipes.placement import Placement

_ENCODER_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def require_transformers() -> Any:
    """The ``transformers`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("this recipe needs the Hugging Face libraries: pip install gradfix[hf]") from exc
    return transformers


_UNUSED_BY_CLASS = {"AutoModel": ("pooler.",)}
"""Tensors a loaded class may lack: an encoder's outputs are read token by token, never pooled."""


def load_pretrained(
    auto_class_name: str,
    model_dir: str | Path,
    attn_implementation: str | None = "eager",
    placement: Placement | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` offline from a folder, in eval mode, in float32 on the CPU unless
    ``placement`` names another device and dtype (:mod:`gradfix.recipes.placement`).

    In float32 every floating parameter is float32; in bfloat16 or float16 ``from_pretrained``
    loads the weights in that dtype (modules a model class keeps in float32 stay so) on the CPU,
    and the model is then moved to the device. ``attn_implementation`` is passed to
    ``from_pretrained`` (``None``: the library's default).
    Eager attention has ``vmap`` batching rules, so per-sample gradients run batched. Before
    anything is loaded, ``config.json`` is checked against the weights' headers and the folder
    must hold tokenizer files; after loading, a tensor the weights lack or hold in another shape
    and a tokenizer far smaller than the embedding are refused (:mod:`gradfix.recipes._hf_checks`),
    so no part of the model is ever initialised at random.
    """
    transformers = require_transformers()
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    _hf_checks.check_config_against_weights(folder)
    _hf_checks.check_tokenizer_files(folder)
    auto_class = getattr(transformers, auto_class_name)
    dtype = placement.dtype if placement is not None else torch.float32
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "local_files_only": True,
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,  # reported by check_loading_info, not as a long table
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet(transformers):
        try:
            model, info = auto_class.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"{folder}: cannot load a model with {auto_class_name}: {reason}") from exc
        _hf_checks.check_loading_info(folder, model, info, _UNUSED_BY_CLASS.get(auto_class_name, ()))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"{folder}: cannot load the tokenizer: {reason}") from exc
    _hf_checks.check_tokenizer_size(folder, model, tokenizer)
    if dtype == torch.float32:
        model.float()
    if placement is not None and placement.device.type != "cpu":
        model.to(placement.device)
    model.eval()
    return model, tokenizer


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Keep ``transformers`` to errors while loading: its load report would print a long table."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a padding token its end-of-sequence token as padding."""
    if getattr(tokenizer, "pad_token", None) is not None:
        return
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ConfigError("the tokenizer has neither a padding nor an end-of-sequence token")
    tokenizer.pad_token = eos


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Tokenise ``texts`` with right padding and truncation into int64 tensors (sample axis first)."""
    if len(texts) == 0:
        raise DataError("cannot collate an empty list of examples")
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        encoded = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
    finally:
        tokenizer.padding_side = side
    return {key: encoded[key].long() for key in _ENCODER_KEYS if key in encoded}


def label_indices(labels: Sequence[str], names: Sequence[str]) -> Tensor:
    """int64 indices of ``labels`` in ``names``; :class:`DataError` on a label outside the set."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for position, label in enumerate(labels, start=1):
        if label not in index:
            raise DataError(f"example {position} has label {label!r}, which is not one of {list(names)}")
        out.append(index[label])
    return torch.tensor(out, dtype=torch.int64)


def check_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` as a list, or a :class:`ConfigError` if empty or with duplicates."""
    names = [str(name) for name in labels]
    if not names:
        raise ConfigError("at least one label is needed")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"duplicate labels: {duplicates}")
    return names


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def prepared_mask(attention_mask: Tensor, dtype: torch.dtype, causal: bool = False) -> Tensor:
    """Additive 4D mask ``[B, 1, T, T]`` (0 = attend, dtype min = masked) from a 2D padding mask.

    Passing this instead of the 2D mask keeps ``transformers`` from inspecting the mask's values
    (e.g. skipping it when nothing is padded), which ``torch.func.vmap`` cannot trace.
    """
    length = attention_mask.shape[-1]
    keep = attention_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        keep = keep & tri
    return (~keep).to(dtype) * torch.finfo(dtype).min


def forward(
    model: nn.Module, batch: Mapping[str, Tensor], use_prepared_mask: bool, causal: bool = False
) -> Any:
    """Call ``model`` on the tokeniser fields of ``batch`` (input ids, mask, token types)."""
    kwargs = {key: batch[key] for key in _ENCODER_KEYS if key in batch}
    if use_prepared_mask and "attention_mask" in kwargs:
        kwargs["attention_mask"] = prepared_mask(kwargs["attention_mask"], _float_dtype(model), causal)
    return model(**kwargs)


def first_output(outputs: Any) -> Tensor:
    """``last_hidden_state``/``logits`` of a model output (its first field)."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if isinstance(value, Tensor):
            return value
    return outputs[0]


@torch.no_grad()
def supports_prepared_mask(model: nn.Module, tokenizer: Any, causal: bool = False) -> bool:
    """Whether ``model`` gives the same outputs with :func:`prepared_mask` as with a 2D mask.

    Checked once on a small padded probe batch in eval mode (the mode is restored afterwards).
    """
    batch = tokenize(tokenizer, ["a", "a a a a a"], max_length=16)
    if "attention_mask" not in batch or bool(batch["attention_mask"].all()):
        return False
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = {key: value.to(device) for key, value in batch.items()}
    was_training = model.training
    model.eval()
    try:
        reference = first_output(forward(model, batch, use_prepared_mask=False)).float()
        prepared = first_output(forward(model, batch, True, causal)).float()
    except Exception:  # any failure means the model does not take 4D masks
        return False
    finally:
        model.train(was_training)
    if reference.shape != prepared.shape:
        return False
    if reference.dim() == 3:  # token outputs: compare real tokens only
        keep = batch["attention_mask"].to(torch.bool)
        reference, prepared = reference[keep], prepared[keep]
    scale = float(reference.abs().max().clamp(min=1.0))
    return bool(torch.allclose(reference, prepared, atol=1e-4 * scale, rtol=1e-4))


def mask_choice(model: nn.Module, tokenizer: Any, choice: bool | None, causal: bool) -> bool:
    """Resolve a recipe's ``use_prepared_mask`` option (``None``: :func:`supports_prepared_mask`)."""
    if choice is None:
        return supports_prepared_mask(model, tokenizer, causal=causal)
    return bool(choice)

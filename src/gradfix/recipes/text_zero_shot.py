"""The ``text-zero-shot`` recipe: a text encoder scored against a frozen head of class prompts.

Sentence embeddings are pooled as the model folder's sentence-transformers files say
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``: pooling mode,
normalisation, ``max_seq_length``, lower-casing; :mod:`gradfix.recipes._st_folder`), else by mean
pooling with a limit of :data:`~gradfix.settings.DEFAULT_MAX_LENGTH` tokens.

Batches of the Hugging Face recipes are built by each recipe's :meth:`collate` (right padding,
truncation to ``max_length``). The attention mask is handed to the model as a prepared 4D additive
mask when the model gives the same outputs with it (checked once at construction), which keeps the
loss traceable by ``torch.func.vmap``; otherwise the 2D mask is passed unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import Example
from gradfix.errors import CheckpointError, ConfigError
from gradfix.io import open_checkpoint
from gradfix.recipes import _hf
from gradfix.recipes._st_folder import SentenceConfig, pool, read_sentence_config
from gradfix.recipes._st_folder import mean_pool as mean_pool
from gradfix.recipes.base import Batch, Recipe
from gradfix.recipes.registry import DEFAULT_LOGIT_SCALE, BuildOptions, RecipeFamily, register_recipe

DEFAULT_TEMPLATE = "This text is about {label}."
HEAD_FILENAME = "zero_shot_head.safetensors"
_HEAD_FORMAT = "gradfix.zero-shot-head"


def _hidden_states(outputs: Any) -> Tensor:
    """The last hidden state of an encoder output."""
    value = getattr(outputs, "last_hidden_state", None)
    return value if isinstance(value, Tensor) else outputs[0]


def _check_template(template: str) -> None:
    """Raise :class:`ConfigError` unless ``template`` formats with only ``{label}``."""
    try:
        template.format(label="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"prompt template {template!r} must contain {{label}} and no other fields ({exc!r})"
        ) from exc
    if "{label}" not in template:
        raise ConfigError(f"prompt template {template!r} must contain {{label}}")


class TextZeroShotRecipe(Recipe):
    """Zero-shot classification with a text encoder, the text analogue of CLIP's zero-shot head.

    Each class is embedded once from a prompt (``template.format(label=name)``) by pooling
    (``sentence``: the folder's pooling modes; default mean) and L2 normalisation; the rows form a
    frozen ``head`` ``[C, H]``. A batch's logits are ``logit_scale * normalise(pool(model(batch)))
    @ head.T``. The head is built from the model given at construction, at its weights then (eval
    mode, no grad), unless ``head`` is passed; later changes to any model never change it.
    ``max_length`` ``None`` takes ``sentence.max_length``, else
    :data:`~gradfix.settings.DEFAULT_MAX_LENGTH`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        labels: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        logit_scale: float = 20.0,
        max_length: int | None = None,
        head: Tensor | None = None,
        use_prepared_mask: bool | None = None,
        *,
        sentence: SentenceConfig | None = None,
    ):
        """Build the recipe, embedding one prompt per label with ``model`` unless ``head`` is given."""
        _check_template(template)
        self.labels = _hf.check_labels(labels)
        self.tokenizer = tokenizer
        self.template = template
        self.logit_scale = float(logit_scale)
        self.sentence = sentence if sentence is not None else SentenceConfig()
        self.max_length = BuildOptions(max_length=max_length).token_limit(self.sentence.max_length)
        _hf.ensure_pad_token(tokenizer)
        self.use_prepared_mask = _hf.mask_choice(model, tokenizer, use_prepared_mask, causal=False)
        if head is None:
            head = self.embed(model, [template.format(label=name) for name in self.labels])
        elif head.dim() != 2 or head.shape[0] != len(self.labels):
            raise ConfigError(
                f"zero-shot head has shape {list(head.shape)}; expected [{len(self.labels)}, hidden]"
                f" for labels {self.labels}"
            )
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        width = hidden * len(self.sentence.modes) if isinstance(hidden, int) else None
        if width is not None and head.shape[1] != width:
            raise ConfigError(
                f"zero-shot head has width {head.shape[1]} but the model's sentence embeddings have "
                f"{width} (hidden size {hidden}, pooling {list(self.sentence.modes)})"
            )
        self.head: Tensor = head.detach().to(torch.float32).clone()

    def embed(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """L2-normalised pooled embeddings ``[N, H]`` of ``texts`` (eval mode, no grad): the head's rows."""
        return self._embeddings(model, texts, batch_size, normalize=True)

    def encode(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Sentence embeddings ``[N, H]`` of ``texts`` as ``SentenceTransformer.encode`` gives them
        for the model's folder (pooled, normalised only when the folder says so); eval mode, no grad."""
        return self._embeddings(model, texts, batch_size, normalize=self.sentence.normalize)

    @torch.no_grad()
    def _embeddings(self, model: nn.Module, texts: Sequence[str], batch_size: int, normalize: bool) -> Tensor:
        """Pooled embeddings of ``texts`` in batches, L2-normalised when ``normalize``."""
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        rows = []
        try:
            for start in range(0, len(texts), batch_size):
                batch = self._tokenize(texts[start : start + batch_size])
                pooled = self._pooled(model, {k: v.to(device) for k, v in batch.items()})
                rows.append(F.normalize(pooled, dim=-1) if normalize else pooled)
        finally:
            model.train(was_training)
        return torch.cat(rows).float().cpu()

    def _tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """The texts tokenised to :attr:`max_length` (lower-cased first when the folder says so)."""
        texts = [text.lower() for text in texts] if self.sentence.lowercase else list(texts)
        return _hf.tokenize(self.tokenizer, texts, self.max_length)

    def _pooled(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The pooled states of a tokenised batch, as the folder pools them (differentiable)."""
        outputs = _hf.forward(model, batch, self.use_prepared_mask)
        return pool(self.sentence, _hidden_states(outputs), batch["attention_mask"])

    def _embed_batch(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """L2-normalised sentence embeddings of a tokenised batch (differentiable)."""
        return F.normalize(self._pooled(model, batch), dim=-1)

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Scaled cosine similarities ``[B, C]`` between the batch's embeddings and the head."""
        embeddings = self._embed_batch(model, batch)
        head = self.head.to(device=embeddings.device, dtype=embeddings.dtype)
        return self.logit_scale * embeddings @ head.T

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenise the texts and add ``labels`` as int64 indices into :attr:`labels`."""
        batch = self._tokenize([ex.text for ex in examples])
        batch["labels"] = _hf.label_indices([ex.label for ex in examples], self.labels)
        return batch

    def save_head(self, path: str | Path) -> Path:
        """Write the head to a safetensors file with labels, template and logit scale as metadata."""
        return save_head_file(path, self.head, self.labels, self.template, self.logit_scale)

    @staticmethod
    def load_head(path: str | Path) -> tuple[list[str], Tensor, str, float]:
        """Read ``(labels, head, template, logit_scale)`` from a file written by :meth:`save_head`."""
        from safetensors import safe_open

        src = Path(path)
        if not src.is_file():
            raise CheckpointError(f"{src}: zero-shot head file not found")
        try:
            with safe_open(str(src), framework="pt") as fh:
                metadata = fh.metadata() or {}
                if "head" not in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    raise CheckpointError(f"{src}: no 'head' tensor in the file")
                head = fh.get_tensor("head")
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{src}: cannot read safetensors file: {exc}") from exc
        try:
            labels = json.loads(metadata["labels"])
            template = json.loads(metadata["template"])
            logit_scale = float(json.loads(metadata["logit_scale"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{src}: missing or invalid zero-shot head metadata ({exc!r}); "
                "expected JSON-encoded 'labels', 'template' and 'logit_scale'"
            ) from exc
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{src}: metadata 'labels' must be a list of strings")
        if head.dim() != 2 or head.shape[0] != len(labels):
            raise CheckpointError(f"{src}: head shape {list(head.shape)} does not match {len(labels)} labels")
        return labels, head.float(), str(template), logit_scale

    @classmethod
    def from_head_file(
        cls,
        model: nn.Module,
        tokenizer: Any,
        path: str | Path,
        labels: Sequence[str] | None = None,
        logit_scale: float | None = None,
        max_length: int | None = None,
        use_prepared_mask: bool | None = None,
        *,
        sentence: SentenceConfig | None = None,
    ) -> TextZeroShotRecipe:
        """A recipe using a saved head; ``labels`` selects and orders its rows (default: all)."""
        saved, head, template, saved_scale = cls.load_head(path)
        wanted = list(saved) if labels is None else _hf.check_labels(labels)
        missing = [name for name in wanted if name not in saved]
        if missing:
            raise ConfigError(f"{path}: the zero-shot head has no row for label(s) {missing}; it has {saved}")
        rows = head[[saved.index(name) for name in wanted]]
        scale = saved_scale if logit_scale is None else logit_scale
        return cls(
            model, tokenizer, wanted, template, scale, max_length, rows, use_prepared_mask, sentence=sentence
        )


def _head_source(model_dir: Path, head_from: str | Path | None) -> Path | None:
    """The head file or model folder the zero-shot head comes from (``None``: the model itself)."""
    if head_from is None:
        own = model_dir / HEAD_FILENAME
        return own if own.is_file() else None
    source = Path(head_from)
    if source.is_file():
        return source
    if source.is_dir():
        if (source / HEAD_FILENAME).is_file():
            return source / HEAD_FILENAME
        return None if source.resolve() == model_dir.resolve() else source
    raise CheckpointError(f"{source}: head_from is neither a zero-shot head file nor a model folder")


@register_recipe
class TextZeroShot(RecipeFamily):
    """``AutoModel`` + :class:`TextZeroShotRecipe`, the head from a file, a model folder or the model.

    The head comes from ``head_from``: a saved head file, or a model folder (its
    ``zero_shot_head.safetensors`` if it has one, else its own prompt embeddings). By default it is
    ``model_dir``'s ``zero_shot_head.safetensors`` if present, else the prompts embedded by the
    loaded model. ``template`` defaults to :data:`DEFAULT_TEMPLATE` (a head file's own template
    must match it); ``logit_scale`` to the head file's scale, else 20. Pooling, normalisation and
    the token limit come from the folder's sentence-transformers files when it has them (a given
    ``max_length`` wins); a head from another folder is embedded with that folder's.
    """

    name = "text-zero-shot"
    summary = (
        "a text encoder scored against a frozen head of class prompts (cosine; pooled as the "
        "folder's sentence-transformers config says, else mean)"
    )
    recipe_class = TextZeroShotRecipe

    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load the encoder and its tokenizer and build the recipe with the head resolved as above."""
        template, head_from, max_length = options.template, options.head_from, options.max_length
        logit_scale, attn_implementation = options.logit_scale, options.attn_implementation
        folder = Path(model_dir)
        sentence = read_sentence_config(folder)
        model, tokenizer = _hf.load_pretrained("AutoModel", folder, attn_implementation, options.placement)
        source = _head_source(folder, head_from)
        if source is not None and source.is_file():
            recipe = TextZeroShotRecipe.from_head_file(
                model,
                tokenizer,
                source,
                labels,
                logit_scale=logit_scale,
                max_length=max_length,
                sentence=sentence,
            )
            if template is not None and template != recipe.template:
                raise ConfigError(
                    f"{source}: the zero-shot head was built with template {recipe.template!r}, "
                    f"not {template!r}; omit the template or rebuild the head"
                )
            return model, recipe
        prompt = DEFAULT_TEMPLATE if template is None else template
        scale = DEFAULT_LOGIT_SCALE if logit_scale is None else logit_scale
        head = None
        if source is not None:
            head_sentence = read_sentence_config(source)
            head_model, head_tokenizer = _hf.load_pretrained("AutoModel", source, attn_implementation)
            head = TextZeroShotRecipe(
                head_model, head_tokenizer, labels, prompt, scale, max_length, sentence=head_sentence
            ).head
        recipe = TextZeroShotRecipe(
            model, tokenizer, labels, prompt, scale, max_length, head=head, sentence=sentence
        )
        return model, recipe

    def known_labels(
        self, target: str | Path, head_from: str | Path | None = None
    ) -> tuple[list[str], str] | None:
        """The labels of the saved zero-shot head (``head_from`` or the target's own), else ``None``.

        Without a saved head the prompts can embed any label. A head that cannot be read gives
        ``None`` too: building the recipe reports it.
        """
        head = Path(head_from) if head_from is not None else Path(target) / HEAD_FILENAME
        if head.is_dir():
            head = head / HEAD_FILENAME
        if not head.is_file():
            return None
        try:
            with open_checkpoint(head) as reader:
                labels = json.loads(reader.metadata().get("labels", "null"))
        except (CheckpointError, ValueError):
            return None  # the recipe reports a malformed head itself
        if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
            return labels, f"the zero-shot head {head}"
        return None


def save_head_file(
    path: str | Path, head: Tensor, labels: list[str], template: str, logit_scale: float
) -> Path:
    """Write a zero-shot head ``[C, D]`` to a safetensors file with its labels, template and logit
    scale as metadata (the format :meth:`TextZeroShotRecipe.load_head` reads)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": _HEAD_FORMAT,
        "labels": json.dumps(labels),
        "template": json.dumps(template),
        "logit_scale": json.dumps(logit_scale),
    }
    save_file({"head": head.contiguous()}, str(out), metadata=metadata)
    out.chmod(0o644)  # safetensors writes the file private (0600); it is part of a model folder
    return out

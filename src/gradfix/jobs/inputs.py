"""What the jobs check about their inputs and outputs before any long work, and how they record them.

- outputs: an output may not be, lie inside or contain an input, and an existing one is kept
  unless ``overwrite``;
- checkpoints: the tensors of ``τ`` must exist with the same shapes in every model (one error lists
  every difference), and ``τ`` must not be all zeros;
- votes files: present, readable, finite and of one architecture (:mod:`gradfix.votes.file`);
- labels: the data's labels must be known to the target when it has a fixed label set (a saved
  zero-shot head, or a classifier config with named labels);
- provenance: ``input_record`` (``data_record`` for data) gives the sha256 of every file an input
  contributes.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from gradfix.checks import check_same_architecture
from gradfix.errors import CheckpointError, ConfigError, MismatchError
from gradfix.io import (
    check_output_free,
    check_output_not_input,
    list_model_files,
    open_checkpoint,
    sha256_file,
)
from gradfix.io.adapters import CONFIG_NAME, WEIGHTS_NAME, is_adapter_folder
from gradfix.io.hub import hub_origin
from gradfix.io.paths import allowed_roots, check_inside, path_exists, path_stat
from gradfix.recipes import get_recipe
from gradfix.votes.file import check_votes_files as check_votes_files  # re-exported
from gradfix.votes.file import load_votes as load_votes
from gradfix.votes.file import validate_votes_files as validate_votes_files

HEAD_FILE = "zero_shot_head.safetensors"


def input_record(path: str | Path, model_files: bool = False) -> dict[str, Any]:
    """``{"path", "sha256": {file: digest}}`` of a checkpoint or data file, for ``gradfix.json``.

    For a checkpoint folder every weight file that is read is hashed, and with ``model_files``
    also its config and tokenizer files (those copied into the output). Keys are paths relative
    to the folder, sorted. Only regular files inside the folder (or, for a Hub snapshot, the
    cache's ``blobs/``) are hashed: a symlink out of it, a FIFO or a device is refused. A snapshot
    of the Hugging Face cache (a Hub id resolved by :mod:`gradfix.io.hub`) also gets
    ``"hub": {"repo_id", "revision_requested", "commit"}``.
    """
    path = Path(path)
    info = path_stat(path)
    if info is not None and not stat.S_ISDIR(info.st_mode):
        return {"path": str(path), "sha256": {path.name: sha256_file(path)}}
    if is_adapter_folder(path):  # a PEFT adapter: its config and weights
        files = [Path(name) for name in (CONFIG_NAME, WEIGHTS_NAME) if (path / name).exists()]
    else:
        with open_checkpoint(path) as reader:
            files = [f.relative_to(path) for f in reader.files]
    roots = allowed_roots(path)
    for rel in files:
        check_inside(path, path / rel, roots)
    if model_files:
        files += list_model_files(path)
    digests = {rel.as_posix(): sha256_file(path / rel) for rel in sorted(set(files))}
    origin = hub_origin(path)
    return {"path": str(path), "sha256": digests, **({"hub": origin.record()} if origin else {})}


def data_record(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256": {file: digest}}`` of a data file, or of every file of a data folder
    (one sub-folder of images per class), keyed by path relative to it and sorted."""
    path = Path(path)
    if not path.is_dir():
        return input_record(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())  # regular files (links followed)
    return {"path": str(path), "sha256": {p.relative_to(path).as_posix(): sha256_file(p) for p in files}}


def check_outputs(
    out: str | Path,
    inputs: Sequence[str | Path],
    overwrite: bool,
    votes_out: str | Path | None = None,
) -> None:
    """Refuse, before any work, outputs that would overwrite inputs or existing results.

    ``out`` (and ``votes_out``) may not be, lie inside or contain any input, nor any file an input
    resolves to (compared by device and inode: a Hub snapshot's blobs count); an input folder's
    files may not link outside it, and every input must be a folder or a regular file. An
    existing ``out`` or ``votes_out`` needs ``overwrite``; ``votes_out`` may not lie inside ``out``
    (which is built elsewhere and moved into place at the end). A path that cannot be looked at
    (a name too long, no permission) is named on one line.
    """
    check_output_not_input(out, inputs)
    check_output_free(out, overwrite)
    if votes_out is not None:
        votes_path = Path(votes_out)
        check_output_not_input(votes_path, inputs)
        check_output_not_input(votes_path, [out], compare_files=False)
        info = path_stat(votes_path)
        if info is not None and stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{votes_path}: --votes-out must be a file, not a folder")
        if path_exists(votes_path) and not overwrite:
            raise ConfigError(f"{votes_path}: votes file already exists; pass --overwrite to replace it")


def check_task_vector_nonzero(
    tau: Mapping[str, Tensor], base: str | Path, finetuned: str | Path, what: str = "the task vector"
) -> None:
    """Raise if every coordinate of ``tau`` is zero: the fine-tune equals its base."""
    if not any(bool(t.ne(0).any()) for t in tau.values()):
        raise_zero_task_vector(len(tau), base, finetuned, what)


def raise_zero_task_vector(
    count: int, base: str | Path, finetuned: str | Path, what: str = "the task vector"
) -> None:
    """The error for a task vector whose ``count`` selected tensors are all zero."""
    raise CheckpointError(
        f"{what} is all zeros: {finetuned} equals {base} on all {count} selected tensor(s); check "
        "that the fine-tuned path is the fine-tuned model (not a copy of its base) and that "
        "--include/--exclude select the tensors that were trained"
    )


def check_checkpoints(models: Mapping[str, Any], names: Sequence[str], selected_from: str | Path) -> None:
    """One error for every tensor of ``names`` missing, shaped differently or not floating point.

    ``models`` maps a label (role and path) to an open reader; ``selected_from`` names the
    checkpoint whose filters left ``names`` empty, if they did.
    """
    if not names:
        raise ConfigError(
            f"{selected_from}: no floating-point tensor is left after the --include/--exclude filters"
        )
    check_same_architecture({label: reader.shapes() for label, reader in models.items()}, names)
    problems = []
    for label, reader in models.items():
        dtypes = reader.dtypes()
        problems += [f"{n!r} is {dtypes[n]} in {label}" for n in names if not dtypes[n].is_floating_point]
    if problems:
        more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise MismatchError(
            f"{len(problems)} tensor(s) of the task vector are not floating point: "
            f"{'; '.join(problems[:10])}{more}; exclude them with --exclude"
        )


def target_label_set(
    recipe: str, target: str | Path, head_from: str | Path | None = None
) -> tuple[list[str], str] | None:
    """The labels a target can score, and whose they are, when it has a fixed set.

    Asks the recipe's family (:meth:`gradfix.recipes.RecipeFamily.known_labels`):
    ``text-zero-shot``: the labels of its saved zero-shot head (``head_from`` or the folder's
    ``zero_shot_head.safetensors``), else none (prompts can embed any label).
    ``sequence-classification``: the names in ``config.json``'s ``id2label`` unless they are the
    generic ``LABEL_0``, ``LABEL_1``, ... Other recipes: none. An unknown recipe is a
    :class:`ConfigError` listing the known ones.
    """
    return get_recipe(recipe).known_labels(target, head_from)

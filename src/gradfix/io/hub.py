"""Model arguments that name a Hugging Face Hub repository: resolved to a local snapshot folder.

A model argument (a base, a fine-tune or adapter, a merge's task input, an evaluated model) that
is not an existing path but reads as a Hub repository id, ``org/name`` or ``org/name@revision``,
is resolved through ``huggingface_hub``:

- the local cache first (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``): a cached
  snapshot of the revision that holds weights is used as it is, without asking the Hub;
- otherwise the files gradfix reads are downloaded (:data:`MODEL_FILES`: safetensors weights,
  JSON configs, tokenizer and vocabulary files; PyTorch ``.bin`` weights only when the repository
  has no safetensors), unless downloads are off (``HF_HUB_OFFLINE=1``, huggingface_hub's own
  setting) or the Hub cannot be reached: then one line says so and how to download it;
- the revision is ``@revision`` in the argument, else the command's ``--revision``, else ``main``.

Anything else stays a path: an existing file or folder, a string that starts with ``/``, ``.`` or
``~``, one with more than one ``/`` or ``@`` part, or one that names a weights or data file
(``org/model.safetensors``); a missing one keeps the reader's "no such file or folder" error.
:func:`hub_origin` tells the record of an input (``gradfix.json``) which repository and commit
a folder is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradfix.errors import CheckpointError, ConfigError
from gradfix.io.paths import os_reason, path_exists

MODEL_FILES = (
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "1_Pooling/*",
)
"""What a download fetches: weights (safetensors), configs and shard indexes, tokenizer files
(``vocab.txt``, ``merges.txt``, ``spiece.model``, ...) and sentence-transformers' pooling folder;
not ``pytorch_model.bin``, ONNX, TensorFlow or Flax weights."""
TORCH_WEIGHTS = ("pytorch_model*.bin", "adapter_model.bin")
"""Downloaded only when the repository holds no safetensors weights."""

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PATH_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".jsonl", ".csv", ".yaml", ".yml")


@dataclass(frozen=True)
class HubModel:
    """A Hub repository resolved to a snapshot folder of the local cache."""

    repo_id: str
    revision_requested: str | None
    commit: str
    folder: Path

    def record(self) -> dict[str, Any]:
        """``{"repo_id", "revision_requested", "commit"}`` as ``gradfix.json`` records an input."""
        return {"repo_id": self.repo_id, "revision_requested": self.revision_requested, "commit": self.commit}


_RESOLVED: dict[str, HubModel] = {}
"""The folders this process resolved, by absolute path: what each was asked for."""


def parse_hub_id(arg: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``arg`` is not an existing path and reads as ``org/name[@rev]``.

    Returns ``None`` for anything that is to stay a path (see the module's description).
    """
    text = str(arg)
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or path_exists(Path(text)):
        return None
    repo_id, at, revision = text.partition("@")
    if (at and not revision) or "@" in revision or repo_id.count("/") != 1:
        return None
    if repo_id.lower().endswith(_PATH_SUFFIXES):
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def resolve_model(arg: str | Path, revision: str | None = None) -> str | Path:
    """The local folder of a Hub id (``org/name[@rev]``), or ``arg`` unchanged when it is a path.

    ``revision`` (a branch, tag or commit hash) applies unless the argument carries its own
    ``@rev``. Raises a one-line :class:`CheckpointError` when the repository cannot be had: not
    cached and downloads off or the Hub unreachable (with the ``hf download`` command that fetches
    it), no such repository or revision on the Hub, or a cached copy without weights.
    """
    parsed = parse_hub_id(arg)
    if parsed is None:
        return arg
    repo_id, own = parsed
    wanted = own or revision
    folder = _snapshot(str(arg), repo_id, wanted)
    model = HubModel(repo_id, wanted, folder.name, folder)
    _RESOLVED[os.path.abspath(folder)] = model
    return folder


def resolve_models(args: Sequence[str | Path], revision: str | None = None) -> list[str | Path]:
    """:func:`resolve_model` of each argument; ``revision`` with no Hub id among them is an error."""
    if revision is not None and not any(parse_hub_id(a) is not None for a in args):
        raise ConfigError(
            f"--revision {revision}: no model argument is a Hugging Face Hub id (org/name); "
            "it applies only to those"
        )
    return [resolve_model(a, revision) for a in args]


def hub_origin(path: str | Path) -> HubModel | None:
    """The repository and commit a folder is: one this process resolved, or any folder of the
    cache's layout (``models--org--name/snapshots/<commit>``); ``None`` for other paths."""
    key = os.path.abspath(path)
    if key in _RESOLVED:
        return _RESOLVED[key]
    folder = Path(key)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--") and _COMMIT.match(folder.name):
        return HubModel(repo.removeprefix("models--").replace("--", "/"), None, folder.name, folder)
    return None


def hub_offline() -> bool:
    """Whether downloads are off: huggingface_hub's ``HF_HUB_OFFLINE`` (read when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hint(repo_id: str, revision: str | None) -> str:
    """The command that downloads ``repo_id`` at ``revision`` into the cache."""
    return f"`hf download {repo_id}" + (f" --revision {revision}" if revision else "") + "`"


def _holds_weights(folder: Path) -> bool:
    """Whether a snapshot holds weights gradfix reads (or a PEFT adapter)."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return any(n.endswith((".safetensors", ".bin")) for n in names) or "adapter_config.json" in names


def _snapshot(arg: str, repo_id: str, revision: str | None) -> Path:
    """The cached snapshot of ``repo_id`` at ``revision`` with weights, downloaded if need be."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    at = f" at revision {revision}" if revision else ""
    hint = download_hint(repo_id, revision)
    cached: Path | None = None
    try:
        found = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(MODEL_FILES), local_files_only=True
        )
        cached = Path(found)
    except LocalEntryNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{arg}: cannot read the Hugging Face cache ({_reason(exc)})") from exc
    if cached is not None and _holds_weights(cached):
        return cached
    if hub_offline():
        what = f"its cached copy {cached} holds no weights" if cached else "it is not in the cache"
        raise CheckpointError(
            f"{arg}: no such file or folder, and as a Hugging Face Hub id{at} {what} "
            f"({constants.HF_HUB_CACHE}) while downloads are off (HF_HUB_OFFLINE=1); "
            f"download it with {hint} where the network allows"
        )
    return _download(arg, repo_id, revision, at, hint)


def _download(arg: str, repo_id: str, revision: str | None, at: str, hint: str) -> Path:
    """Download what gradfix reads of ``repo_id`` (PyTorch weights only when there are no safetensors)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(TORCH_WEIGHTS)))
    except RevisionNotFoundError as exc:
        missing = f"{arg}: the Hugging Face Hub has no revision {revision!r} of {repo_id}"
        raise CheckpointError(missing) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{arg}: no such file or folder, and no model {repo_id} on the Hugging Face Hub (or it is "
            "private or gated: log in with `hf auth login`)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{arg}: no such file or folder, not in the Hugging Face cache{at}, and the Hub cannot be "
            f"reached; download it with {hint} where the network allows"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{arg}: cannot download from the Hugging Face Hub ({_reason(exc)})") from exc
    if not _holds_weights(folder):
        raise CheckpointError(f"{arg}: the Hugging Face Hub repository {repo_id}{at} holds no weights")
    return folder


def _reason(exc: BaseException) -> str:
    """An exception's message on one line, shortened."""
    text = os_reason(exc) if isinstance(exc, OSError) else str(exc)
    return " ".join(text.split())[:200] or type(exc).__name__

"""Checkpoint input and output.

Reading: :func:`open_checkpoint` gives a lazy :class:`CheckpointReader` over a safetensors
file, a Hugging Face model folder (single-file or sharded) or a PyTorch ``.bin``/``.pt`` file
(loaded only with ``weights_only=True``); :func:`load_state_dict` loads everything at once.
Every problem with a file (missing, truncated, corrupted, unsafe) is a
:class:`~gradfix.errors.CheckpointError` naming it.

Writing: :class:`ShardedWriter` / :func:`save_state_dict` write Hugging Face-style safetensors
shards with bounded memory; :func:`atomic_output_dir` and :func:`atomic_output_file` build an
output under a temporary name and move it into place only on success;
:func:`check_output_free`, :func:`check_output_not_input`, :func:`sha256_file`,
:func:`list_model_files` and :func:`copy_model_files` cover the rest of producing a loadable
model folder.
"""

from gradfix.io.checkpoint import CheckpointReader, load_state_dict, open_checkpoint
from gradfix.io.outputs import (
    atomic_output_dir,
    atomic_output_file,
    check_output_free,
    check_output_not_input,
)
from gradfix.io.writer import (
    ShardedWriter,
    copy_model_files,
    list_model_files,
    save_state_dict,
    sha256_file,
    sort_safetensors_metadata,
)

__all__ = [
    "CheckpointReader",
    "ShardedWriter",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_free",
    "check_output_not_input",
    "copy_model_files",
    "list_model_files",
    "load_state_dict",
    "open_checkpoint",
    "save_state_dict",
    "sha256_file",
    "sort_safetensors_metadata",
]

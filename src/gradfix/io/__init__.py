"""Checkpoint input and output.

Reading: :func:`open_checkpoint` gives a lazy :class:`CheckpointReader` over a safetensors
file, a Hugging Face model folder (single-file or sharded) or a PyTorch ``.bin``/``.pt`` file
(loaded only with ``weights_only=True``); :func:`load_state_dict` loads everything at once.
Every problem with a file (missing, truncated, corrupted, unsafe) is a
:class:`~gradfix.errors.CheckpointError` naming it.

Writing: :class:`~gradfix.io.streaming.StreamingShardedWriter` is the one writer of Hugging
Face-style safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json``): it takes a plan of names, dtypes and shapes and then each
tensor's data in row chunks, so memory holds at most a chunk. :func:`save_state_dict` feeds it a
state dict held in memory. :func:`atomic_output_dir` and :func:`atomic_output_file` build an
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
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan, plan_shards
from gradfix.io.writer import (
    WRITE_ERRORS,
    copy_model_files,
    list_model_files,
    save_state_dict,
    sha256_file,
    sort_safetensors_metadata,
)

__all__ = [
    "WRITE_ERRORS",
    "CheckpointReader",
    "StreamingShardedWriter",
    "TensorPlan",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_free",
    "check_output_not_input",
    "copy_model_files",
    "list_model_files",
    "load_state_dict",
    "open_checkpoint",
    "plan_shards",
    "save_state_dict",
    "sha256_file",
    "sort_safetensors_metadata",
]

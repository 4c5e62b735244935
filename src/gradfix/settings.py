"""Every setting of a job and its default, in one place.

The Python API (:mod:`gradfix.jobs`) takes these dataclasses; the command line builds its options,
help texts and defaults from them and validates the command line and ``--config`` YAML against
their field types (:mod:`gradfix.cli.config`), so the two cannot disagree. Closed sets are
``Literal`` types; the names of transport methods and masks are the keys of their registries
(:mod:`gradfix.methods`, :mod:`gradfix.ops.masks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Estimator = Literal["majority", "mean"]
"""How votes become a sign: the majority vote (Eq. 9) or the sign of the mean gradient."""
Signs = Literal["auto", "votes", "finetune"]
"""Where a transport's signs come from: B's per-sample votes, a short fine-tune of B on the shots,
or ``auto``: the fine-tune where ``gradfix check``'s verdict is ``weak`` (:mod:`gradfix.jobs.signs`)."""
Engine = Literal["auto", "hooks", "vmap", "loop"]
"""Per-sample gradient engines of :func:`gradfix.votes.estimate_signs`."""
Unvoted = Literal["error", "drop", "keep"]
"""What happens to a tensor of ``τ_A`` that received no vote."""
Pipeline = Literal["plain", "mask-then-merge", "merge-then-mask"]
"""How a merge combines GradFix masks with merging."""
MergeMethod = Literal["ties", "task_arithmetic"]
Elect = Literal["mass", "count"]
TrimScope = Literal["tensor", "model"]
Shots = int | Literal["all"]
Alpha = float | Literal["auto"]
VoteDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The dtype the target is loaded and votes in; ``auto``: float32 on the CPU, the checkpoint's own
dtype on a GPU (see :mod:`gradfix.recipes.placement`)."""
OutFormat = Literal["full", "adapter"]
"""What a transport writes: the full weights of the target, or a PEFT LoRA adapter for it."""

DEFAULT_RECIPE = "text-zero-shot"
DEFAULT_SHARD_BYTES = 2 * 2**30
"""Largest weight file of an output (2 GiB), for the API, the command line and the writer."""
DEFAULT_SHARD_SIZE = "2GiB"
""":data:`DEFAULT_SHARD_BYTES` as the command line writes it."""
DEFAULT_GAMMA = 1.0
DEFAULT_THRESHOLD = 0.3
"""Threshold of ``--mask gate`` when none is given."""
DEFAULT_ALPHA = 1.0
"""α of the methods that do not choose it."""
DEFAULT_METHOD = "adaptive"
"""The transport method of the command line and of :func:`gradfix.jobs.transport_checkpoints`."""
DEFAULT_MERGE_MASK = "agreement"
"""The mask of ``gradfix merge`` when its pipeline masks and no ``--mask`` is given."""
DEFAULT_MAX_LENGTH = 128
"""Token limit per text when neither the settings (``max_length``) nor the model folder (a
sentence-transformers ``max_seq_length``) give one."""


@dataclass
class VoteSettings:
    """How the target votes: recipe, data, shots and estimator, and where: ``device`` and ``dtype``
    (the target is loaded there for the votes, the check, the descent report and the choice; what
    a job writes is computed from the checkpoints as before)."""

    recipe: str = DEFAULT_RECIPE
    data: str | None = None
    shots: Shots = 2  # or "all": every example of the file, in file order
    seed: int = 0
    estimator: Estimator = "majority"
    signs: Signs = "auto"
    engine: Engine = "auto"
    template: str | None = None
    batch_size: int = 8
    max_length: int | None = None  # None: the model folder's max_seq_length, else DEFAULT_MAX_LENGTH
    progress: bool = True
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else the CPU)
    dtype: VoteDtype = "auto"


@dataclass
class MaskSettings:
    """How ``τ_A`` is masked and scaled.

    ``mask`` and ``alpha`` left as ``None`` take the method's defaults (see
    :mod:`gradfix.methods`); ``alpha="auto"`` chooses α. ``thresholds`` and ``alphas`` are the
    candidate grids of that choice (``None``: :data:`gradfix.methods.autotune.DEFAULT_THRESHOLDS`
    and :data:`~gradfix.methods.autotune.DEFAULT_ALPHAS`), ``validation`` a labelled data file to
    score the candidates on (otherwise they are cross-validated on the shots).
    """

    mask: str | None = None
    alpha: Alpha | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    unvoted: Unvoted = "error"
    gamma: float = DEFAULT_GAMMA
    threshold: float | None = None
    thresholds: list[float | str] | None = None
    alphas: list[float] | None = None
    validation: str | None = None


@dataclass
class MergeSettings:
    """How task vectors are merged (``gradfix merge``)."""

    method: MergeMethod = "ties"
    pipeline: Pipeline = "plain"
    density: float = 0.2
    elect: Elect = "mass"
    trim_scope: TrimScope = "tensor"
    weights: list[float] | None = None


@dataclass
class EvalSettings:
    """How ``gradfix eval`` scores a model folder (see :func:`gradfix.jobs.evaluate_model`)."""

    recipe: str = DEFAULT_RECIPE
    template: str | None = None
    head_from: str | None = None
    batch_size: int = 32
    max_length: int | None = None  # None: the model folder's max_seq_length, else DEFAULT_MAX_LENGTH


@dataclass
class HubSettings:
    """Which revision of the models given as Hugging Face Hub ids (``org/name``) to use.

    ``revision`` (a branch, tag or commit hash; ``None``: ``main``) applies to every Hub id of a
    command that does not name its own (``org/name@revision``); see :mod:`gradfix.io.hub`.
    """

    revision: str | None = None


@dataclass
class OutputSettings:
    """Where and how a job writes its output folder."""

    out: str | None = None
    overwrite: bool = False
    shard_size: str = DEFAULT_SHARD_SIZE
    """Largest weight file, as the command line writes it (e.g. ``2GiB``, ``500MB``)."""
    out_format: OutFormat = "full"
    adapter_rank: int | None = None
    """Rank of every LoRA module of an ``adapter`` output (needed by it, refused by ``full``)."""


Rebasin = Literal["auto", "always", "never"]
"""When ``gradfix check`` aligns ``τ_A`` by re-basin: when it is not clearly 2 points above chance,
always, never."""


@dataclass
class CheckSettings:
    """How ``gradfix check`` measures the spread of the sign agreement (see :mod:`gradfix.jobs.check`).

    ``bootstrap`` resamples of the shots give the agreement's interval; ``permutations`` unit
    shuffles of ``τ_A`` (rows and columns permuted within each tensor) give the chance band;
    ``coordinates`` is how many coordinates keep every shot's gradient for the bootstrap;
    ``rebasin`` when ``τ_A`` is also aligned to B by weight matching.
    """

    bootstrap: int = 200
    permutations: int = 20
    coordinates: int = 200_000
    rebasin: Rebasin = "auto"

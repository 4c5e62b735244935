"""Task vectors: ``τ = θ_ft − θ_base``, one float tensor per parameter name."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from gradfix.checks import FiniteCheck, check_same_architecture, select_names
from gradfix.errors import CheckpointError, MismatchError

_KIND = "gradfix.task_vector"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 inputs are computed in fp32; fp32/fp64 stay as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_names(
    *dtypes: Mapping[str, torch.dtype],
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[str]:
    """Names of the floating-point tensors of any of the ``{name: dtype}`` maps, kept by the filters.

    The names of the first map come first, in its order, then those only the others have. This
    is the set a task vector covers; integer buffers (e.g. ``position_ids``) are left out.
    """
    union: dict[str, None] = {}
    for mapping in dtypes:
        union.update(dict.fromkeys(n for n, d in mapping.items() if d.is_floating_point))
    return select_names(union, include, exclude)


class TaskVector(Mapping[str, Tensor]):
    """A task vector ``τ = θ_ft − θ_base``: a read-only mapping from parameter name to tensor.

    Tensors are held in float32 (float64 when the inputs were). Arithmetic: ``τ1 + τ2``,
    ``τ1 - τ2``, ``-τ``, ``c * τ``, ``τ / c`` and ``sum([τ1, τ2, ...])`` (names and shapes must
    agree). ``apply_to(θ, α)`` gives ``θ + α τ``.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        for name, t in tensors.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"task vector entry {name!r} must be a floating-point tensor")
        self._tensors: dict[str, Tensor] = dict(tensors)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
    ) -> TaskVector:
        """``τ = θ_ft − θ_base`` over the floating-point tensors kept by the name filters.

        Every floating-point tensor kept by the filters in either state dict must exist in both
        with the same shape (one error lists every difference). Integer buffers (e.g.
        ``position_ids``) are skipped.
        """
        names = float_names(
            {n: t.dtype for n, t in finetuned.items()},
            {n: t.dtype for n, t in base.items()},
            include=include,
            exclude=exclude,
        )
        check_same_architecture(
            {
                "base": {n: tuple(t.shape) for n, t in base.items()},
                "finetuned": {n: tuple(t.shape) for n, t in finetuned.items()},
            },
            names,
        )
        return cls({n: _difference(finetuned[n], base[n]) for n in names})

    @classmethod
    def from_checkpoints(
        cls,
        base: str | Path,
        finetuned: str | Path,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
    ) -> TaskVector:
        """``τ`` from two checkpoints (safetensors file, sharded HF folder, or ``.bin``/``.pt``).

        Tensors are read one at a time, so only ``τ`` itself is held in memory. Names and shapes
        must agree as in :meth:`from_state_dicts`. Each tensor is checked for NaN and Inf as it is
        read; one :class:`~gradfix.errors.NonFiniteError` names every file and tensor that has them.
        ``finetuned`` may also be a PEFT LoRA adapter folder (:meth:`from_adapter`).
        """
        from gradfix.io import open_checkpoint
        from gradfix.io.adapters import is_adapter_folder

        if is_adapter_folder(finetuned):
            return cls.from_adapter(base, finetuned, include, exclude)
        with open_checkpoint(base) as rb, open_checkpoint(finetuned) as rf:
            names = float_names(rf.dtypes(), rb.dtypes(), include=include, exclude=exclude)
            check_same_architecture({str(base): rb.shapes(), str(finetuned): rf.shapes()}, names)
            finite = FiniteCheck()
            tensors: dict[str, Tensor] = {}
            for name in names:
                ft, bt = rf.get(name), rb.get(name)
                finite.check(rf.file_of(name), name, ft)
                finite.check(rb.file_of(name), name, bt)
                if not finite:  # once something is wrong, only keep scanning for the message
                    tensors[name] = _difference(ft, bt)
            finite.raise_if_any()
            return cls(tensors)

    @classmethod
    def from_adapter(
        cls,
        base: str | Path,
        adapter: str | Path,
        include: Sequence[str] | str | None = (),
        exclude: Sequence[str] | str | None = (),
    ) -> TaskVector:
        """``τ`` of a PEFT LoRA adapter folder over the base checkpoint's tensor names.

        Each LoRA-adapted weight gives ``ΔW = s · B @ A``; tensors the adapter saves in full
        (``modules_to_save``) give ``saved − base``. Only the tensors the adapter changes (and the
        name filters keep) are in ``τ``; they are computed one at a time (float32).
        """
        from gradfix.io import open_checkpoint
        from gradfix.io.adapters import open_adapter

        with open_checkpoint(base) as rb, open_adapter(adapter, rb.names(), rb.shapes()) as ad:
            names = select_names(ad.names(), include or None, exclude or None)
            return cls({name: ad.tensor(name, rb) for name in names})

    @classmethod
    def load(cls, path: str | Path) -> TaskVector:
        """Load a task vector written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: task vector file not found")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
        return cls(tensors)

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the task vector as one safetensors file (header marks it as a gradfix task vector)."""
        path = Path(path)
        meta = {"format": "pt", "gradfix_kind": _KIND}
        if metadata:
            meta["gradfix_metadata"] = json.dumps(dict(metadata), sort_keys=True)
        save_file({n: t.contiguous() for n, t in self._tensors.items()}, str(path), metadata=meta)
        return path

    # -- mapping --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel():,} values, norm={self.norm():.4g})"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every tensor."""
        return {n: tuple(t.shape) for n, t in self._tensors.items()}

    def numel(self) -> int:
        """Total number of coordinates."""
        return sum(t.numel() for t in self._tensors.values())

    def norm(self) -> float:
        """Euclidean norm over all coordinates."""
        return float(sum(t.double().pow(2).sum() for t in self._tensors.values()) ** 0.5) if self else 0.0

    def filter(
        self, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
    ) -> TaskVector:
        """The task vector restricted to the names kept by the glob filters."""
        return TaskVector({n: self._tensors[n] for n in select_names(self._tensors, include, exclude)})

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> TaskVector:
        """A new task vector with ``fn(name, tensor)`` applied to every tensor."""
        return TaskVector({n: fn(n, t) for n, t in self._tensors.items()})

    # -- arithmetic -----------------------------------------------------------------------------
    def _zip(self, other: Mapping[str, Tensor], op: Callable[[Tensor, Tensor], Tensor]) -> TaskVector:
        other_shapes = {n: tuple(t.shape) for n, t in other.items()}
        check_same_architecture({"left": self.shapes(), "right": other_shapes})
        return TaskVector({n: op(t, other[n]) for n, t in self._tensors.items()})

    def __add__(self, other: object) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # lets sum([...]) start from 0
            return self
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._zip(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._zip(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return self.map(lambda _, t: -t)

    def __mul__(self, scale: object) -> TaskVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return self.map(lambda _, t: t * scale)

    __rmul__ = __mul__

    def __truediv__(self, scale: object) -> TaskVector:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return self.map(lambda _, t: t / scale)

    # -- application ----------------------------------------------------------------------------
    def apply_to(self, state_dict: Mapping[str, Tensor], alpha: float = 1.0) -> dict[str, Tensor]:
        """``θ + α τ``: a new state dict; tensors outside ``τ`` are passed through unchanged.

        Every name of ``τ`` must exist in ``state_dict`` with the same shape. The sum is computed
        in float32 (or float64) and cast back to each target tensor's dtype.
        """
        check_same_architecture(
            {"target": {n: tuple(t.shape) for n, t in state_dict.items()}, "task vector": self.shapes()},
            list(self._tensors),
        )
        out = dict(state_dict)
        for name, tau in self._tensors.items():
            out[name] = apply_tensor(state_dict[name], tau, alpha)
        return out


def apply_tensor(theta: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """``θ + α τ`` for one tensor, computed in float32/float64 and cast back to ``θ``'s dtype."""
    if not theta.is_floating_point():
        raise MismatchError(f"cannot add a task vector to a {theta.dtype} tensor")
    work = _compute_dtype(theta.dtype)
    return (theta.to(work) + alpha * tau.to(work)).to(theta.dtype)


def _difference(finetuned: Tensor, base: Tensor) -> Tensor:
    work = _compute_dtype(finetuned.dtype)
    return finetuned.detach().to(work) - base.detach().to(work)


def random_task_vector(tau: Mapping[str, Tensor], seed: int = 0) -> TaskVector:
    """Ablation (App. C.3): each tensor replaced by ``N(μ, σ²)`` noise with that tensor's μ and σ."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tau.items():
        std = t.std() if t.numel() > 1 else torch.zeros((), dtype=t.dtype)
        out[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype) * std + t.mean()
    return TaskVector(out)

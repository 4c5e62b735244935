"""``gradfix inspect``: per-tensor summaries of checkpoints and task vectors, and sign agreement."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradfix.checks import select_names
from gradfix.cli.options import REVISION_HELP
from gradfix.diagnostics import sign_agreement, tensor_summary
from gradfix.errors import ConfigError
from gradfix.task_vector import TaskVector

_EPILOG = """\
examples:
  gradfix inspect B/                                      # a checkpoint, tensor by tensor
  gradfix inspect --base A/ --finetuned A-ft/             # the task vector A-ft − A
  gradfix inspect --base A/ --finetuned A-ft/ --other-base B/ --other-finetuned B-ft/
                                                          # sign agreement of two task vectors
  gradfix inspect tau_a.safetensors tau_b.safetensors     # the same for saved task vectors
  gradfix inspect org/name --revision v2                  # a Hugging Face Hub model (cache first)
"""


def add_inspect_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the ``inspect`` command."""
    p = sub.add_parser(
        "inspect",
        help="summarise a checkpoint or task vector; compare two task vectors",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", help="a checkpoint or saved task vector; two task vectors to compare")
    p.add_argument("--base", help="base checkpoint of a task vector")
    p.add_argument("--finetuned", help="fine-tuned checkpoint of that task vector")
    p.add_argument("--other-base", help="base of a second task vector to compare signs with")
    p.add_argument("--other-finetuned", help="fine-tune of the second task vector")
    p.add_argument("--include", action="append", metavar="GLOB", help="only tensors whose name matches")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip tensors whose name matches")
    p.add_argument("--top", type=int, default=None, help="print at most this many rows (default all)")
    p.add_argument("--revision", metavar="REV", help=REVISION_HELP)
    common(p)
    p.set_defaults(handler=run_inspect)


def _is_task_vector_file(path: Path) -> bool:
    from gradfix.io import open_checkpoint

    if not path.is_file() or path.suffix != ".safetensors":
        return False
    with open_checkpoint(path) as reader:
        return reader.metadata().get("gradfix_kind") == "gradfix.task_vector"


def _task_vector(
    base: str | None, finetuned: str | None, path: str | None, args: argparse.Namespace
) -> TaskVector:
    if path is not None:
        return TaskVector.load(path).filter(args.include, args.exclude)
    if not (base and finetuned):
        raise ConfigError("inspect: a task vector needs both --base and --finetuned")
    return TaskVector.from_checkpoints(base, finetuned, args.include, args.exclude)


def _checkpoint_rows(path: str, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    from gradfix.io import open_checkpoint

    with open_checkpoint(path) as reader:
        for name in select_names(reader.names(), args.include, args.exclude):
            yield tensor_summary(name, reader.get(name))


def _print_summary(rows: list[dict[str, Any]], top: int | None) -> None:
    shown = rows if top is None else rows[:top]
    width = max([len(r["name"]) for r in shown] + [6])
    print(f"{'tensor':<{width}}  {'shape':<16} {'dtype':<9} {'norm':>10} {'abs max':>10} {'zeros':>7}")
    for r in shown:
        norm = f"{r['norm']:.4g}" if "norm" in r else "-"
        amax = f"{r['abs_max']:.4g}" if "abs_max" in r else "-"
        zeros = f"{r['zero_fraction']:.1%}" if "zero_fraction" in r else "-"
        flag = "" if r.get("finite", True) else "  NON-FINITE"
        print(
            f"{r['name']:<{width}}  {r['shape']!s:<16} {r['dtype']:<9} {norm:>10} {amax:>10} {zeros:>7}{flag}"
        )
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more tensors (raise --top)")
    total = sum(int(r["numel"]) for r in rows)
    print(f"{len(rows)} tensors, {total:,} values")


def _print_agreement(agreement: dict[str, float], first: TaskVector, top: int | None) -> None:
    names = list(agreement)
    shown = names if top is None else names[:top]
    width = max([len(n) for n in shown] + [6])
    print(f"{'tensor':<{width}}  {'sign agreement':>14}")
    for n in shown:
        print(f"{n:<{width}}  {_share(agreement[n]):>14}")
    if len(shown) < len(names):
        print(f"... {len(names) - len(shown)} more tensors (raise --top)")
    weights = {n: first[n].numel() for n in names if not math.isnan(agreement[n])}
    total = sum(weights.values())
    overall = sum(agreement[n] * w for n, w in weights.items()) / total if total else math.nan
    print(f"overall (weighted by size): {_share(overall)}")
    if len(weights) < len(names):
        print("-: no coordinate where both task vectors are non-zero")


def _share(value: float) -> str:
    """A share as a percentage, ``-`` when undefined (no coordinate where both are non-zero)."""
    return "-" if math.isnan(value) else f"{value:.2%}"


def _resolve_hub_ids(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every model given as a Hugging Face Hub id replaced by its local snapshot."""
    from gradfix.io.hub import resolve_models

    roles = [r for r in ("base", "finetuned", "other_base", "other_finetuned") if getattr(args, r)]
    given = [*(args.paths or []), *(getattr(args, r) for r in roles)]
    local = [str(p) for p in resolve_models(given, args.revision)]
    count = len(args.paths or [])
    named = dict(zip(roles, local[count:], strict=True))
    return argparse.Namespace(**{**vars(args), "paths": local[:count], **named})


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """Summarise one checkpoint or task vector, or compare the signs of two task vectors."""
    args = _resolve_hub_ids(args)
    paths = list(args.paths or [])
    if len(paths) > 2:
        raise ConfigError("inspect: give one checkpoint, or two task vector files to compare")
    first_path = paths[0] if paths else None
    if len(paths) == 2 or args.other_base or args.other_finetuned:
        first = _task_vector(args.base, args.finetuned, first_path, args)
        second = _task_vector(
            args.other_base, args.other_finetuned, paths[1] if len(paths) == 2 else None, args
        )
        agreement = sign_agreement(first, second)
        if not args.json:
            _print_agreement(agreement, first, args.top)
        return {"sign_agreement": agreement}
    if first_path is not None and not _is_task_vector_file(Path(first_path)):
        rows = list(_checkpoint_rows(first_path, args))
    else:
        tau = _task_vector(args.base, args.finetuned, first_path, args)
        rows = [tensor_summary(n, t) for n, t in tau.items()]
    if not args.json:
        _print_summary(rows, args.top)
    return {"tensors": rows}

"""Handlers of the ``gradfix transport``, ``merge`` and ``eval`` commands.

Each ``run_*`` takes the validated options (command line over ``--config``, see
:mod:`gradfix.cli.config`), checks the required ones, turns them into the settings of
:mod:`gradfix.settings` (the method, mask and α left for the transport job to resolve), runs the
job, prints a short human summary unless ``--json`` is given, and returns the job's record. The
options themselves are defined in :mod:`gradfix.cli.options`.
"""

from __future__ import annotations

import argparse
from typing import Any

from gradfix.cli.check_cmd import print_transport_verdict
from gradfix.cli.config import flag_of
from gradfix.errors import ConfigError

__all__ = ["run_eval", "run_merge", "run_transport"]


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [flag_of(n) for n in names if getattr(args, n, None) in (None, [], "")]
    if missing:
        raise ConfigError(
            f"{args.command}: missing {', '.join(missing)} (on the command line or in --config)"
        )


def _votes(args: argparse.Namespace, data: str | None) -> Any:
    from gradfix.settings import VoteSettings

    return VoteSettings(
        recipe=args.recipe,
        data=data,
        shots=args.shots,
        seed=args.seed,
        estimator=args.estimator,
        **({"signs": args.signs} if getattr(args, "signs", None) else {}),
        engine=args.engine,
        template=args.template,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=args.progress,
        device=args.device,
        dtype=args.dtype,
    )


def _masking(args: argparse.Namespace) -> Any:
    """The mask settings as given: ``mask``, ``alpha``, ``threshold`` stay ``None`` when not given."""
    from gradfix.settings import MaskSettings

    return MaskSettings(
        mask=args.mask,
        alpha=args.alpha,
        include=list(args.include),
        exclude=list(args.exclude),
        unvoted=args.unvoted,
        gamma=args.gamma,
        threshold=args.threshold,
        thresholds=getattr(args, "thresholds", None),
        alphas=getattr(args, "alphas", None),
        validation=getattr(args, "validation", None),
    )


def _print_transport(record: dict[str, Any], out: str) -> None:
    """The human summary of a transport: method, choice, what was kept, where it was written."""
    alpha = record["alpha"]
    print(
        f"transported {len(record['kept_fraction'])} tensors with method={record['method']} "
        f"mask={record['mask']} alpha={alpha:g} from {record['num_samples']} examples"
    )
    theseus = record.get("theseus")
    if theseus:
        source = "the two bases' weights (data-free)"
        if theseus["from"] == "activations":
            source = f"A's and B's activations on {theseus['examples']} examples ({theseus['tokens']} tokens)"
        print(f"Theseus maps from {source}")
    choice = record.get("choice")
    if choice:
        t = "naive" if choice["threshold"] > 1 else f"{choice['threshold']:g}"
        print(
            f"chose t={t} alpha={choice['alpha']:g} on {choice['source']} "
            f"(score {choice['score']:.4g}, {len(choice['scores'])} candidates)"
        )
    report = record.get("descent")
    if alpha == 0:
        print("alpha = 0: the target is returned unchanged")
    elif report:
        print(
            f"kept {100 * report['kept_fraction']:.2f} % of τ_A's non-zero coordinates; first-order "
            f"loss change <g, delta> = {report['total_inner']:.4e}"
        )
    else:
        print(f"no mask: every coordinate of τ_A was added (times alpha = {alpha:g})")
    adapter = record.get("adapter")
    if adapter:
        print(
            f"LoRA adapter of rank {adapter['rank']} ({len(adapter['target_modules'])} LoRA modules, "
            f"{len(adapter['modules_to_save'])} saved whole) keeps {100 * adapter['kept_share']:.2f} % "
            "of the update's energy"
            + (f"; {len(adapter['dropped'])} tensor(s) dropped" if adapter["dropped"] else "")
        )
    print(f"wrote {out}")


def run_transport(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix transport``: run the transport job on the validated options, print a summary."""
    from gradfix.jobs import transport_checkpoints

    _require(args, "source_base", "source_finetuned", "target_base", "out")
    record = transport_checkpoints(  # resolves the method, mask and α (gradfix.methods)
        args.source_base,
        args.source_finetuned,
        args.target_base,
        args.out,
        _votes(args, args.data),
        _masking(args),
        overwrite=args.overwrite,
        shard_bytes=args.shard_size,
        votes_in=list(args.votes_in),
        votes_out=args.votes_out,
        method=args.method,
        out_format=args.out_format,
        adapter_rank=args.adapter_rank,
        revision=args.revision,
    )
    if record.get("written_by_another_process"):
        return record
    print_transport_verdict(record)  # a warning on stderr unless τ_A transfers
    if not args.json:
        _print_transport(record, args.out)
    return record


def _merge_tasks(args: argparse.Namespace) -> list[Any]:
    """The tasks of a merge: ``tasks:`` from the config, then one per ``--source-finetuned``."""
    from gradfix.jobs import TaskSpec

    tasks = [TaskSpec(**t) for t in args.tasks or []]
    finetuned, bases, data = args.source_finetuned, args.source_base, args.data
    if finetuned:
        if len(bases) not in (1, len(finetuned)) or len(data) not in (0, 1, len(finetuned)):
            raise ConfigError("merge: give --source-base and --data once, or once per --source-finetuned")
        for i, ft in enumerate(finetuned):
            base = bases[i if len(bases) > 1 else 0]
            tasks.append(TaskSpec(base, ft, data[i if len(data) > 1 else 0] if data else None))
    if not tasks:
        raise ConfigError("merge: missing --source-base/--source-finetuned (or `tasks:` in --config)")
    return tasks


def run_merge(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix merge``: run the merge job on the validated options, print a summary."""
    from gradfix.jobs import merge_checkpoints

    tasks = _merge_tasks(args)
    _require(args, "out")
    if args.out_format != "full" or args.adapter_rank is not None:
        raise ConfigError(
            "merge: writes full weights only; --out-format adapter and --adapter-rank are for transport"
        )
    record = merge_checkpoints(
        tasks,
        args.out,
        args.target_base,
        method=args.method,
        pipeline=args.pipeline,
        density=args.density,
        elect=args.elect,
        trim_scope=args.trim_scope,
        weights=args.weights,
        votes=_votes(args, None),
        masking=_masking(args),
        overwrite=args.overwrite,
        shard_bytes=args.shard_size,
        revision=args.revision,
    )
    if record.get("written_by_another_process"):
        return record
    if not args.json:
        masked = "" if args.pipeline == "plain" else f", mask={args.mask}"
        print(
            f"merged {len(tasks)} task vectors with {args.method} ({args.pipeline}{masked}), "
            f"alpha={args.alpha:g}"
        )
        print(f"wrote {args.out}")
    return record


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix eval``: the accuracy of a model folder on a labelled data file."""
    from gradfix.jobs import evaluate_model

    _require(args, "model", "data")
    result = evaluate_model(
        args.model,
        args.data,
        args.recipe,
        template=args.template,
        head_from=args.head_from,
        batch_size=args.batch_size,
        max_length=args.max_length,
        revision=args.revision,
    )
    if not args.json:
        print(f"accuracy {result['accuracy']:.4f} on {result['examples']} examples ({args.model})")
    return result

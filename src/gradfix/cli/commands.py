"""Handlers of the ``gradfix transport``, ``merge`` and ``eval`` commands.

Each ``run_*`` takes the parsed (and ``--config``-merged) arguments, checks the required options,
turns them into the settings of :mod:`gradfix.jobs`, runs the job, prints a short human summary
unless ``--json`` is given, and returns the job's record. The options themselves are defined in
:mod:`gradfix.cli.options`.
"""

from __future__ import annotations

import argparse
from typing import Any

from gradfix.cli.config import as_list, parse_size
from gradfix.cli.options import _alpha
from gradfix.errors import ConfigError

__all__ = ["run_eval", "run_merge", "run_transport"]


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) in (None, [], "")]
    if missing:
        raise ConfigError(
            f"{args.command}: missing {', '.join(missing)} (on the command line or in --config)"
        )


def _settings(args: argparse.Namespace) -> tuple[Any, Any]:
    from gradfix.jobs import MaskSettings, VoteSettings

    data = args.data if isinstance(args.data, str) else None
    votes = VoteSettings(
        recipe=args.recipe,
        data=data,
        shots=args.shots,
        seed=args.seed,
        estimator=args.estimator,
        engine=args.engine,
        template=args.template,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=args.progress,
    )
    thresholds, alphas = getattr(args, "thresholds", None), getattr(args, "alphas", None)
    masking = MaskSettings(
        mask=args.mask,
        alpha=args.alpha,
        include=as_list(args.include),
        exclude=as_list(args.exclude),
        unvoted=args.unvoted,
        gamma=args.gamma,
        threshold=args.threshold if args.threshold is not None else 0.3,
        thresholds=as_list(thresholds) if thresholds is not None else None,
        alphas=as_list(alphas) if alphas is not None else None,
        validation=getattr(args, "validation", None),
    )
    return votes, masking


def _resolve_transport(args: argparse.Namespace) -> None:
    """Fill in the method, mask and α that depend on each other (the defaults of ``transport``).

    No ``--method``: ``adaptive``, or ``gradfix`` when ``--mask`` is given. ``adaptive`` masks with
    the gate; ``gradfix`` defaults to the agreement mask, the other methods to none. No
    ``--alpha``: ``auto`` with ``adaptive``, else 1.0.
    """
    if args.method is None:
        args.method = "gradfix" if args.mask is not None else "adaptive"
    if args.method == "naive" and args.mask not in (None, "none"):
        raise ConfigError(f"--method naive adds τ_A unmasked; drop --mask {args.mask} or use another method")
    if args.method == "adaptive":
        if args.mask not in (None, "gate"):
            raise ConfigError(
                f"--method adaptive masks with the vote-margin gate; --mask {args.mask} is for "
                "--method gradfix"
            )
        if args.threshold is not None:
            raise ConfigError(
                "--method adaptive chooses the gate threshold from --thresholds (give one value to fix "
                "it); --threshold is for --method gradfix --mask gate"
            )
        args.mask = "gate"
    elif args.mask is None:
        args.mask = "agreement" if args.method == "gradfix" else "none"
    if args.alpha is None:
        args.alpha = "auto" if args.method == "adaptive" else 1.0
    elif isinstance(args.alpha, str):  # from a config file
        try:
            args.alpha = _alpha(args.alpha)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(str(exc)) from None


def run_transport(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix transport``."""
    from gradfix.jobs import transport_checkpoints

    _require(args, "source_base", "source_finetuned", "target_base", "out")
    _resolve_transport(args)
    votes, masking = _settings(args)
    record = transport_checkpoints(
        args.source_base,
        args.source_finetuned,
        args.target_base,
        args.out,
        votes,
        masking,
        overwrite=args.overwrite,
        shard_bytes=parse_size(args.shard_size),
        votes_in=as_list(args.votes_in),
        votes_out=args.votes_out,
        method=args.method,
    )
    if record.get("written_by_another_process"):
        return record
    if not args.json:
        report = record.get("descent")
        print(
            f"transported {len(record['kept_fraction'])} tensors with method={args.method} "
            f"mask={record['mask']} alpha={record['alpha']:g}"
            f" from {record['num_samples']} examples"
        )
        choice = record.get("choice")
        if choice:
            t = "naive" if choice["threshold"] > 1 else f"{choice['threshold']:g}"
            print(
                f"chose t={t} alpha={choice['alpha']:g} on {choice['source']} "
                f"(score {choice['score']:.4g}, {len(choice['scores'])} candidates)"
            )
        if report:
            print(
                f"kept {report['kept_fraction']:.2%} of coordinates; first-order loss change "
                f"<g, delta> = {report['total_inner']:.4e}"
            )
        print(f"wrote {args.out}")
    return record


def run_merge(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix merge``."""
    from gradfix.jobs import TaskSpec, merge_checkpoints

    tasks = [TaskSpec(**t) for t in as_list(getattr(args, "tasks", None))]
    finetuned, bases, data = as_list(args.source_finetuned), as_list(args.source_base), as_list(args.data)
    if finetuned:
        if len(bases) not in (1, len(finetuned)) or len(data) not in (0, 1, len(finetuned)):
            raise ConfigError("merge: give --source-base and --data once, or once per --source-finetuned")
        for i, ft in enumerate(finetuned):
            tasks.append(
                TaskSpec(
                    bases[i if len(bases) > 1 else 0], ft, data[i if len(data) > 1 else 0] if data else None
                )
            )
    if not tasks:
        raise ConfigError("merge: missing --source-base/--source-finetuned (or `tasks:` in --config)")
    _require(args, "out")
    votes, masking = _settings(args)
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
        votes=votes,
        masking=masking,
        overwrite=args.overwrite,
        shard_bytes=parse_size(args.shard_size),
    )
    if record.get("written_by_another_process"):
        return record
    if not args.json:
        print(f"merged {len(tasks)} task vectors with {args.method} ({args.pipeline}), alpha={args.alpha}")
        print(f"wrote {args.out}")
    return record


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix eval``."""
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
    )
    if not args.json:
        print(f"accuracy {result['accuracy']:.4f} on {result['examples']} examples ({args.model})")
    return result

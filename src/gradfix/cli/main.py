"""``gradfix``: the command line over the Python API.

Every command also reads its options from a YAML file (``--config``); options given on the
command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from gradfix.cli.config import as_list, load_config, merge_config, parse_size
from gradfix.cli.inspect_cmd import add_inspect_parser
from gradfix.cli.zoo_cmd import add_zoo_parser
from gradfix.errors import ConfigError, GradfixError

_EPILOG_TRANSPORT = """\
example:
  gradfix transport --source-base A/ --source-finetuned A-ft/ --target-base B/ \\
      --recipe text-zero-shot --data few.jsonl --shots 2 --alpha 1.0 --out B-ft/

data: JSON lines {"text": ..., "label": ...} or CSV with text,label columns; `--shots` examples
per class are drawn from it with `--seed`. The output folder holds model.safetensors (sharded
when large), the target's config and tokenizer files, zero_shot_head.safetensors (text-zero-shot:
the target's own head, used by `gradfix eval`), and gradfix.json (inputs with sha256, settings,
kept fraction per tensor, first-order descent report).
"""

_EPILOG_MERGE = """\
examples:
  # TIES of two fine-tunes of the same base, applied to that base
  gradfix merge --source-base A/ --source-finetuned A-t1/ --source-finetuned A-t2/ --out A-merged/
  # multi-task transport onto a new base, merge-then-mask with the consensus sign
  gradfix merge --source-base A/ --source-finetuned A-t1/ --source-finetuned A-t2/ \\
      --target-base B/ --data t1.jsonl --data t2.jsonl --pipeline merge-then-mask --out B-merged/
  # multi-source: one task fine-tuned on two bases, both transported onto B and merged
  gradfix merge --source-base A1/ --source-finetuned A1-t/ --source-base A2/ --source-finetuned A2-t/ \\
      --target-base B/ --data t.jsonl --pipeline mask-then-merge --out B-t/

--source-base and --data may be given once (shared by every task) or once per --source-finetuned.
"""

TRANSPORT_DEFAULTS: dict[str, Any] = {
    "recipe": "text-zero-shot",
    "shots": 2,
    "seed": 0,
    "estimator": "majority",
    "engine": "auto",
    "method": "gradfix",
    "alpha": 1.0,
    "threshold": 0.3,
    "unvoted": "error",
    "gamma": 1.0,
    "batch_size": 8,
    "max_length": 128,
    "shard_size": "2GB",
    "overwrite": False,
    "progress": True,
    "json": False,
}
MERGE_DEFAULTS: dict[str, Any] = {
    **TRANSPORT_DEFAULTS,
    "mask": "agreement",
    "method": "ties",
    "pipeline": "plain",
    "density": 0.2,
    "elect": "mass",
    "trim_scope": "tensor",
}
EVAL_DEFAULTS: dict[str, Any] = {
    "recipe": "text-zero-shot",
    "batch_size": 32,
    "max_length": 128,
    "json": False,
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="read options from a YAML file (command line wins)")
    p.add_argument("--json", action="store_true", default=None, help="print the result as JSON")


def _shots(text: str) -> int | str:
    """``--shots``: a positive integer or ``all``."""
    from gradfix.data import parse_shots

    try:
        return parse_shots(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _one_line(message: str) -> str:
    """An error message on one line: its lines joined with ``; `` (blank lines dropped)."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or "unknown error"


def _voting(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("voting on the target (per-sample gradient signs)")
    g.add_argument(
        "--recipe", help="model family and loss: text-zero-shot (default), sequence-classification, causal-lm"
    )
    g.add_argument(
        "--shots",
        type=_shots,
        metavar="K|all",
        help="examples per class drawn from --data (default 2), or 'all': every example in file order, "
        "no draw (to split a long vote into parts with --votes-out and add them up with --votes-in)",
    )
    g.add_argument("--seed", type=int, help="seed of the draw and of the random mask (default 0)")
    g.add_argument(
        "--template", help='class prompt of the zero-shot head (default "This text is about {label}.")'
    )
    g.add_argument("--estimator", choices=["majority", "mean"], help="sign estimator (default majority)")
    g.add_argument(
        "--engine", choices=["auto", "vmap", "loop"], help="per-sample gradient engine (default auto)"
    )
    g.add_argument("--batch-size", type=int, help="samples per forward pass (default 8)")
    g.add_argument("--max-length", type=int, help="token limit per text (default 128)")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="hide the progress bar"
    )


def _masking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("masking and output")
    g.add_argument(
        "--mask",
        choices=["agreement", "forcing", "magnitude", "random", "gate", "confidence", "none"],
        help="agreement = GradFix (default with --method gradfix); gate = drop only where the votes "
        "oppose τ_A's sign by a margin ≥ --threshold; confidence = weight by the share of agreeing votes; "
        "none = no mask (default with the other methods)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        help="gate mask: share of opposing votes that drops a value (0: GradFix, >1: naive; default 0.3)",
    )
    g.add_argument("--alpha", type=float, help="scale α of the transported task vector (default 1.0)")
    g.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only tensors whose name matches (repeatable), e.g. 'encoder.*'",
    )
    g.add_argument("--exclude", action="append", metavar="GLOB", help="skip tensors whose name matches")
    g.add_argument(
        "--unvoted",
        choices=["error", "drop", "keep"],
        help="tensors of τ_A that got no gradient: error (default), drop or keep unmasked",
    )
    g.add_argument("--gamma", type=float, help="steepness of the magnitude mask (default 1.0)")
    g.add_argument("--out", help="output folder (written atomically)")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    g.add_argument("--shard-size", help="largest weight file, e.g. 2GB (default)")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradfix`` argument parser with its four commands."""
    parser = argparse.ArgumentParser(
        prog="gradfix",
        description="Carry a fine-tune across base-model releases with gradient-sign masking (GradFix).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser(
        "transport",
        help="move a task vector onto a new base model",
        epilog=_EPILOG_TRANSPORT,
        formatter_class=fmt,
        description="θ_B + α · (m ⊙ τ_A), m from the target's sign votes.",
    )
    t.add_argument("--source-base", help="the source pre-trained model A (folder or weights file)")
    t.add_argument("--source-finetuned", help="A fine-tuned on the task")
    t.add_argument("--target-base", help="the new base model B (same architecture)")
    t.add_argument("--data", help="labelled examples for the target's votes (.jsonl or .csv)")
    t.add_argument("--votes-in", action="append", metavar="FILE", help="add votes saved by --votes-out")
    t.add_argument("--votes-out", metavar="FILE", help="save the votes (safetensors) to resume or combine")
    t.add_argument(
        "--method",
        choices=["gradfix", "naive", "transfusion", "theseus"],
        help="gradfix (default): mask τ_A with the target's votes; naive: θ_B + α τ_A; transfusion: permute "
        "τ_A onto B (data-free re-basin); theseus: map τ_A onto B by Procrustes (widths may differ). "
        "transfusion/theseus are masked too when --mask is given",
    )
    _voting(t)
    _masking(t)
    _common(t)
    t.set_defaults(handler=run_transport)

    m = sub.add_parser(
        "merge",
        help="merge task vectors (Task Arithmetic, TIES), optionally with GradFix",
        epilog=_EPILOG_MERGE,
        formatter_class=fmt,
    )
    m.add_argument("--source-base", action="append", help="source base (once, or once per fine-tune)")
    m.add_argument("--source-finetuned", action="append", help="a fine-tuned model (repeat per task)")
    m.add_argument("--target-base", help="base to merge onto (default: the first source base)")
    m.add_argument("--data", action="append", help="labelled data per task (once, or once per fine-tune)")
    m.add_argument("--method", choices=["ties", "task_arithmetic"], help="merge method (default ties)")
    m.add_argument(
        "--pipeline",
        choices=["plain", "mask-then-merge", "merge-then-mask"],
        help="plain (default), or GradFix masks before/after merging",
    )
    m.add_argument("--density", type=float, help="TIES: fraction of magnitudes kept (default 0.2)")
    m.add_argument("--elect", choices=["mass", "count"], help="TIES sign election (default mass)")
    m.add_argument(
        "--trim-scope",
        choices=["tensor", "model"],
        help="TIES trimming per tensor (default) or over the whole model",
    )
    m.add_argument("--weights", type=float, nargs="+", help="one weight per task vector")
    _voting(m)
    _masking(m)
    _common(m)
    m.set_defaults(handler=run_merge)

    e = sub.add_parser("eval", help="accuracy of a model folder on labelled data")
    e.add_argument("--model", help="model folder")
    e.add_argument("--data", help="labelled examples (.jsonl or .csv)")
    e.add_argument("--recipe", help="text-zero-shot (default), sequence-classification")
    e.add_argument("--template", help="class prompt of the zero-shot head")
    e.add_argument(
        "--head-from",
        help="zero-shot head: a head file or another model folder "
        "(default: the folder's zero_shot_head.safetensors, else the model itself)",
    )
    e.add_argument("--batch-size", type=int, help="examples per forward pass (default 32)")
    e.add_argument("--max-length", type=int, help="token limit per text (default 128)")
    _common(e)
    e.set_defaults(handler=run_eval)

    add_inspect_parser(sub, _common)
    add_zoo_parser(sub, _common)
    return parser


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
    masking = MaskSettings(
        mask=args.mask,
        alpha=args.alpha,
        include=as_list(args.include),
        exclude=as_list(args.exclude),
        unvoted=args.unvoted,
        gamma=args.gamma,
        threshold=args.threshold,
    )
    return votes, masking


def run_transport(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix transport``."""
    from gradfix.jobs import transport_checkpoints

    _require(args, "source_base", "source_finetuned", "target_base", "out")
    if args.method == "naive" and args.mask not in (None, "none"):
        raise ConfigError(f"--method naive adds τ_A unmasked; drop --mask {args.mask} or use another method")
    if args.mask is None:
        args.mask = "agreement" if args.method == "gradfix" else "none"
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
            f"transported {len(record['kept_fraction'])} tensors with method={args.method} mask={args.mask} "
            f"alpha={args.alpha}"
            f" from {record['num_samples']} examples"
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


_DEFAULTS = {"transport": TRANSPORT_DEFAULTS, "merge": MERGE_DEFAULTS, "eval": EVAL_DEFAULTS}


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradfix`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        config = load_config(args.config) if getattr(args, "config", None) else {}
        extra = ("tasks",) if args.command == "merge" else ()
        args = merge_config(
            args, config, _DEFAULTS.get(args.command, {"json": False}), args.config or "config", extra
        )
        if args.command in ("transport", "merge"):
            from gradfix.distributed import init_from_environment

            init_from_environment()  # under torchrun: each process votes on its share
        result = args.handler(args)
        if isinstance(result, dict) and result.get("written_by_another_process"):
            return 0
    except GradfixError as exc:
        # A user error: one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"gradfix {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradfix: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        _end_process_group()
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Option definitions of the ``gradfix`` command line.

Holds the argparse side of ``transport``, ``merge`` and ``eval``: their help epilogs, their
defaults (applied after ``--config`` is merged, so a YAML file can override them), the value
parsers (``--shots``, ``--alpha``, ``--thresholds``, ``--alphas``), the option groups shared by
several commands (``--config``/``--json``, voting, masking) and one ``add_*_parser`` per command.
The handlers that run the commands live in :mod:`gradfix.cli.commands`; they are passed in by
:func:`gradfix.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from gradfix.errors import ConfigError
from gradfix.methods.autotune import DEFAULT_ALPHAS, DEFAULT_THRESHOLDS

Handler = Callable[[argparse.Namespace], Any]

EPILOG_TRANSPORT = """\
examples:
  # default: --method adaptive --alpha auto (gate threshold t and α chosen by 2-fold
  # cross-validation over the shots; the final votes use every shot)
  gradfix transport --source-base A/ --source-finetuned A-ft/ --target-base B/ \\
      --recipe text-zero-shot --data few.jsonl --shots 4 --out B-ft/
  # t and α chosen by accuracy on a labelled validation file
  gradfix transport ... --data few.jsonl --validation val.jsonl --out B-ft/
  # the published GradFix: agreement mask, fixed α
  gradfix transport ... --data few.jsonl --shots 2 --method gradfix --alpha 1.0 --out B-ft/

choosing (--method adaptive, or --alpha auto): every candidate (t, α) of --thresholds × --alphas
is scored as θ_B + α · (m_t ⊙ τ_A), m_t the vote-margin gate (t=0: GradFix's agreement mask,
t>1: naive addition): by accuracy on --validation, else by the mean loss on one half of the shots
with votes from the other half (2 folds, at least 2 shots per class). Ties go to the earlier
candidate. gradfix.json records the choice and every candidate's score under "choice".

data: JSON lines {"text": ..., "label": ...} or CSV with text,label columns; `--shots` examples
per class are drawn from it with `--seed`. The output folder holds model.safetensors (sharded
when large), the target's config and tokenizer files, zero_shot_head.safetensors (text-zero-shot:
the target's own head, used by `gradfix eval`), and gradfix.json (inputs with sha256, settings,
kept fraction per tensor, first-order descent report).
"""

EPILOG_MERGE = """\
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
    "method": None,  # adaptive; gradfix when --mask is given (resolved in run_transport)
    "alpha": None,  # auto with --method adaptive, else 1.0
    "threshold": None,  # 0.3 (the gate of --mask gate)
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
    "alpha": 1.0,
    "threshold": 0.3,
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


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--json``, shared by every command."""
    p.add_argument("--config", metavar="YAML", help="read options from a YAML file (command line wins)")
    p.add_argument("--json", action="store_true", default=None, help="print the result as JSON")


# The value parsers keep these names: argparse quotes a type's ``__name__`` in its
# "invalid <name> value" error when a parser raises ValueError (e.g. ``--shots ²``).
def _shots(text: str) -> int | str:
    """``--shots``: a positive integer or ``all``."""
    from gradfix.data import parse_shots

    try:
        return parse_shots(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _alpha(text: str) -> float | str:
    """``--alpha``: a number, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number or 'auto', got {text!r}") from None


def _grid_number(text: str) -> float | str:
    """A value of ``--thresholds``: a number, or ``naive`` (a threshold above 1)."""
    if text.strip().lower() == "naive":
        return "naive"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'naive', got {text!r}") from None


def _float(text: str) -> float:
    """A value of ``--alphas``."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def listed(values: Sequence[float], naive: bool = False) -> str:
    """A grid as the command line writes it: ``0 0.2 0.4 naive`` (``naive``: thresholds above 1)."""
    return " ".join("naive" if naive and v > 1 else f"{v:g}" for v in values)


def add_voting(p: argparse.ArgumentParser) -> None:
    """The options of the target's sign votes (``transport`` and ``merge``)."""
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


def add_masking(p: argparse.ArgumentParser, transport: bool = False) -> None:
    """The mask, α, tensor selection and output options (``transport`` and ``merge``)."""
    g = p.add_argument_group("masking and output")
    g.add_argument(
        "--mask",
        choices=["agreement", "forcing", "magnitude", "random", "gate", "confidence"]
        + (["tensorwise"] if transport else [])
        + ["none"],
        help="agreement = GradFix (default with --method gradfix); gate = drop only where the votes "
        "oppose τ_A's sign by a margin ≥ --threshold; confidence = weight by the share of agreeing votes; "
        + (
            "tensorwise = per tensor, τ_A whole where ⟨−ḡ, τ_A⟩ > 0 (ḡ the mean gradient), else the "
            "agreement mask; none = no mask (default with naive, transfusion, theseus). Giving --mask "
            "without --method selects --method gradfix"
            if transport
            else "none = no mask"
        ),
    )
    g.add_argument(
        "--threshold",
        type=float,
        help="gate mask: share of opposing votes that drops a value (0: GradFix, >1: naive; default 0.3)",
    )
    g.add_argument(
        "--alpha",
        type=_alpha if transport else float,
        metavar="ALPHA|auto" if transport else None,
        help="scale α of the transported task vector: a number, or auto (chosen; see --alphas); default "
        "auto with --method adaptive, 1.0 with the other methods"
        if transport
        else "scale α of the task vector (default 1.0)",
    )
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


def add_transport_parser(sub: Any, handler: Handler) -> None:
    """Register the ``transport`` command, run by ``handler``."""
    t = sub.add_parser(
        "transport",
        help="move a task vector onto a new base model",
        epilog=EPILOG_TRANSPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        choices=["adaptive", "gradfix", "naive", "transfusion", "theseus"],
        help="adaptive (default): the vote-margin gate with its threshold t and α chosen on --validation or "
        "on folds of the shots; gradfix: the published algorithm (agreement mask, fixed --alpha, default "
        "1.0; the default method when --mask is given); naive: θ_B + α τ_A; transfusion: permute τ_A onto "
        "B (data-free re-basin); theseus: map τ_A onto B by Procrustes (widths may differ). "
        "transfusion/theseus are masked too when --mask is given",
    )
    add_voting(t)
    add_masking(t, transport=True)
    c = t.add_argument_group("choosing t and α (--method adaptive, --alpha auto)")
    c.add_argument(
        "--thresholds",
        nargs="+",
        type=_grid_number,
        metavar="T",
        help="gate thresholds to try, most conservative first (default "
        f"{listed(DEFAULT_THRESHOLDS, naive=True)}; 0 is GradFix's agreement mask, naive or any value "
        "above 1 keeps every coordinate)",
    )
    c.add_argument(
        "--alphas",
        nargs="+",
        type=_float,
        metavar="A",
        help=f"α values to try with --alpha auto (default {listed(DEFAULT_ALPHAS)}; 0 keeps B unchanged)",
    )
    c.add_argument(
        "--validation",
        metavar="FILE",
        help="labelled examples (.jsonl or .csv, as --data) to choose by accuracy; without it the "
        "candidates are cross-validated over 2 folds of the shots (needs --shots 2 or more)",
    )
    add_common(t)
    t.set_defaults(handler=handler)


def add_merge_parser(sub: Any, handler: Handler) -> None:
    """Register the ``merge`` command, run by ``handler``."""
    m = sub.add_parser(
        "merge",
        help="merge task vectors (Task Arithmetic, TIES), optionally with GradFix",
        epilog=EPILOG_MERGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    add_voting(m)
    add_masking(m)
    add_common(m)
    m.set_defaults(handler=handler)


def add_eval_parser(sub: Any, handler: Handler) -> None:
    """Register the ``eval`` command, run by ``handler``."""
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
    add_common(e)
    e.set_defaults(handler=handler)

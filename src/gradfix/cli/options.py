"""Option definitions of the ``gradfix`` command line.

Holds the argparse side of ``transport``, ``merge`` and ``eval``: their help epilogs, the option
groups shared by several commands (``--config``/``--json``, voting, masking) and one
``add_*_parser`` per command. argparse only collects strings: each flag's metavar, choices and
default in its help come from :func:`gradfix.cli.fields.command_options` (the settings
dataclasses and the registries), and the values are converted and checked together with the
``--config`` YAML by :func:`gradfix.cli.config.validate_options`. The handlers that run the
commands live in :mod:`gradfix.cli.commands`; they are passed in by
:func:`gradfix.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from gradfix.cli.config import flag_of
from gradfix.cli.fields import Option, command_options
from gradfix.methods.autotune import DEFAULT_ALPHAS, DEFAULT_THRESHOLDS, GROWN_ALPHAS
from gradfix.settings import DEFAULT_MAX_LENGTH, DEFAULT_METHOD, DEFAULT_THRESHOLD

Handler = Callable[[argparse.Namespace], Any]

MAX_LENGTH_HELP = (
    "token limit per text (default: the model folder's sentence-transformers max_seq_length, "
    f"else {DEFAULT_MAX_LENGTH})"
)

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
t>1: naive addition): by accuracy on --validation, else by the loss on one half of the shots with
votes from the other half (2 folds, at least 2 shots per class), where B stays unchanged (α=0)
unless a candidate lowers B's held-out loss on both halves and by more than one standard error.
Ties go to the earlier candidate. gradfix.json records the choice and every candidate's score
under "choice".

data: JSON lines {"text": ..., "label": ...} or CSV with text,label columns; `--shots` examples
per class are drawn from it with `--seed`. The output folder holds model.safetensors (sharded
when large), the target's config and tokenizer files, zero_shot_head.safetensors (text-zero-shot:
the target's own head, used by `gradfix eval`), and gradfix.json (inputs with sha256, settings,
kept fraction per tensor, first-order descent report). With --out-format adapter --adapter-rank R
it holds adapter_config.json and adapter_model.safetensors instead of the weights and the target's
files: a PEFT LoRA adapter for the target (PeftModel.from_pretrained(B, out)), each updated
Linear/Embedding/Conv1D weight as its rank-R truncated SVD, the other updated tensors in full.

models: a folder, a weights file, or a Hugging Face Hub id org/name (org/name@REV for one
revision): the local cache first, else a download of the weights, configs and tokenizer files;
HF_HUB_OFFLINE=1 forbids downloads. gradfix.json records each Hub input's commit.
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
Every model may be a Hugging Face Hub id (org/name or org/name@REV), as in transport.
"""


REVISION_HELP = (
    "branch, tag or commit of every model given as a Hugging Face Hub id (org/name; "
    "org/name@REV names its own); default main"
)


def _default_text(option: Option) -> str:
    default = option.default
    if default is None or isinstance(default, (bool, list)):
        return ""
    return f" (default {default})"


def _summaries(names: Sequence[str], summaries: dict[str, str], default: str | None = None) -> str:
    """``name: summary`` for each name, ``(default)`` after the default one."""
    return "; ".join(f"{n}{' (default)' if n == default else ''}: {summaries[n]}" for n in names)


def add_option(group: Any, command: str, key: str, help: str, **kwargs: Any) -> None:
    """The flag of option ``key``: metavar and choices from its kind, its default in the help."""
    option = command_options(command)[key]
    if option.kind.choices and "metavar" not in kwargs:
        kwargs["metavar"] = "{" + ",".join(option.kind.choices) + "}"
    if option.kind.many and "action" not in kwargs:
        kwargs["nargs"] = "+"
    group.add_argument(flag_of(key), dest=key, help=help + _default_text(option), **kwargs)


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--json``, shared by every command."""
    p.add_argument("--config", metavar="YAML", help="read options from a YAML file (command line wins)")
    p.add_argument("--json", action="store_true", default=None, help="print the result as JSON")


def listed(values: Sequence[float], naive: bool = False) -> str:
    """A grid as the command line writes it: ``0 0.2 0.4 naive`` (``naive``: thresholds above 1)."""
    return " ".join("naive" if naive and v > 1 else f"{v:g}" for v in values)


def add_voting(p: argparse.ArgumentParser, command: str) -> None:
    """The options of the target's sign votes (``transport`` and ``merge``)."""
    from gradfix.recipes import DEFAULT_TEMPLATE, RECIPES

    g = p.add_argument_group("voting on the target (per-sample gradient signs)")
    add_option(g, command, "recipe", "model family and loss: " + ", ".join(RECIPES))
    add_option(
        g,
        command,
        "shots",
        "examples per class drawn from --data, or 'all': every example in file order, no draw (to "
        "split a long vote into parts with --votes-out and add them up with --votes-in)",
        metavar="K|all",
    )
    add_option(g, command, "seed", "seed of the draw and of the random mask", metavar="INT")
    add_option(g, command, "template", f'class prompt of the zero-shot head (default "{DEFAULT_TEMPLATE}")')
    add_option(g, command, "estimator", "sign estimator")
    if command == "transport":
        add_option(
            g,
            command,
            "signs",
            "where the mask's signs come from: B's votes, a short fine-tune of B on the shots, or auto "
            "(the fine-tune where the check's verdict is weak: τ_A barely agrees with the votes)",
        )
    add_option(g, command, "engine", "per-sample gradient engine")
    add_option(g, command, "batch_size", "samples per forward pass", metavar="INT")
    add_option(g, command, "max_length", MAX_LENGTH_HELP, metavar="INT")
    add_option(
        g,
        command,
        "device",
        "where B is loaded to vote (votes, check, descent report, choice): cpu, cuda, cuda:N, or auto "
        "(CUDA when available, else cpu)",
        metavar="DEVICE",
    )
    add_option(
        g,
        command,
        "dtype",
        "dtype of B for the votes: auto is float32 on cpu and the checkpoint's own dtype on a GPU; "
        "bfloat16/float16 vote with float32 accumulation (close to float32's votes, not equal; on "
        "cpu they save memory, not time). The written weights do not depend on it",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="hide the progress bar"
    )


def _mask_help(command: str) -> str:
    from gradfix.ops.masks import MASKS

    names = command_options(command)["mask"].kind.choices
    text = _summaries(names, {n: MASKS[n].summary for n in names})
    if command == "transport":
        return (
            f"{text}. Default: the method's mask (agreement with --method gradfix, gate with adaptive, "
            "none with naive, transfusion, theseus); giving --mask without --method selects --method gradfix"
        )
    return text


def add_masking(p: argparse.ArgumentParser, command: str) -> None:
    """The mask, α, tensor selection and output options (``transport`` and ``merge``)."""
    transport = command == "transport"
    g = p.add_argument_group("masking and output")
    add_option(g, command, "mask", _mask_help(command))
    add_option(
        g,
        command,
        "threshold",
        "gate mask: share of opposing votes that drops a value (0: GradFix, >1: naive"
        + (f"; default {DEFAULT_THRESHOLD})" if transport else ")"),
        metavar="T",
    )
    add_option(
        g,
        command,
        "alpha",
        "scale α of the transported task vector: a number, or auto (chosen; see --alphas); default "
        "auto with --method adaptive, 1.0 with the other methods"
        if transport
        else "scale α of the task vector",
        metavar="ALPHA|auto" if transport else "ALPHA",
    )
    add_option(g, command, "include", "only tensors whose name matches (repeatable), e.g. 'encoder.*'",
         action="append", metavar="GLOB")  # fmt: skip
    add_option(g, command, "exclude", "skip tensors whose name matches", action="append", metavar="GLOB")
    add_option(g, command, "unvoted", "tensors of τ_A that got no gradient: error, drop or keep unmasked")
    add_option(g, command, "gamma", "steepness of the magnitude mask", metavar="GAMMA")
    add_option(g, command, "out", "output folder (written atomically)", metavar="DIR")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    add_option(g, command, "shard_size", "largest weight file, e.g. 2GiB, 500MB or a number of bytes",
         metavar="SIZE")  # fmt: skip
    add_option(
        g,
        command,
        "out_format",
        "full: the target's weights with the update added; adapter: the update α·(m ⊙ τ_A) as a PEFT "
        "LoRA adapter for the target (needs --adapter-rank; transport only, not transfusion/theseus)",
    )
    add_option(
        g,
        command,
        "adapter_rank",
        "rank of every LoRA module of --out-format adapter (truncated SVD per module; gradfix.json "
        "records the share of the update's energy it keeps)",
        metavar="R",
    )


def _method_help() -> str:
    from gradfix.methods import METHODS

    return (
        _summaries(list(METHODS), {n: m.summary for n, m in METHODS.items()}, DEFAULT_METHOD)
        + ". gradfix is the published algorithm and the default method when --mask is given; "
        "transfusion/theseus are masked too when --mask is given"
    )


def add_transport_parser(sub: Any, handler: Handler) -> None:
    """Register the ``transport`` command, run by ``handler``."""
    t = sub.add_parser(
        "transport",
        help="move a task vector onto a new base model",
        epilog=EPILOG_TRANSPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="θ_B + α · (m ⊙ τ_A), m from the target's sign votes.",
    )
    add_option(t, "transport", "source_base", "the source pre-trained model A (folder or weights file)")
    add_option(t, "transport", "source_finetuned", "A fine-tuned on the task")
    add_option(t, "transport", "target_base", "the new base model B (same architecture)")
    add_option(t, "transport", "revision", REVISION_HELP, metavar="REV")
    add_option(
        t,
        "transport",
        "data",
        "labelled examples for the target's votes (.jsonl or .csv); with --method theseus also the "
        "shots on which A's and B's activations give the maps",
    )
    add_option(t, "transport", "votes_in", "add votes saved by --votes-out", action="append", metavar="FILE")
    add_option(
        t, "transport", "votes_out", "save the votes (safetensors) to resume or combine", metavar="FILE"
    )
    add_option(t, "transport", "method", _method_help())
    add_voting(t, "transport")
    add_masking(t, "transport")
    c = t.add_argument_group("choosing t and α (--method adaptive, --alpha auto)")
    add_option(
        c,
        "transport",
        "thresholds",
        "gate thresholds to try, most conservative first (default "
        f"{listed(DEFAULT_THRESHOLDS, naive=True)}; 0 is GradFix's agreement mask, naive or any value "
        "above 1 keeps every coordinate)",
        metavar="T",
    )
    add_option(c, "transport", "alphas",
         f"α values to try with --alpha auto (default {listed(DEFAULT_ALPHAS)}, and "
         f"{listed(GROWN_ALPHAS)} when {max(DEFAULT_ALPHAS):g} wins; 0 keeps B unchanged)",
         metavar="A")  # fmt: skip
    add_option(
        c,
        "transport",
        "validation",
        "labelled examples (.jsonl or .csv, as --data) to choose by accuracy; without it the "
        "candidates are cross-validated over 2 folds of the shots (needs --shots 2 or more)",
        metavar="FILE",
    )
    add_common(t)
    t.set_defaults(handler=handler)


def add_merge_parser(sub: Any, handler: Handler) -> None:
    """Register the ``merge`` command, run by ``handler``."""
    from gradfix.merge import MERGE_METHODS

    m = sub.add_parser(
        "merge",
        help="merge task vectors (Task Arithmetic, TIES), optionally with GradFix",
        epilog=EPILOG_MERGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_option(m, "merge", "source_base", "source base (once, or once per fine-tune)", action="append")
    add_option(m, "merge", "source_finetuned", "a fine-tuned model (repeat per task)", action="append")
    add_option(m, "merge", "target_base", "base to merge onto (default: the first source base)")
    add_option(m, "merge", "revision", REVISION_HELP, metavar="REV")
    add_option(m, "merge", "data", "labelled data per task (once, or once per fine-tune)", action="append")
    add_option(m, "merge", "method", "merge method: " + _summaries(list(MERGE_METHODS), MERGE_METHODS))
    add_option(m, "merge", "pipeline", "plain, or GradFix masks before/after merging")
    add_option(m, "merge", "density", "TIES: fraction of magnitudes kept", metavar="D")
    add_option(m, "merge", "elect", "TIES sign election")
    add_option(m, "merge", "trim_scope", "TIES trimming per tensor or over the whole model")
    add_option(m, "merge", "weights", "one weight per task vector", metavar="W")
    add_voting(m, "merge")
    add_masking(m, "merge")
    add_common(m)
    m.set_defaults(handler=handler)


def add_eval_parser(sub: Any, handler: Handler) -> None:
    """Register the ``eval`` command, run by ``handler``."""
    from gradfix.recipes import RECIPES

    e = sub.add_parser("eval", help="accuracy of a model folder on labelled data")
    add_option(e, "eval", "model", "model folder (or Hugging Face Hub id)")
    add_option(e, "eval", "revision", REVISION_HELP, metavar="REV")
    add_option(e, "eval", "data", "labelled examples (.jsonl or .csv)")
    add_option(e, "eval", "recipe", "model family and loss: " + ", ".join(RECIPES))
    add_option(e, "eval", "template", "class prompt of the zero-shot head")
    add_option(
        e,
        "eval",
        "head_from",
        "zero-shot head: a head file or another model folder "
        "(default: the folder's zero_shot_head.safetensors, else the model itself)",
    )
    add_option(e, "eval", "batch_size", "examples per forward pass", metavar="INT")
    add_option(e, "eval", "max_length", MAX_LENGTH_HELP, metavar="INT")
    add_common(e)
    e.set_defaults(handler=handler)

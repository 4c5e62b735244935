"""``gradfix check``: the pre-flight report of a transport; writes nothing.

Its model, data and voting options are the transport's own (:data:`gradfix.cli.fields.CHECK_FROM_TRANSPORT`,
validated with the same types as ``--config``); the job is :func:`gradfix.jobs.check.check_transport`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields
from typing import Any

from gradfix.cli.config import flag_of
from gradfix.cli.options import add_common, add_option, add_voting
from gradfix.errors import ConfigError

_EPILOG = """\
examples:
  gradfix check --source-base A/ --source-finetuned A-ft/ --target-base B/ \\
      --recipe text-zero-shot --data few.jsonl --shots 4
  gradfix check ... --json            # one JSON object (drift, sign_agreement, verdict, ...)

what it measures: the drift ‖θ_B − θ_A‖/‖θ_A‖; the share of τ_A's coordinates whose sign agrees
with B's vote on the shots (the descent direction), with an interval from bootstrap resamples of
the shots and the band of chance agreement of τ_A with its rows and columns permuted within each
tensor; the first-order loss change ⟨ḡ, Δ⟩ (α = 1) of naive addition and of the GradFix mask; the
agreement after re-basin when τ_A is not clearly 2 points above chance. Verdicts: transfers (recommends naive
or adaptive), permutation (transfusion), weak (adaptive), nothing-transfers (fine-tune B).
"""


def add_check_parser(sub: Any) -> None:
    """Register the ``check`` command."""
    p = sub.add_parser(
        "check",
        help="pre-flight report of a transport: drift, sign agreement, verdict (writes nothing)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Whether τ_A can help B, measured on the shots; no model is written.",
    )
    add_option(p, "check", "source_base", "the source pre-trained model A (folder or weights file)")
    add_option(
        p, "check", "source_finetuned", "A fine-tuned on the task, or a PEFT LoRA adapter folder trained on A"
    )
    add_option(p, "check", "target_base", "the new base model B (same architecture)")
    add_option(p, "check", "data", "labelled examples for the target's votes (.jsonl or .csv)")
    add_voting(p, "check")
    g = p.add_argument_group("tensors and statistics")
    add_option(
        g, "check", "include", "only tensors whose name matches (repeatable)", action="append", metavar="GLOB"
    )
    add_option(
        g, "check", "exclude", "skip tensors whose name matches (repeatable)", action="append", metavar="GLOB"
    )
    add_option(
        g, "check", "bootstrap", "bootstrap resamples of the shots for the agreement's interval", metavar="N"
    )
    add_option(
        g, "check", "permutations", "permutations of τ_A within tensors for the chance band", metavar="N"
    )
    add_option(
        g, "check", "coordinates", "coordinates that keep each shot's gradient for the bootstrap", metavar="N"
    )
    add_option(
        g,
        "check",
        "rebasin",
        "align τ_A by re-basin: when it is not clearly 2 points above chance (auto), always, never",
    )
    add_common(p)
    p.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the check on the validated options; print a short report unless ``--json``."""
    from gradfix.jobs.check import check_transport
    from gradfix.settings import CheckSettings, VoteSettings

    missing = [
        flag_of(k) for k in ("source_base", "source_finetuned", "target_base", "data") if not getattr(args, k)
    ]
    if missing:
        raise ConfigError(f"check: missing {', '.join(missing)} (on the command line or in --config)")
    votes = VoteSettings(**{f.name: getattr(args, f.name) for f in fields(VoteSettings)})
    settings = CheckSettings(**{f.name: getattr(args, f.name) for f in fields(CheckSettings)})
    record = check_transport(
        args.source_base,
        args.source_finetuned,
        args.target_base,
        votes,
        settings,
        include=list(args.include),
        exclude=list(args.exclude),
    )
    if not args.json:
        print_report(record)
    return record


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def print_report(record: dict[str, Any], top: int = 8) -> None:
    """The human-readable report: a summary, then the tensors that drifted most."""
    agree, null = record["sign_agreement"], record["sign_agreement"]["null"]
    first = record["first_order"]
    boot = agree["bootstrap"]
    print(f"drift ‖θ_B − θ_A‖/‖θ_A‖      {_pct(record['drift'])} over {len(record['drift_tensors'])} tensors")
    print(
        f"sign agreement τ_A vs B      {_pct(agree['estimate'])}  "
        f"({_pct(agree['low'])} – {_pct(agree['high'])}, "
        f"{boot['resamples']} bootstrap resamples of {record['data']['num_samples']} shots)"
    )
    print(
        f"chance (τ_A permuted)        {_pct(null['mean'])}  ({_pct(null['low'])} – {_pct(null['high'])}, "
        f"{null['permutations']} permutations); z = {agree['z']:.1f}"
    )
    rebasin = record["rebasin"]
    if rebasin.get("sign_agreement"):
        aligned = rebasin["sign_agreement"]
        print(f"after re-basin               {_pct(aligned['estimate'])}  z = {aligned['z']:.1f}")
    else:
        print(f"re-basin                     not tried: {rebasin['reason']}")
    print(
        f"first-order loss change α=1  naive {first['naive']:.4g}, GradFix mask {first['masked']:.4g} "
        f"(keeps {_pct(first['masked_kept_fraction'])} of τ_A)"
    )
    if record["unvoted"]:
        print(f"no gradient on the shots     {len(record['unvoted'])} tensor(s), e.g. {record['unvoted'][0]}")
    print(f"verdict                      {record['verdict']}: recommended {record['recommended_method']}")
    print(f"  {record['reason']}")
    drifts = record["drift_tensors"]
    ranked = sorted((n for n in drifts if drifts[n] is not None), key=lambda n: -drifts[n])[:top]
    if ranked:
        width = max(len(n) for n in ranked)
        tensors = agree["tensors"]
        print(f"\n{'tensor (most drift first)':<{width}}  {'drift':>9}  {'agreement':>9}")
        for n in ranked:
            print(f"{n:<{width}}  {_pct(drifts[n]):>9}  {_pct(tensors.get(n)):>9}")


def print_transport_verdict(record: dict[str, Any]) -> None:
    """The transport's one-line warning on stderr when its check's verdict is not ``transfers``."""
    from gradfix.jobs.check_votes import warning_line

    line = warning_line(record.get("check"))
    if line:
        print(f"gradfix: warning: {line}", file=sys.stderr)

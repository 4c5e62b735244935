"""``gradfix``: the command line over the Python API.

Every command also reads its options from a YAML file (``--config``); options given on the
command line win over the file, and both are validated together (:mod:`gradfix.cli.config`).

This module holds the entry point (:func:`main`, the ``gradfix`` console script) and
:func:`build_parser`, which assembles the commands: their options are defined in
:mod:`gradfix.cli.options` (``inspect`` and ``zoo`` in their own modules) and the
``transport``/``merge``/``eval`` handlers live in :mod:`gradfix.cli.commands`. The handlers are
re-exported here and bound by name when the parser is built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from gradfix.cli.check_cmd import add_check_parser
from gradfix.cli.commands import run_eval, run_merge, run_transport
from gradfix.cli.config import fill_unset, given_options, load_config, validate_options
from gradfix.cli.fields import COMMANDS
from gradfix.cli.inspect_cmd import add_inspect_parser
from gradfix.cli.options import add_common, add_eval_parser, add_merge_parser, add_transport_parser
from gradfix.cli.zoo_cmd import add_zoo_parser
from gradfix.errors import GradfixError

__all__ = [
    "build_parser",
    "main",
    "run_eval",
    "run_merge",
    "run_transport",
]


def _one_line(message: str) -> str:
    """An error message on one line: its lines joined with ``; `` (blank lines dropped)."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or "unknown error"


def build_parser() -> argparse.ArgumentParser:
    """The ``gradfix`` argument parser with its commands."""
    parser = argparse.ArgumentParser(
        prog="gradfix",
        description="Carry a fine-tune across base-model releases with gradient-sign masking (GradFix).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The handlers are looked up in this module's namespace when the parser is built.
    add_transport_parser(sub, run_transport)
    add_merge_parser(sub, run_merge)
    add_eval_parser(sub, run_eval)
    add_inspect_parser(sub, add_common)
    add_check_parser(sub)
    add_zoo_parser(sub, add_common)
    return parser


def _validated(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every option of a job command validated over its ``--config`` and defaults."""
    config = load_config(args.config) if args.config else {}
    if args.command not in COMMANDS:  # inspect and zoo: plain options, filled from the file as given
        args = fill_unset(args, config, args.config or "config")
        args.json = bool(args.json)
        return args
    options = validate_options(args.command, given_options(args), config, args.config or "config")
    meta = {k: getattr(args, k) for k in ("command", "config", "handler", "verbose")}
    return argparse.Namespace(**meta, **options)


_GROUP_COMMANDS = ("transport", "merge")
"""The commands that join a process group under ``torchrun`` (and leave it at the end)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised like Ctrl-C, so that partial outputs are removed."""

    def __init__(self, signum: int) -> None:
        """Remember which signal stopped the command."""
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop(signum: int, frame: FrameType | None) -> None:
    for other in _STOP_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradfix`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    finished = False
    try:
        with _stop_signals_raise():
            args = _validated(args)
            if args.command in _GROUP_COMMANDS:
                from gradfix.votes.distributed import init_from_environment
                from gradfix.votes.native import keep_freed_memory

                keep_freed_memory()  # freed tensors are reused, not page-faulted in again
                init_from_environment()  # under torchrun: each process votes on its share
            result = args.handler(args)
        finished = True
        if isinstance(result, dict) and result.get("written_by_another_process"):
            return 0
    except GradfixError as exc:
        # A user error: one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"gradfix {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        # A path given by the user (or named in its config) that cannot be used: one line too.
        reason = _one_line(exc.strerror or str(exc))
        print(f"gradfix {args.command}: error: {exc.filename}: {reason}", file=sys.stderr)
        return 2
    except Terminated as exc:
        name = signal.Signals(exc.signum).name
        print(f"gradfix: stopped by {name}; no output was written", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("gradfix: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        if args.command in _GROUP_COMMANDS:
            from gradfix.votes.distributed import end_process_group

            end_process_group(synchronize=finished)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

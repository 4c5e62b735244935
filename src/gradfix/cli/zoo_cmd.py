"""``gradfix zoo``: list, build and locate the cached scenarios (base pairs, task data, fine-tunes)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

_EPILOG = """\
examples:
  gradfix zoo list                               # every scenario, whether cached, sizes
  gradfix zoo build text-release-short           # build what is missing (reuses the cache)
  gradfix zoo build text-release-short --task headlines   # only what one task needs
  gradfix zoo path text-release-short            # the scenario's folder (A/, B/, data/, A-ft/, B-ft/)

The cache is $GRADFIX_CACHE, else ~/.cache/gradfix (--cache overrides both).
"""


def add_zoo_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the ``zoo`` command and its ``list``, ``build`` and ``path`` subcommands."""
    p = sub.add_parser(
        "zoo",
        help="build and locate the cached scenarios (base-model pairs, task data, fine-tunes)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    zoo = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND", required=True)

    listing = zoo.add_parser("list", help="the scenarios, what each holds, whether cached, sizes")
    _cache_option(listing)
    common(listing)
    listing.set_defaults(handler=run_zoo_list)

    build = zoo.add_parser("build", help="build a scenario (what is cached is reused)")
    build.add_argument("name", help="scenario name (see `gradfix zoo list`)")
    build.add_argument(
        "--task", action="append", metavar="TASK", help="only what this task needs (repeatable; default all)"
    )
    build.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="hide progress bars"
    )
    _cache_option(build)
    common(build)
    build.set_defaults(handler=run_zoo_build)

    path = zoo.add_parser("path", help="print a scenario's folder in the cache")
    path.add_argument("name", help="scenario name")
    _cache_option(path)
    common(path)
    path.set_defaults(handler=run_zoo_path)


def _cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="cache folder (default $GRADFIX_CACHE or ~/.cache/gradfix)")


def _size(num_bytes: int) -> str:
    """Bytes in a short human form (``12.3 MB``)."""
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def run_zoo_list(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix zoo list``: every registered scenario with its cache state and size."""
    from gradfix.zoo import cache_root, get_scenario, scenario_names, scenario_status

    cache = getattr(args, "cache", None)
    rows = []
    for name in scenario_names():
        scenario = get_scenario(name)
        status = scenario_status(scenario, cache)
        status.update(summary=scenario.summary, tasks=list(scenario.tasks), real=scenario.real)
        status.update(built_here=scenario.built)
        rows.append(status)
    if not getattr(args, "json", False):
        print(f"cache: {cache_root(cache)}")
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            state = r["state"] if r["state"] != "partial" else f"partial {r['built']}/{r['total']}"
            print(f"{r['name']:<{width}}  {state:<13} {_size(r['bytes']):>9}  {r['summary']}")
            pad = " " * width
            print(f"{pad}  holds A/, B/, data/, and A-ft/<task>/, B-ft/<task>/ for: {', '.join(r['tasks'])}")
            print(f"{pad}  real: {r['real']}")
            print(f"{pad}  built here: {r['built_here']}")
            print(f"{pad}  {r['path']}")
    return {"cache": str(cache_root(cache)), "scenarios": rows}


def run_zoo_build(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix zoo build NAME``: build what is missing and print the scenario's folder."""
    from gradfix.zoo import build_scenario, get_scenario, scenario_status

    scenario = get_scenario(args.name)
    quiet = bool(getattr(args, "json", False))
    progress = getattr(args, "progress", None) is not False and not quiet
    view = build_scenario(
        scenario,
        getattr(args, "cache", None),
        tasks=getattr(args, "task", None) or None,
        log=(lambda message: None) if quiet else print,
        progress=progress,
    )
    status = scenario_status(scenario, getattr(args, "cache", None))
    return {"name": scenario.name, "path": str(view), "state": status["state"], "bytes": status["bytes"]}


def run_zoo_path(args: argparse.Namespace) -> dict[str, Any]:
    """``gradfix zoo path NAME``: the scenario's folder (printed whether or not it is built)."""
    from gradfix.zoo import get_scenario, scenario_status

    scenario = get_scenario(args.name)
    status = scenario_status(scenario, getattr(args, "cache", None))
    if not getattr(args, "json", False):
        print(status["path"])
    return {"name": scenario.name, "path": status["path"], "state": status["state"]}

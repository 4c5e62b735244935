"""Resident memory of a fresh process, by phase: a ``gradfix`` command, or one batched pass.

Run as a script (a fresh interpreter each time; :func:`run` does so and parses what it prints):

- ``rss_phases.py command ARGS...`` runs ``gradfix ARGS...`` while a thread samples the process's
  RSS every millisecond, and reports, for each phase of a transport (the job's functions wrapped
  by name: scanning τ_A, loading B, the vote, the check, the descent report's backward, writing),
  the RSS at its start, its peak and its end; then the process's peak (``VmHWM``). A short-lived
  spike between two samples can be missed by the phase figures, never by ``VmHWM``.
- ``rss_phases.py activations MODEL DATA BATCH [--all-tensors]`` loads MODEL with the
  ``causal-lm`` recipe, lets the projections (or every tensor) require gradients as the
  transport does, and runs one batched forward+backward of the first BATCH examples of DATA, each
  parameter's gradient dropped as soon as it is made (:func:`gradfix.votes.summed.summed_gradients`,
  the descent report's pass). Its activations: the process's peak during the pass less its RSS with
  the model loaded (the peak is reset before the pass through ``/proc/self/clear_refs``, or, where
  that cannot be written, sampled).

Each prints ``RSS_PHASE start peak end label`` lines (bytes) and ``RSS_PEAK bytes`` on stderr.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHASES = (  # (module, function, label): what a transport does, in order
    ("gradfix.jobs.transport", "open_task_vector", "scan τ_A"),
    ("gradfix.jobs.common", "load_target", "load B"),
    ("gradfix.jobs.common", "estimate_signs", "vote"),
    ("gradfix.votes.finetune", "finetune_signs", "fine-tune (a fold)"),
    ("gradfix.jobs.signs", "finetune_signs", "fine-tune (every shot)"),
    ("gradfix.jobs.transport", "state_verdict", "check"),
    ("gradfix.jobs.transport", "descent_inner", "descent backward"),
    ("gradfix.jobs.transport", "write_model", "write"),
)


@dataclass
class Phase:
    """RSS (bytes) at a phase's start, its sampled peak, and at its end."""

    label: str
    start: int
    peak: int
    end: int


@dataclass
class Measured:
    """What a fresh process reported: its phases, its peak RSS, its wall seconds."""

    phases: list[Phase]
    peak: int
    wall: float


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Sampler:
    """A thread that keeps the highest RSS seen by every open frame (one per running phase)."""

    def __init__(self) -> None:
        self.frames: list[list[int]] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stopped.wait(0.001):
            rss = _status("VmRSS")
            for frame in list(self.frames):
                frame[0] = max(frame[0], rss)

    def timed(self, label: str, fn: Callable[..., Any], out: list[Phase]) -> Callable[..., Any]:
        """``fn`` that appends its phase to ``out`` when it returns (or raises)."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = _status("VmRSS")
            frame = [start]
            self.frames.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.frames = [f for f in self.frames if f is not frame]
                end = _status("VmRSS")
                out.append(Phase(label, start, max(frame[0], end), end))

        return wrapper


def _report(phases: list[Phase], sampled: int) -> None:
    for p in phases:
        print(f"RSS_PHASE {p.start} {p.peak} {p.end} {p.label}", file=sys.stderr)
    # the kernel updates VmHWM lazily (when memory is unmapped): a sample may read a little more
    print(f"RSS_PEAK {max(_status('VmHWM'), sampled)}", file=sys.stderr)


def _command(argv: list[str]) -> int:
    """``gradfix ARGV`` with its phases timed (the job's functions are restored afterwards)."""
    sampler, phases = _Sampler(), []  # type: ignore[var-annotated]
    whole = [0]
    sampler.frames.append(whole)
    saved = []
    for module_name, name, label in PHASES:
        module = importlib.import_module(module_name)
        if hasattr(module, name):  # a renamed function is left out of the table, not an error
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, sampler.timed(label, getattr(module, name), phases))
    from gradfix.cli.main import main

    try:
        code = main(argv)
    finally:
        sampler.stopped.set()
        for module, name, original in saved:
            setattr(module, name, original)
    _report(phases, whole[0])
    return code


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux 4.0+); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _activations(model_dir: str, data: str, batch: int, all_tensors: bool) -> int:
    from gradfix.data import UNLABELLED
    from gradfix.recipes import get_recipe, load_recipe
    from gradfix.votes.summed import summed_gradients

    model, recipe = load_recipe("causal-lm", model_dir, [UNLABELLED])
    for name, p in model.named_parameters():
        p.requires_grad_(all_tensors or name.endswith("_proj.weight"))
    examples = get_recipe("causal-lm").read_examples(data)[:batch]
    batches = [recipe.collate(examples)]
    loaded = _status("VmRSS")
    if _reset_peak():
        summed_gradients(model, batches, recipe.loss, lambda name, grad: None)
        peak = _status("VmHWM")
    else:
        phases: list[Phase] = []
        sampler = _Sampler()
        sampler.timed("pass", summed_gradients, phases)(model, batches, recipe.loss, lambda n, g: None)
        sampler.stopped.set()
        peak = phases[-1].peak
    print(f"RSS_PHASE {loaded} {loaded} {loaded} loaded", file=sys.stderr)
    print(f"RSS_PHASE {loaded} {peak} {_status('VmRSS')} pass", file=sys.stderr)
    print(f"RSS_PEAK {peak}", file=sys.stderr)
    return 0


def run(args: list[str]) -> Measured:
    """Run this script with ``args`` in a fresh interpreter; raise SystemExit if it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__)), *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse(done.stderr, wall)


def parse(printed: str, wall: float = 0.0) -> Measured:
    """The phases and the peak in what a measurement printed on stderr."""
    phases, peak = [], 0
    for line in printed.splitlines():
        if line.startswith("RSS_PHASE "):
            _, start, peak_rss, end, label = line.split(maxsplit=4)
            phases.append(Phase(label, int(start), int(peak_rss), int(end)))
        elif line.startswith("RSS_PEAK "):
            peak = int(line.split()[1])
    return Measured(phases, peak, wall)


def activations(model_dir: Path, data: Path, batch: int, all_tensors: bool) -> int:
    """Bytes of one batched forward+backward's activations on ``model_dir`` (a fresh process)."""
    extra = ["--all-tensors"] if all_tensors else []
    measured = run(["activations", str(model_dir), str(data), str(batch), *extra])
    loaded, passed = measured.phases
    return passed.peak - loaded.start


def phase_lines(phases: list[Phase], scale: int, unit: str = "x model bytes") -> list[str]:
    """One line per phase: RSS at its start, its peak and its end, over ``scale``."""
    width = max((len(p.label) for p in phases), default=0)
    return [
        f"{p.label:<{width}}  start {p.start / scale:5.2f}  peak {p.peak / scale:5.2f}  "
        f"end {p.end / scale:5.2f} {unit}"
        for p in phases
    ]


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "command":
        sys.exit(_command(rest))
    if what == "activations":
        sys.exit(_activations(rest[0], rest[1], int(rest[2]), "--all-tensors" in rest[3:]))
    raise SystemExit(f"unknown measurement {what!r}: command or activations")

"""Time of the streaming safetensors writer against the number of tensors.

Writes N zero-size tensors plus three ordinary ones (N = 25 000, 50 000, 100 000 by default) into a
temporary folder, once through :class:`gradfix.io.streaming.StreamingShardedWriter` fed tensor by
tensor and once through :func:`gradfix.io.save_state_dict`, and prints the seconds of each and
the ratio of each time to the previous one. Writing is linear when doubling N about doubles the
time (ratio ≈ 2); a quadratic step shows as a ratio near 4.

Run:  python benchmarks/writer_many_tensors.py [--counts 25000 50000 100000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gradfix.io import save_state_dict
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan


def many_tensors(count: int) -> dict[str, torch.Tensor]:
    """``count`` zero-size tensors with three ordinary tensors among them."""
    tensors: dict[str, torch.Tensor] = {"first.weight": torch.ones(4, 4)}
    for i in range(count):
        tensors[f"empty.{i}"] = torch.zeros(0, 3)
        if i == count // 2:
            tensors["middle.weight"] = torch.arange(6, dtype=torch.int64)
    tensors["last.bias"] = torch.full((5,), 2.0, dtype=torch.bfloat16)
    return tensors


def time_streaming(tensors: dict[str, torch.Tensor], folder: Path) -> float:
    """Seconds to plan and write ``tensors`` with the streaming writer."""
    start = time.perf_counter()
    plan = [TensorPlan(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = StreamingShardedWriter(folder, plan)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return time.perf_counter() - start


def time_save_state_dict(tensors: dict[str, torch.Tensor], folder: Path) -> float:
    """Seconds of :func:`save_state_dict` on ``tensors``."""
    start = time.perf_counter()
    save_state_dict(tensors, folder)
    return time.perf_counter() - start


def main() -> None:
    """Print the time of each writer for each count, and the ratio to the previous count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    args = parser.parse_args()
    previous: dict[str, float] = {}
    print(f"{'zero-size tensors':>18} {'writer':>16} {'seconds':>9} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as root:
        for count in args.counts:
            tensors = many_tensors(count)
            for label, run in (("streaming", time_streaming), ("save_state_dict", time_save_state_dict)):
                folder = Path(root) / f"{label}-{count}"
                folder.mkdir()
                seconds = run(tensors, folder)
                ratio = f"{seconds / previous[label]:7.2f}" if label in previous else f"{'-':>7}"
                previous[label] = seconds
                print(f"{count:>18} {label:>16} {seconds:9.3f} {ratio}", flush=True)


if __name__ == "__main__":
    main()

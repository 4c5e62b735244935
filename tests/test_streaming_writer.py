"""The streaming safetensors writer: readable by safetensors and transformers, chunked writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gradfix.io import load_state_dict
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan, plan_shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "first-empty": torch.zeros(0),
        "a.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "b.weight": torch.randn(11, 3, generator=g).to(torch.float16),
        "steps": torch.arange(4),
        "flag": torch.tensor([True, False]),
    }


def _plan(tensors: dict[str, torch.Tensor]) -> list[TensorPlan]:
    return [TensorPlan(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("shard_bytes", [10**9, 64])
def test_round_trip_with_row_chunks(tmp_path, shard_bytes) -> None:
    tensors = _tensors()
    writer = StreamingShardedWriter(tmp_path, _plan(tensors), shard_bytes, {"origin": "test"})
    for name, t in tensors.items():
        for start in range(0, max(len(t), 1), 3):  # rows in chunks of 3
            writer.write(name, t[start : start + 3])
    files = writer.close()
    loaded = load_state_dict(tmp_path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    if shard_bytes == 64:
        assert len(files) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
    else:
        assert [f.name for f in files] == ["model.safetensors"]
        assert set(load_file(str(files[0]))) == set(tensors)


def test_errors_for_order_size_and_missing_data(tmp_path) -> None:
    tensors = _tensors()
    writer = StreamingShardedWriter(tmp_path / "x", _plan(tensors), 10**9)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match=r"expected data of a\.weight"):
        writer.write("a.bias", tensors["a.bias"])
    with pytest.raises(ValueError, match="more data"):
        writer.write("a.weight", torch.zeros(8, 5))
    writer.abort()
    writer = StreamingShardedWriter(tmp_path / "x", _plan(tensors), 10**9)
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match=r"no data was written for a\.bias"):
        writer.close()
    with pytest.raises(ValueError, match=r"planned torch\.float32"):
        StreamingShardedWriter(tmp_path / "x", _plan(tensors), 10**9).write(
            "a.weight", torch.zeros(7, 5).double()
        )


def test_plan_shards_keeps_order_and_isolates_large_tensors() -> None:
    plan = [
        TensorPlan("a", torch.float32, (10,)),
        TensorPlan("b", torch.float32, (100,)),
        TensorPlan("c", torch.float32, (5,)),
        TensorPlan("d", torch.float32, (5,)),
    ]
    assert [[t.name for t in s] for s in plan_shards(plan, 60)] == [["a"], ["b"], ["c", "d"]]

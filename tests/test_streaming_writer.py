"""The streaming safetensors writer: readable by safetensors and transformers, chunked writes,
the same bytes through save_state_dict, linear in the number of tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gradfix.io import load_state_dict, save_state_dict
from gradfix.io.streaming import StreamingShardedWriter, TensorPlan, plan_shards, shard_file_names


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


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("shard_bytes", [10**9, 64])
def test_save_state_dict_is_byte_identical_to_the_streaming_writer(tmp_path, shard_bytes) -> None:
    tensors = _tensors()
    meta = {"task": "demo", "origin": "test"}
    writer = StreamingShardedWriter(tmp_path / "stream", _plan(tensors), shard_bytes, meta)
    (tmp_path / "stream").mkdir()
    for name, t in tensors.items():
        for start in range(0, max(len(t), 1), 2):
            writer.write(name, t[start : start + 2])
    streamed = [p.name for p in writer.close()]
    saved = save_state_dict(tensors, tmp_path / "saved", max_shard_bytes=shard_bytes, metadata=meta)
    assert [p.name for p in saved] == streamed
    assert _files(tmp_path / "saved") == _files(tmp_path / "stream")
    header = json.loads(saved[0].read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert list(header["__metadata__"]) == ["format", "origin", "task"]  # sorted


def test_many_zero_size_tensors(tmp_path) -> None:
    tensors = {"head": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for i in range(20_000):
        tensors[f"empty.{i}"] = torch.zeros(0, 3)
        if i == 10_000:
            tensors["middle"] = torch.tensor([1, 2, 3], dtype=torch.int64)
    tensors["tail"] = torch.ones(4, dtype=torch.bfloat16)
    writer = StreamingShardedWriter(tmp_path / "stream", _plan(tensors), 10**9)
    (tmp_path / "stream").mkdir()
    for name, t in tensors.items():
        writer.write(name, t)
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "stream" / "model.safetensors"))
    assert len(loaded) == len(tensors)
    for name in ("head", "middle", "tail", "empty.0", "empty.19999"):
        assert loaded[name].dtype == tensors[name].dtype and torch.equal(loaded[name], tensors[name])
    assert all(loaded[f"empty.{i}"].shape == (0, 3) for i in range(20_000))
    save_state_dict(tensors, tmp_path / "saved", max_shard_bytes=24)  # head | middle + empties | tail
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == len(tensors)
    assert index["metadata"] == {"total_size": 24 + 24 + 8}
    assert index["weight_map"]["empty.19999"] == "model-00002-of-00003.safetensors"
    reloaded = load_state_dict(tmp_path / "saved")
    assert torch.equal(reloaded["middle"], tensors["middle"]) and reloaded["empty.5"].shape == (0, 3)


def test_plan_checks_and_shard_names(tmp_path) -> None:
    plan = [TensorPlan("a", torch.float32, (1,))]
    with pytest.raises(ValueError, match="'a' is planned twice"):
        StreamingShardedWriter(tmp_path, plan * 2)
    with pytest.raises(ValueError, match="cannot be written"):
        StreamingShardedWriter(tmp_path, [TensorPlan("c", torch.complex64, (1,))])
    with pytest.raises(ValueError, match="positive"):
        StreamingShardedWriter(tmp_path, plan, 0)
    with pytest.raises(ValueError, match="not in the output plan"):
        StreamingShardedWriter(tmp_path, plan).write("b", torch.ones(1))
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert StreamingShardedWriter(tmp_path, plan).shards == [plan]  # default: settings.DEFAULT_SHARD_BYTES


def test_writer_oversized_tensor_gets_own_shard(tmp_path) -> None:
    sd = {"small1": torch.zeros(5), "big": torch.zeros(100), "small2": torch.zeros(5)}
    paths = save_state_dict(sd, tmp_path, max_shard_bytes=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = index["weight_map"]
    assert shards["big"] not in (shards["small1"], shards["small2"])
    assert len(paths) == 3


def test_writer_duplicates_views_and_shared_storage(tmp_path) -> None:
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5).requires_grad_()
    sd = {
        "w": base,
        "tied": base,  # same storage as "w"
        "rows": base[1:3],  # view into a larger storage
        "t": base.t(),  # not contiguous
    }
    save_state_dict(sd, tmp_path)
    loaded = load_state_dict(tmp_path)
    assert torch.equal(loaded["tied"], base.detach())
    assert torch.equal(loaded["rows"], base.detach()[1:3])
    assert torch.equal(loaded["t"], base.detach().t())


def test_save_state_dict_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(TypeError, match="'a'"):
        save_state_dict({"a": [1.0]}, tmp_path / "x")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="dense"):
        save_state_dict({"a": torch.eye(2).to_sparse()}, tmp_path / "x")
    with pytest.raises(ValueError, match="non-empty"):
        save_state_dict({"": torch.ones(1)}, tmp_path / "x")
    with pytest.raises(ValueError, match="positive"):
        save_state_dict({"a": torch.ones(1)}, tmp_path / "x", max_shard_bytes=0)
    with pytest.raises(TypeError, match="int"):
        save_state_dict({"a": torch.ones(1)}, tmp_path / "x", max_shard_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str to str"):
        save_state_dict({"a": torch.ones(1)}, tmp_path / "x", metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="complex64"):
        save_state_dict({"a": torch.ones(1, dtype=torch.complex64)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_save_state_dict_empty_and_large_tensor_chunks(tmp_path, monkeypatch) -> None:
    import gradfix.io.writer as writer_module

    assert save_state_dict({}, tmp_path / "empty") == [tmp_path / "empty" / "model.safetensors"]
    assert load_state_dict(tmp_path / "empty") == {}
    monkeypatch.setattr(writer_module, "_CHUNK_BYTES", 24)  # 2 rows of 3 float32 per chunk
    sd = {"m": torch.arange(21, dtype=torch.float32).reshape(7, 3), "s": torch.tensor(2.0)}
    save_state_dict(sd, tmp_path / "chunks")
    loaded = load_state_dict(tmp_path / "chunks")
    assert all(loaded[n].dtype == t.dtype and torch.equal(loaded[n], t) for n, t in sd.items())

"""Tests for gradfix.io: checkpoint reading, sharded writing, atomic output folders."""

from __future__ import annotations

import inspect
import json
import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from gradfix.errors import CheckpointError, ConfigError
from gradfix.io import (
    CheckpointReader,
    atomic_output_dir,
    check_output_not_input,
    copy_model_files,
    load_state_dict,
    open_checkpoint,
    save_state_dict,
    sha256_file,
)


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "layer.0.weight": torch.randn(8, 8, generator=gen).half(),
        "layer.0.bias": torch.randn(8, generator=gen),
        "layer.1.weight": torch.randn(8, 8, generator=gen),
        "position_ids": torch.arange(32, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


# --- reading ---------------------------------------------------------------------------------


def test_single_safetensors_file_round_trip(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    file = tmp_path / "weights.safetensors"
    save_file(sd, str(file), metadata={"format": "pt", "origin": "test"})
    with open_checkpoint(file) as reader:
        assert isinstance(reader, CheckpointReader)
        assert reader.path == file
        assert reader.files == [file]
        assert len(reader) == len(sd)
        assert "layer.0.bias" in reader and "missing" not in reader
        assert reader.shapes() == {k: tuple(v.shape) for k, v in sd.items()}
        assert reader.dtypes() == {k: v.dtype for k, v in sd.items()}
        assert reader.metadata() == {"format": "pt", "origin": "test"}
        assert torch.equal(reader.get("layer.1.weight"), sd["layer.1.weight"])
    _assert_same(load_state_dict(file), sd)


def test_folder_with_model_safetensors(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    paths = save_state_dict(sd, tmp_path)
    assert paths == [tmp_path / "model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == paths
        assert sorted(reader.names()) == sorted(sd)
        assert reader.metadata() == {"format": "pt"}
    _assert_same(load_state_dict(tmp_path), sd)


def test_sharded_writer_round_trip(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    paths = save_state_dict(sd, tmp_path, max_shard_bytes=300, metadata={"task": "demo"})
    assert len(paths) >= 3
    count = len(paths)
    assert [p.name for p in paths] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    assert not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in paths] + ["model.safetensors.index.json"]
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert index["metadata"] == {"total_size": total}
    assert set(index["weight_map"]) == set(sd)
    assert set(index["weight_map"].values()) == {p.name for p in paths}
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == paths
        # Shard by shard, in the order the index assigns them.
        shard_rank = {p.name: i for i, p in enumerate(paths)}
        ranks = [shard_rank[index["weight_map"][n]] for n in reader.names()]
        assert ranks == sorted(ranks) and sorted(reader.names()) == sorted(sd)
        assert reader.metadata() == {"format": "pt", "task": "demo"}
        for name in sd:
            shard = tmp_path / index["weight_map"][name]
            assert name in open_checkpoint(shard)
    _assert_same(load_state_dict(tmp_path), sd)
    # The index file itself is also accepted.
    _assert_same(load_state_dict(tmp_path / "model.safetensors.index.json"), sd)


def test_torch_bin_file_and_folder(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    for target in (tmp_path, tmp_path / "pytorch_model.bin"):
        with open_checkpoint(target) as reader:
            assert reader.files == [tmp_path / "pytorch_model.bin"]
            assert reader.names() == list(sd)
            assert reader.dtypes() == {k: v.dtype for k, v in sd.items()}
            assert reader.metadata() == {}
    _assert_same(load_state_dict(tmp_path), sd)


def test_legacy_bin_format_without_mmap(tmp_path: Path) -> None:
    sd = _mixed_state_dict()
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    _assert_same(load_state_dict(tmp_path / "old.bin"), sd)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"b": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert open_checkpoint(tmp_path).names() == ["a"]


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_state_dict_is_unwrapped(tmp_path: Path, key: str) -> None:
    sd = _mixed_state_dict()
    torch.save({key: sd, "epoch": 3, "optimizer_name": "adam"}, tmp_path / "ckpt.pt")
    _assert_same(load_state_dict(tmp_path / "ckpt.pt"), sd)


def test_non_state_dict_bin_is_rejected(tmp_path: Path) -> None:
    torch.save({"weights": [torch.ones(1)], "step": 4}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth.*dict of tensors"):
        open_checkpoint(tmp_path / "odd.pth")


def test_sharded_bin_index(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(3)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(2, 2)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "metadata": {},
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        },
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as reader:
        assert reader.names() == ["a", "b"]
        assert reader.shapes() == {"a": (3,), "b": (2, 2)}
        assert len(reader.files) == 2


def test_reader_reopens_after_close(tmp_path: Path) -> None:
    save_state_dict({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path, max_shard_bytes=8)
    reader = open_checkpoint(tmp_path)
    reader.close()
    assert torch.equal(reader.get("b"), torch.zeros(3))
    reader.close()


# --- Hugging Face compatibility --------------------------------------------------------------


def _tiny_bert() -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers, transformers.BertModel(config).eval()


def test_reads_transformers_save_pretrained(tmp_path: Path) -> None:
    transformers, model = _tiny_bert()
    expected = model.state_dict()
    safe_dir = tmp_path / "safe"
    model.save_pretrained(safe_dir)
    with open_checkpoint(safe_dir) as reader:
        assert reader.metadata().get("format") == "pt"
        for name in reader.names():
            assert torch.equal(reader.get(name), expected[name]), name

    bin_dir = tmp_path / "bin"
    params = inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters
    if "safe_serialization" in params:
        model.save_pretrained(bin_dir, safe_serialization=False)
    else:
        bin_dir.mkdir()
        model.config.save_pretrained(bin_dir)
        torch.save(expected, bin_dir / "pytorch_model.bin")
    with open_checkpoint(bin_dir) as reader:
        assert reader.files == [bin_dir / "pytorch_model.bin"]
        for name in reader.names():
            assert torch.equal(reader.get(name), expected[name]), name


def test_transformers_loads_sharded_writer_output(tmp_path: Path) -> None:
    transformers, model = _tiny_bert()
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    dst = tmp_path / "dst"
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    paths = save_state_dict(shifted, dst, max_shard_bytes=16 * 1024)
    assert len(paths) > 1
    copied = copy_model_files(src, dst)
    assert "config.json" in copied and "vocab.txt" in copied
    loaded, info = transformers.BertModel.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, shifted[name]), name


# --- errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        open_checkpoint(tmp_path / "nowhere")


def test_empty_folder_and_folder_listing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}.*no weight files"):
        open_checkpoint(tmp_path)
    save_file({"a": torch.ones(1)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file(_mixed_state_dict(), str(file))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a valid safetensors"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.bin"])
def test_garbage_bytes(tmp_path: Path, name: str) -> None:
    file = tmp_path / name
    file.write_bytes(bytes(range(256)) * 7)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_state_dict(file)


def test_index_errors(tmp_path: Path) -> None:
    paths = save_state_dict(
        {"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4)}, tmp_path, max_shard_bytes=16
    )
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())

    paths[1].unlink()
    with pytest.raises(CheckpointError, match=paths[1].name):
        open_checkpoint(tmp_path)

    index_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json.*JSON"):
        open_checkpoint(tmp_path)

    index_file.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json.*weight_map"):
        open_checkpoint(tmp_path)

    # The same tensor stored in two shards.
    save_file({"b": torch.ones(4), "a": torch.ones(4)}, str(paths[1]))
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'a'.*two shards"):
        open_checkpoint(tmp_path)


def test_unknown_tensor_name(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(1)}, str(file))
    with open_checkpoint(file) as reader, pytest.raises(CheckpointError) as excinfo:
        reader.get("nope")
    assert "nope" in str(excinfo.value) and "w.safetensors" in str(excinfo.value)


class _TouchOnLoad:
    """Unpickling an instance of this class creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.ones(1), "payload": _TouchOnLoad(marker)}, bad)
    assert not marker.exists()
    for call in (open_checkpoint, load_state_dict):
        for target in (bad, tmp_path):
            with pytest.raises(CheckpointError) as excinfo:
                call(target)
            message = str(excinfo.value)
            assert "pytorch_model.bin" in message
            assert "weights_only" in message and "arbitrary code" in message
            assert "save_file" in message
            assert "\n" not in message
    assert not marker.exists()


# --- output folders --------------------------------------------------------------------------


def test_atomic_output_dir_success(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic_output_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "file.txt").write_text("hi")
        assert not dest.exists()
    assert (dest / "file.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(dest) as tmp:
        (tmp / "file.txt").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_existing_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(ConfigError, match=r"out.*--overwrite"), atomic_output_dir(dest):
        pass
    assert (dest / "old.txt").read_text() == "old"

    with pytest.raises(ValueError, match="midway"), atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError("midway")
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_with_sharded_writer(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with pytest.raises(KeyError), atomic_output_dir(dest) as tmp:
        save_state_dict({"a": torch.ones(4), "b": torch.ones(4)}, tmp, max_shard_bytes=8)
        raise KeyError("stop")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(dest) as tmp:
        save_state_dict({"a": torch.ones(4), "b": torch.ones(4)}, tmp, max_shard_bytes=8)
    assert load_state_dict(dest).keys() == {"a", "b"}


def test_check_output_not_input(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    weights = tmp_path / "ft" / "model.safetensors"
    weights.parent.mkdir()
    weights.touch()
    inputs = [base, weights]
    check_output_not_input(tmp_path / "out", inputs)
    check_output_not_input(tmp_path / "base2", inputs)
    with pytest.raises(ConfigError, match="same path"):
        check_output_not_input(tmp_path / "x" / ".." / "base", inputs)
    with pytest.raises(ConfigError, match="inside"):
        check_output_not_input(base / "out", inputs)
    with pytest.raises(ConfigError, match="contains"):
        check_output_not_input(tmp_path / "ft", inputs)
    with pytest.raises(ConfigError, match="contains"):
        check_output_not_input(tmp_path, inputs)
    with pytest.raises(ConfigError, match="same path"):
        check_output_not_input(weights, inputs)


def test_sha256_file(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # spans several 1 MiB blocks
    file = tmp_path / "blob"
    file.write_bytes(data)
    assert sha256_file(file) == hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match="absent"):
        sha256_file(tmp_path / "absent")


def test_copy_model_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / ".git").mkdir()
    keep = {
        "config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "vocab.txt": "a\nb\n",
        "special_tokens_map.json": "{}",
        "modules.json": "[]",
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
    }
    skip = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "optimizer.pt",
        "rng_state.pth",
        "last.ckpt",
        "gradfix.json",
        ".gitattributes",
        ".git/HEAD",
    ]
    for rel, text in keep.items():
        (src / rel).write_text(text)
    for rel in skip:
        (src / rel).write_text("x")
    dst = tmp_path / "dst"
    copied = copy_model_files(src, dst)
    assert sorted(copied) == sorted(keep)
    for rel, text in keep.items():
        assert (dst / rel).read_text() == text
    for rel in skip:
        assert not (dst / rel).exists()
    assert copy_model_files(src / "config.json", tmp_path / "other") == []
    assert not (tmp_path / "other").exists()


# --- malformed files and failed writes --------------------------------------------------------


def test_safetensors_header_is_checked_before_the_library_reads_it(tmp_path: Path) -> None:
    import struct

    cases = {
        "short.safetensors": (b"\x02\x00", r"only 2 bytes"),
        "long.safetensors": (
            struct.pack("<Q", 999) + b"{}" + b" " * 6,
            r"claims 999 bytes but the file has 16",
        ),
        "text.safetensors": (struct.pack("<Q", 8) + b"[1,2,3] ", r"header is not a JSON object"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}: not a valid safetensors file \(.*{pattern}"):
            open_checkpoint(tmp_path / name)
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as handle:  # sparse: no disk space used
        handle.write(struct.pack("<Q", 150_000_000) + b"{")
        handle.truncate(150_000_100)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors.*exceeds the 100000000-byte limit"):
        open_checkpoint(huge)


def test_sparse_tensors_in_pytorch_files_are_refused(tmp_path: Path) -> None:
    torch.save({"dense": torch.ones(2), "w": torch.eye(3).to_sparse()}, tmp_path / "sparse.bin")
    with pytest.raises(CheckpointError, match=r"sparse\.bin: tensor 'w' is torch\.sparse_coo.*dense tensors"):
        load_state_dict(tmp_path / "sparse.bin")


def test_failed_writes_leave_nothing_and_name_the_destination(tmp_path: Path) -> None:
    import errno

    from gradfix.errors import OutputError
    from gradfix.io import atomic_output_file, check_output_free

    dest = tmp_path / "votes.safetensors"
    full = pytest.raises(OutputError, match=r"votes\.safetensors: cannot write the file \(No space left")
    with full, atomic_output_file(dest) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_file(dest) as tmp:
        tmp.write_bytes(b"done")
    assert dest.read_bytes() == b"done" and list(tmp_path.iterdir()) == [dest]
    with pytest.raises(ConfigError, match=r"votes\.safetensors: .*--overwrite"):
        check_output_free(dest)
    with pytest.raises(ConfigError, match="--overwrite"), atomic_output_file(dest):
        pass
    assert dest.read_bytes() == b"done"

    blocker = tmp_path / "file"
    blocker.write_text("x")
    blocked = pytest.raises(OutputError, match=r"file/deeper: cannot create the output's folder")
    with blocked, atomic_output_dir(blocker / "deeper" / "out"):
        pass
    full = pytest.raises(OutputError, match=r"out: cannot write it \(No space left on device\); nothing")
    with full, atomic_output_dir(tmp_path / "new" / "out") as tmp:
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "votes.safetensors"]


def test_copying_model_files_onto_a_full_disk_is_an_output_error(tmp_path: Path, monkeypatch) -> None:
    import errno
    import shutil

    from gradfix.errors import OutputError

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", full)
    with pytest.raises(OutputError, match=r"cannot copy .*config\.json \(No space left on device\)"):
        copy_model_files(src, tmp_path / "dst")

"""Hostile checkpoints: each case builds its own malformed or malicious input and feeds it in.

Every case must end either in a correct result or in one line ``gradfix <command>: error: ...``
(exit status 2) that names the file at fault, with no traceback, no output or temporary folder left
behind, no input file changed and no hang. The cases cover zip records shorter than their storage
(which a memory-mapped load would fill from the neighbouring bytes), broken zip directories,
pickles that would run code, files whose content contradicts their name, every dtype a reader
accepts, hostile shard indexes and symbolic links that leave the model folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import file_hashes, one_error_line, transport_models
from safetensors.torch import save_file

from gradfix.cli.main import main
from gradfix.errors import CheckpointError, GradfixError
from gradfix.io import load_state_dict, open_checkpoint
from gradfix.jobs.output import WholeUpdate, write_model

_SECONDS = 60


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """Fail a case that runs longer than a minute instead of hanging the suite."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(*_: Any) -> None:
        raise TimeoutError(f"an adversarial case ran longer than {_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return transport_models(tmp_path_factory.mktemp("adversarial"))


def _transport(models: dict[str, Path], out: Path, **roles: Path) -> list[str]:
    paths = {**models, **roles}
    return [
        "transport", "--source-base", str(paths["A"]), "--source-finetuned", str(paths["A-ft"]),
        "--target-base", str(paths["B"]), "--method", "naive", "--exclude", "pooler.*",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip


def _hashes(*paths: Path) -> dict[str, str]:
    return file_hashes(*paths)


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(argv, capsys, longest=1500)


def _target_folder(models: dict[str, Path], folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of model B without its weights, and B's state dict to write hostile weights from."""
    shutil.copytree(models["B"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder, load_state_dict(models["B"])


# -- zip records --------------------------------------------------------------------------------
def _patch_record_size(path: Path, suffix: str, size: int) -> None:
    """Rewrite, in place, the sizes (and CRC) a zip declares for the record ending in ``suffix``.

    The record's bytes stay where they are: the archive now says the record is ``size`` bytes long,
    and the bytes after it belong to the next record.
    """
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    local = info.header_offset
    start = (
        local
        + 30
        + struct.unpack_from("<H", raw, local + 26)[0]
        + struct.unpack_from("<H", raw, local + 28)[0]
    )
    crc = zlib.crc32(bytes(raw[start : start + size]))
    struct.pack_into("<III", raw, local + 14, crc, size, size)
    at = raw.find(b"PK\x01\x02")
    while at != -1:
        length = struct.unpack_from("<H", raw, at + 28)[0]
        if bytes(raw[at + 46 : at + 46 + length]).decode().endswith(suffix):
            struct.pack_into("<III", raw, at + 16, crc, size, size)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))


def _rewrite_zip(
    path: Path, change: Callable[[zipfile.ZipInfo, bytes], list[tuple[zipfile.ZipInfo, bytes]]]
) -> None:
    """Rebuild the archive record by record, each replaced by what ``change`` returns for it."""
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicated record name is the point of one case
        for info, data in records:
            for new_info, new_data in change(info, data):
                archive.writestr(new_info, new_data)


def _compressed(info: zipfile.ZipInfo, data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    info.compress_type = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
    return [(info, data)]


def _duplicated(info: zipfile.ZipInfo, data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    return [(info, data), (info, data)] if info.filename.endswith("/data/0") else [(info, data)]


def _dropped(info: zipfile.ZipInfo, data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    return [] if info.filename.endswith("/data/0") else [(info, data)]


def test_a_record_shorter_than_its_storage_is_refused_not_read_from_its_neighbours(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    torch.save({"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}, path)
    _patch_record_size(path, "/data/0", 40)
    before = _hashes(path)
    with pytest.raises(CheckpointError) as caught:
        load_state_dict(path)
    message = str(caught.value)
    assert str(path) in message and "'w'" in message and "data/0" in message and "holds 40" in message
    assert _hashes(path) == before
    view = tmp_path / "view.pt"  # a view reaching the end of a storage, nested under "state_dict"
    torch.save({"state_dict": {"tail": torch.arange(10, dtype=torch.float64)[8:]}}, view)
    _patch_record_size(view, "/data/0", 64)
    with pytest.raises(CheckpointError, match=r"tensor 'tail' needs 80 bytes .* holds 64"):
        load_state_dict(view)


def test_a_record_running_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "past.bin"
    torch.save({"w": torch.ones(64)}, path)
    _patch_record_size(path, "/data/0", 10**6)
    with pytest.raises(CheckpointError, match=r"past.bin: not a valid PyTorch checkpoint"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [(_compressed, "is compressed"), (_duplicated, "appears twice"), (_dropped, "missing storage record")],
)
def test_broken_zip_directories_are_refused(tmp_path: Path, change: Any, expected: str) -> None:
    path = tmp_path / "broken.bin"
    torch.save({"w": torch.ones(64), "b": torch.zeros(2)}, path)
    _rewrite_zip(path, change)
    with pytest.raises(CheckpointError, match=expected) as caught:
        load_state_dict(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_a_cut_zip_archive_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    torch.save({"w": torch.ones(256)}, path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CheckpointError, match=r"cut.bin: not a valid PyTorch checkpoint") as caught:
        load_state_dict(path)
    assert "\n" not in str(caught.value)


# -- pickles and file formats -------------------------------------------------------------------
class _TouchOnLoad:
    """Unpickling an instance of this class creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_needing_full_unpickling_gets_gradfix_own_complete_sentence(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "payload": _TouchOnLoad(marker)}, path)
    with pytest.raises(CheckpointError) as caught:
        load_state_dict(path)
    message = str(caught.value)
    assert not marker.exists()
    assert "weights_only=False" not in message and "Re-running" not in message and "\x1b" not in message
    assert "arbitrary code" in message and "save_file" in message
    assert message.endswith("then pass the .safetensors file") and "\n" not in message


def test_a_safetensors_file_named_bin_is_read_as_safetensors(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 2), "i": torch.arange(4)}
    save_file(state, str(tmp_path / "pytorch_model.bin"))
    loaded = load_state_dict(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_torch_file_named_safetensors_is_called_what_it_is(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(3, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"not a safetensors file but a PyTorch zip checkpoint"):
        load_state_dict(tmp_path)


def test_garbage_named_bin_is_not_called_a_header_length(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x00" * 7 + b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a valid PyTorch checkpoint"):
        load_state_dict(tmp_path)


# -- dtypes -------------------------------------------------------------------------------------
_WRITABLE = [
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int64, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.float16, torch.bfloat16, torch.float64,
]  # fmt: skip


def _sample(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([[0.0, 1.0, 2.0], [4.0, 8.0, 0.5]]).to(dtype)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", _WRITABLE, ids=str)
def test_every_dtype_the_reader_accepts_is_written_back_unchanged(
    tmp_path: Path, dtype: torch.dtype, fmt: str
) -> None:
    state = {"w": torch.randn(2, 3), "extra": _sample(dtype)}
    src = tmp_path / f"model.{fmt}"
    save_file(state, str(src)) if fmt == "safetensors" else torch.save(state, src)
    out = tmp_path / "out"
    out.mkdir()
    with open_checkpoint(src) as reader:
        assert write_model(out, reader, WholeUpdate({}), 1.0, 2**20) == ["model.safetensors"]
    written = load_state_dict(out)
    assert written["extra"].dtype == dtype
    assert torch.equal(written["extra"].view(torch.uint8), state["extra"].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_tensors_are_refused_up_front(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.save({"w": torch.ones(2), "z": torch.ones(2, dtype=dtype)}, tmp_path / "c.bin")
    with pytest.raises(
        CheckpointError, match=rf"c.bin: tensor 'z' has dtype {dtype}, which gradfix cannot write"
    ):
        open_checkpoint(tmp_path / "c.bin").dtypes()
    if dtype == torch.complex64:
        save_file({"z": torch.ones(2, dtype=dtype)}, str(tmp_path / "c.safetensors"))
        with pytest.raises(CheckpointError, match=r"tensor 'z' has dtype C64, which gradfix cannot"):
            open_checkpoint(tmp_path / "c.safetensors").dtypes()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn])
def test_transport_copies_a_target_tensor_of_any_dtype(
    models: dict[str, Path], tmp_path: Path, dtype: torch.dtype
) -> None:
    roles = {}
    for role in ("A", "A-ft", "B"):
        roles[role] = folder = tmp_path / "in" / role
        shutil.copytree(models[role], folder)
        state = {**load_state_dict(folder), "extra.buffer": _sample(dtype)}
        save_file(state, str(folder / "model.safetensors"))
    assert main(_transport(models, tmp_path / "out", **roles)) == 0
    written = load_state_dict(tmp_path / "out")
    assert written["extra.buffer"].dtype == dtype
    assert torch.equal(written["extra.buffer"].view(torch.uint8), _sample(dtype).view(torch.uint8))


# -- shard indexes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shard", "expected"),
    [
        ("x" * 5000 + ".safetensors", "longer than 255 bytes"),
        ("model\x00.safetensors", "control character"),
        ("../outside.safetensors", "outside the index's folder"),
        ("/etc/passwd", "outside the index's folder"),
        ("sub\\..\\..\\x.safetensors", "outside the index's folder"),
        (42, "is not a file name"),
    ],
    ids=["5000-chars", "nul", "dotdot", "absolute", "backslash", "number"],
)
def test_hostile_shard_names_are_one_escaped_line(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], shard: Any, expected: str
) -> None:
    folder, state = _target_folder(models, tmp_path / "in" / "B")
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))
    weight_map = dict.fromkeys(state, "model-00001-of-00001.safetensors")
    weight_map[next(iter(state))] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = _hashes(tmp_path / "in")
    line = _one_error_line(_transport(models, tmp_path / "out", B=folder), capsys)
    assert "model.safetensors.index.json" in line and expected in line
    assert "\x00" not in line and ("\\x00" in line) == ("\x00" in str(shard))
    assert _hashes(tmp_path / "in") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# -- symbolic links -----------------------------------------------------------------------------
def _link(path: Path, target: Path) -> None:
    try:
        path.symlink_to(target)
    except OSError:
        pytest.skip("symbolic links are not available here")


@pytest.mark.parametrize("layout", ["index", "single"])
def test_a_shard_linked_outside_the_folder_is_refused_without_reading_it(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"\xff" * 64)  # would be reported as a huge header length if it were read
    folder, state = _target_folder(models, tmp_path / "in" / "B")
    if layout == "index":
        save_file(state, str(folder / "model-00001-of-00002.safetensors"))
        weight_map = dict.fromkeys(state, "model-00001-of-00002.safetensors")
        weight_map[next(iter(state))] = "model-00002-of-00002.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        _link(folder / "model-00002-of-00002.safetensors", secret)
    else:
        _link(folder / "model.safetensors", secret)
    before = _hashes(tmp_path)
    line = _one_error_line(_transport(models, tmp_path / "out", B=folder), capsys)
    assert "symbolic link that leaves the model folder" in line and os.path.realpath(secret) in line
    assert "header" not in line
    assert _hashes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "secret.safetensors"]


def test_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    _link(folder / "a.safetensors", folder / "b.safetensors")
    _link(folder / "b.safetensors", folder / "a.safetensors")
    with pytest.raises(GradfixError) as caught:
        open_checkpoint(folder)
    assert "a.safetensors" in str(caught.value) and "\n" not in str(caught.value)


def test_hub_snapshot_links_into_the_cache_blobs_are_accepted(tmp_path: Path) -> None:
    entry = tmp_path / "models--org--tiny"
    blobs, snapshot = entry / "blobs", entry / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    state = {"w": torch.randn(2, 2)}
    save_file(state, str(blobs / "0123abcd"))
    _link(snapshot / "model.safetensors", Path("../../blobs/0123abcd"))
    assert torch.equal(load_state_dict(snapshot)["w"], state["w"])
    outside = tmp_path / "elsewhere.safetensors"
    save_file(state, str(outside))
    os.remove(snapshot / "model.safetensors")
    _link(snapshot / "model.safetensors", outside)
    with pytest.raises(CheckpointError, match="leaves the model folder"):
        open_checkpoint(snapshot)


# -- whole runs ---------------------------------------------------------------------------------
def _short_record_bin(folder: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save(state, folder / "pytorch_model.bin")
    _patch_record_size(folder / "pytorch_model.bin", "/data/3", 8)


def _code_running_bin(folder: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({**state, "payload": _TouchOnLoad(folder.parent / "pwned")}, folder / "pytorch_model.bin")


def _complex_bin(folder: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({**state, "z": torch.ones(2, dtype=torch.complex128)}, folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    "build", [_short_record_bin, _code_running_bin, _complex_bin], ids=lambda f: f.__name__[1:]
)
def test_hostile_targets_end_in_one_line_and_leave_everything_as_it_was(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Any
) -> None:
    folder, state = _target_folder(models, tmp_path / "in" / "B")
    build(folder, state)
    before = _hashes(tmp_path / "in", *models.values())
    line = _one_error_line(_transport(models, tmp_path / "out", B=folder), capsys)
    assert "pytorch_model.bin" in line
    assert _hashes(tmp_path / "in", *models.values()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_fifo_in_place_of_a_weight_file_is_refused_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_checkpoint(tmp_path / "model.safetensors")

"""Property-based tests: checkpoint readers and the data parser on random and mutated files.

Whatever the bytes, reading either succeeds or raises the library's own error type
(:class:`CheckpointError` for checkpoints, :class:`DataError` for data) with a one-line message
naming the file; never another exception, and never a huge allocation.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from safetensors.torch import save_file as st_save_file

from gradfix.data import load_examples
from gradfix.errors import CheckpointError, DataError
from gradfix.io import open_checkpoint

# derandomize: the same 100 examples on every run, so that a CI run is reproducible (a failure seen
# once can be replayed); widen the search locally with --hypothesis-seed and derandomize=False
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def _folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _read_everything(path: Path) -> None:
    """Open a checkpoint and read all it claims to hold; only CheckpointError may escape."""
    try:
        with open_checkpoint(path) as reader:
            reader.metadata()
            shapes, dtypes = reader.shapes(), reader.dtypes()
            for name in reader.names():
                tensor = reader.get(name)
                assert tuple(tensor.shape) == shapes[name] and tensor.dtype == dtypes[name]
    except CheckpointError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message


def _valid_safetensors() -> bytes:
    gen = torch.Generator().manual_seed(0)
    return save(
        {
            "w": torch.randn(3, 4, generator=gen),
            "h": torch.randn(5, generator=gen).half(),
            "b": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
            "ids": torch.arange(6, dtype=torch.int64),
            "empty": torch.zeros(0, 3),
        },
        metadata={"format": "pt"},
    )


def _valid_torch_file() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3, 4), "ids": torch.arange(3)}, buffer)
    return buffer.getvalue()


_SAFETENSORS = _valid_safetensors()
_TORCH = _valid_torch_file()

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(0, 2**64 - 1), st.just(0)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = where % (len(out) + 1)
        if kind == "flip" and out:
            out[at % len(out)] ^= value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value])
        elif kind == "header":
            out[:8] = struct.pack("<Q", where)
    return bytes(out)


@FUZZ
@given(
    data=st.binary(max_size=4096),
    name=st.sampled_from(["w.safetensors", "w.bin", "w.pt", "model.safetensors.index.json"]),
)
def test_random_bytes_are_a_checkpoint_error(data: bytes, name: str) -> None:
    with _folder() as root:
        (root / name).write_bytes(data)
        _read_everything(root / name)
        _read_everything(root)


@FUZZ
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_safetensors_read_or_fail_cleanly(mutations: list[tuple[str, int, int]]) -> None:
    with _folder() as root:
        (root / "model.safetensors").write_bytes(_mutate(_SAFETENSORS, mutations))
        _read_everything(root)


@FUZZ
@given(mutations=st.lists(_mutation.filter(lambda m: m[0] != "header"), min_size=1, max_size=3))
def test_mutated_pytorch_files_read_or_fail_cleanly(mutations: list[tuple[str, int, int]]) -> None:
    with _folder() as root:
        (root / "pytorch_model.bin").write_bytes(_mutate(_TORCH, mutations))
        _read_everything(root)


_dtype_codes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "C64", "X9", ""])
_header_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(_dtype_codes, st.integers(), st.none()),
        "shape": st.one_of(st.lists(st.integers(-2, 2**62), max_size=4), st.text(max_size=3)),
        "data_offsets": st.one_of(st.lists(st.integers(-1, 2**40), max_size=3), st.none()),
    }
)


@FUZZ
@given(
    entries=st.dictionaries(st.text(max_size=8), _header_entry, max_size=4),
    payload=st.integers(0, 512),
)
def test_forged_safetensors_headers_fail_cleanly(entries: dict, payload: int) -> None:
    header = json.dumps(entries).encode()
    with _folder() as root:
        file = root / "forged.safetensors"
        file.write_bytes(struct.pack("<Q", len(header)) + header + b"\x01" * payload)
        _read_everything(file)


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    weight_map=st.one_of(
        _json_value,
        st.dictionaries(
            st.text(max_size=6),
            st.sampled_from(["model-1.safetensors", "../x.safetensors", "/etc/passwd", "", ".", "sub/"]),
            max_size=4,
        ),
    ),
    shard=st.booleans(),
)
def test_forged_shard_indexes_fail_cleanly(weight_map: object, shard: bool) -> None:
    with _folder() as root:
        if shard:
            st_save_file({"a": torch.ones(2)}, str(root / "model-1.safetensors"))
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        _read_everything(root)


def _load_data(path: Path) -> None:
    try:
        examples = load_examples(path)
    except DataError as exc:
        assert "\n" not in str(exc) and path.name in str(exc)
        return
    assert examples and all(ex.text.strip() and ex.label for ex in examples)


_VALID_ROWS = [("the team won", "sports"), ('shares, "fell"', "business"), ("new\tchip", "7")]


def _valid_data(suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in _VALID_ROWS)
    sep = "," if suffix == ".csv" else "\t"
    quote = [f'"{v}"' if sep in v or '"' in v else v for row in _VALID_ROWS for v in row]
    return "text" + sep + "label\n" + "".join(f"{quote[i]}{sep}{quote[i + 1]}\n" for i in range(0, 6, 2))


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]))
def test_random_bytes_as_data_are_a_data_error(data: bytes, suffix: str) -> None:
    with _folder() as root:
        (root / f"d{suffix}").write_bytes(data)
        _load_data(root / f"d{suffix}")


@FUZZ
@given(
    suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]),
    edits=st.lists(
        st.tuples(st.integers(0, 400), st.sampled_from([*'{}[]",:\n\r\t\x00\\ab0 ', "\ufeff", "é"])),
        min_size=1,
        max_size=6,
    ),
    cut=st.integers(0, 400),
)
def test_mutated_data_files_load_or_fail_cleanly(suffix: str, edits: list[tuple[int, str]], cut: int) -> None:
    text = _valid_data(suffix)
    for at, char in edits:
        at %= len(text) + 1
        text = text[:at] + char + text[at:]
    text = text[: max(cut, len(text) // 2)]
    with _folder() as root:
        (root / f"d{suffix}").write_text(text, encoding="utf-8")
        _load_data(root / f"d{suffix}")


@pytest.mark.parametrize(
    "line",
    ["[" * 100_000, '{"text": "a", "label": ' + "9" * 5000 + "}", '{"text": "a", "label": 1e999}'],
)
def test_pathological_json_lines_are_data_errors(tmp_path: Path, line: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 1: "):
        load_examples(path)


def test_a_huge_declared_header_is_refused_without_allocating(tmp_path: Path) -> None:
    import tracemalloc

    file = tmp_path / "huge.safetensors"
    file.write_bytes(struct.pack("<Q", 2**62) + b"{}" + b" " * 64)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match=r"huge\.safetensors.*claims 4611686018427387904 bytes"):
        open_checkpoint(file)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20

"""The votes file: round trip, and one-line refusals that name the file (and the tensor)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gradfix.jobs.inputs as inputs
from gradfix.errors import CheckpointError, ConfigError, MismatchError, NonFiniteError
from gradfix.io import CheckpointReader, open_checkpoint
from gradfix.votes import SignVotes
from gradfix.votes import file as vf
from gradfix.votes.file import (
    VotesHeader,
    check_votes_files,
    load_votes,
    read_votes_header,
    validate_votes_files,
)

SHAPES = {"w": (3, 4), "b": (4,)}


def _votes(n: int = 5, estimator: str = "majority") -> SignVotes:
    g = torch.Generator().manual_seed(0)
    grad = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    counts = {k: torch.randint(-n, n + 1, s, generator=g).to(torch.int8) for k, s in SHAPES.items()}
    return SignVotes(counts if estimator == "majority" else {}, grad, n, estimator, {"w": n, "b": 2})


def _raw(path: Path, tensors: dict | None = None, **meta: str) -> Path:
    """A votes file written by hand: the tensors of :func:`_votes` (or ``tensors``) and a header."""
    v = _votes()
    if tensors is None:
        tensors = {f"grad_sum/{k}": t for k, t in v.grad_sum.items()}
        tensors.update({f"counts/{k}": t for k, t in v.counts.items()})
    header = {"gradfix_kind": vf.VOTES_KIND, "num_samples": "5", "estimator": "majority", "hits": "{}"}
    header.update(meta)
    save_file(tensors, str(path), {k: v for k, v in header.items() if v is not None})
    return path


def _refused(path: Path, *expected: str, exc: type[Exception] = CheckpointError) -> str:
    """The message of reading ``path``'s header, which must be one line naming the file."""
    with pytest.raises(exc) as info, open_checkpoint(path) as reader:
        read_votes_header(reader, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for part in expected:
        assert part in message, message
    # load_votes and validate_votes_files refuse it the same way
    for check in (load_votes, validate_votes_files):
        with pytest.raises(exc) as again:
            check([path], {})
        assert str(again.value) == message
    return message


def test_save_and_load_round_trip(tmp_path) -> None:
    for votes in (_votes(), _votes(estimator="mean"), _votes().with_estimator("mean")):
        path = votes.save(tmp_path / f"{votes.estimator}-{bool(votes.counts)}.safetensors")
        loaded = SignVotes.load(path)
        assert (loaded.num_samples, loaded.estimator, loaded.hits) == (5, votes.estimator, votes.hits)
        assert set(loaded.counts) == set(votes.counts) and set(loaded.grad_sum) == set(SHAPES)
        for name in votes.counts:
            assert loaded.counts[name].dtype == torch.int8
            assert torch.equal(loaded.counts[name], votes.counts[name])
        for name in SHAPES:
            assert torch.equal(loaded.grad_sum[name], votes.grad_sum[name])
        with open_checkpoint(path) as reader:
            header = read_votes_header(reader)
        assert header == VotesHeader(path, 5, votes.estimator, votes.hits, bool(votes.counts), SHAPES)
        assert [v.num_samples for v in load_votes([path], SHAPES)] == [5]
        validate_votes_files([path], SHAPES)


def test_the_jobs_names_are_the_votes_file_functions() -> None:
    assert inputs.load_votes is load_votes
    assert inputs.validate_votes_files is validate_votes_files
    assert inputs.check_votes_files is check_votes_files


def test_files_that_are_not_votes_files(tmp_path) -> None:
    _refused(
        _raw(tmp_path / "a.safetensors", gradfix_kind=None), "not a valid gradfix votes file", "gradfix_kind"
    )
    _refused(_raw(tmp_path / "b.safetensors", gradfix_kind="gradfix.task_vector"), "gradfix_kind")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        load_votes([junk], {})


@pytest.mark.parametrize("value", [None, "", "-1", "1.5", "True", "true", " 5", "+5", "5_0", "1e3", "٣"])
def test_num_samples_must_be_a_non_negative_integer(tmp_path, value) -> None:
    expected = "no num_samples" if value is None else "not a non-negative integer"
    _refused(_raw(tmp_path / "v.safetensors", num_samples=value), "num_samples", expected)


@pytest.mark.parametrize("value", [str(2**62 + 1), "9" * 5000])
def test_absurd_num_samples_are_refused(tmp_path, value) -> None:
    message = _refused(_raw(tmp_path / "v.safetensors", num_samples=value), "larger than 2**62")
    assert len(message) < 300


def test_the_estimator_must_be_known(tmp_path) -> None:
    _refused(_raw(tmp_path / "a.safetensors", estimator=None), "no estimator")
    _refused(_raw(tmp_path / "b.safetensors", estimator="median"), "'median' is not one of majority, mean")


@pytest.mark.parametrize(
    ("hits", "expected"),
    [
        ("{", "hits is not JSON"),
        ("[1, 2]", "hits is a list, not a mapping"),
        ('{"w": true}', "hits of 'w' is True"),
        ('{"w": 2.0}', "hits of 'w' is 2.0"),
        ('{"w": -1}', "hits of 'w' is -1"),
        ('{"w": 6}', "hits of 'w' is 6, not an integer from 0 to num_samples (5)"),
        ('{"w": "3"}', "hits of 'w' is '3'"),
        ('{"other": 1}', "hits names 'other', which is not a voted tensor (no 'grad_sum/other')"),
    ],
)
def test_hits_must_map_voted_tensors_to_sample_counts(tmp_path, hits, expected) -> None:
    _refused(_raw(tmp_path / "v.safetensors", hits=hits), expected)


def test_counts_must_match_the_gradient_sums(tmp_path) -> None:
    grad = {"grad_sum/w": torch.zeros(3, 4), "grad_sum/b": torch.zeros(4)}
    missing = _raw(
        tmp_path / "missing.safetensors", {**grad, "counts/w": torch.zeros(3, 4, dtype=torch.int8)}
    )
    _refused(missing, "tensor 'b' has no vote counts ('counts/b' is missing)")
    no_counts = _raw(tmp_path / "none.safetensors", grad)  # a majority file needs them
    _refused(no_counts, "has no vote counts")
    counts = {"counts/w": torch.zeros(3, 4, dtype=torch.int8), "counts/b": torch.zeros(4, dtype=torch.int8)}
    orphan = _raw(
        tmp_path / "orphan.safetensors", {**grad, **counts, "counts/x": torch.zeros(1, dtype=torch.int8)}
    )
    _refused(orphan, "tensor 'counts/x' has no 'grad_sum/x'")
    shaped = _raw(
        tmp_path / "shape.safetensors", {**grad, **counts, "counts/b": torch.zeros(5, dtype=torch.int8)}
    )
    _refused(shaped, "the counts of tensor 'b' have shape [5], its gradient sum [4]")
    floats = _raw(tmp_path / "float.safetensors", {**grad, **counts, "counts/w": torch.zeros(3, 4)})
    _refused(floats, "the counts of tensor 'w' are torch.float32, not an integer dtype")
    ints = _raw(tmp_path / "int.safetensors", {**counts, "grad_sum/w": torch.zeros(3, 4, dtype=torch.int32)})
    _refused(ints, "tensor 'grad_sum/w' is torch.int32, not floating point")
    mean = _raw(tmp_path / "mean.safetensors", grad, estimator="mean")  # the mean estimator needs none
    with open_checkpoint(mean) as reader:
        assert not read_votes_header(reader).has_counts


def test_counts_larger_than_the_samples_are_refused_slice_by_slice(tmp_path, monkeypatch) -> None:
    rows = 4 * 2**20 // (2 * 64) + 1  # int16 counts: two slices of up to 4 MiB
    counts = torch.zeros(rows, 64, dtype=torch.int16)
    counts[-1, -1] = -6  # in the last slice only
    tensors = {"grad_sum/big": torch.zeros(rows, 64), "counts/big": counts}
    path = _raw(tmp_path / "big.safetensors", tensors)
    read: list[tuple[str, int, int]] = []
    rows_of = CheckpointReader.rows

    def spy(self, name, start, stop):
        read.append((name, start, stop))
        return rows_of(self, name, start, stop)

    monkeypatch.setattr(CheckpointReader, "rows", spy)
    _refused(path, "the counts of tensor 'big' reach 6, more than num_samples (5)")
    assert read[:2] == [("counts/big", 0, rows - 1), ("counts/big", rows - 1, rows)]
    with open_checkpoint(path) as reader:  # the header alone does not read the counts
        read.clear()
        assert read_votes_header(reader, check_counts=False).num_samples == 5
        assert read == []
    with pytest.raises(CheckpointError, match="reach 6"):
        SignVotes.load(path)
    lowest = {"grad_sum/s": torch.zeros(2), "counts/s": torch.tensor([0, -(2**63)])}
    _refused(_raw(tmp_path / "lowest.safetensors", lowest), f"reach {2**63}")
    scalar = {"grad_sum/s": torch.zeros(()), "counts/s": torch.tensor(-9, dtype=torch.int8)}
    _refused(_raw(tmp_path / "scalar.safetensors", scalar), "'s' reach 9")
    fits = {"grad_sum/s": torch.zeros(3), "counts/s": torch.tensor([-128, 0, 127], dtype=torch.int8)}
    with open_checkpoint(_raw(tmp_path / "fits.safetensors", fits, num_samples="128")) as reader:
        assert read_votes_header(reader).shapes == {"s": (3,)}


def test_missing_and_repeated_files(tmp_path) -> None:
    path = _votes().save(tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: votes file not found"):
        check_votes_files([tmp_path / "nope.safetensors"])
    with pytest.raises(CheckpointError, match="votes file not found"):
        check_votes_files([tmp_path])
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    hard = tmp_path / "hard.safetensors"
    os.link(path, hard)
    for other in (path, tmp_path / "sub" / ".." / "v.safetensors", link, hard):
        with pytest.raises(ConfigError) as info:
            check_votes_files([path, other])
        message = str(info.value)
        assert message.startswith(f"{other}: votes file given twice") and "\n" not in message
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    check_votes_files([path, copy])  # a copy is another file: its votes are other votes


def test_non_finite_sums_and_other_architectures(tmp_path) -> None:
    good = _votes().save(tmp_path / "good.safetensors")
    bad = _votes()
    bad.grad_sum["w"][1, 2] = float("inf")
    nan = bad.save(tmp_path / "nan.safetensors")
    for check in (load_votes, validate_votes_files):
        with pytest.raises(NonFiniteError) as info:
            check([good, nan], SHAPES)
        assert "nan.safetensors: NaN or Inf in tensor(s) 'w' (1 of 12 values)" in str(info.value)
    small = SignVotes({}, {"w": torch.zeros(3, 4)}, 1, "mean", {"w": 1}).save(tmp_path / "small.safetensors")
    for check in (load_votes, validate_votes_files):
        with pytest.raises(MismatchError, match=r"b: missing in .*small\.safetensors"):
            check([good, small], SHAPES)
        with pytest.raises(
            MismatchError, match=r"w: shapes differ \(votes files \[3, 4\], task vector \[4, 3\]\)"
        ):
            check([good], {"w": (4, 3), "b": (4,)})
    assert len(load_votes([good], {"w": (3, 4)})) == 1  # τ may select fewer tensors
    assert load_votes([], SHAPES) == []


def test_hits_round_trip_as_plain_integers(tmp_path) -> None:
    path = _votes().save(tmp_path / "v.safetensors")
    with open_checkpoint(path) as reader:
        assert json.loads(reader.metadata()["hits"]) == {"w": 5, "b": 2}
        assert read_votes_header(reader).hits == {"w": 5, "b": 2}

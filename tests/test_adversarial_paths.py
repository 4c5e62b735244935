"""Hostile paths through the real command line: links, special files, long names, signals.

Each case builds its own hostile input in ``tmp_path`` and must end in one error line (status 2)
or a correct result, with no traceback, no temporary folder left behind, no input changed and no
hang (every test runs under a timeout).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cli_checks import one_error_line, transport_args, transport_models
from tiny_models import topic_examples, write_jsonl

import gradfix.io.outputs as outputs_module
import gradfix.io.streaming as streaming_module
from gradfix.cli.main import main
from gradfix.errors import CheckpointError, ConfigError, OutputError
from gradfix.io import atomic_output_dir, copy_model_files, sha256_file
from gradfix.jobs import input_record
from gradfix.recipes.text_zero_shot import TextZeroShotRecipe

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

LONG = "x" * 300  # one path component over the 255-byte limit of common file systems
VOTE = ("--mask", "agreement", "--shots", "2")  # a mask that reads --data (the default, none, does not)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return transport_models(tmp_path_factory.mktemp("adversarial"))


def _args(m: dict[str, Any], out: Path, *extra: str, **roles: Any) -> list[str]:
    return transport_args(m, out, *extra, options=("--mask", "none"), **roles)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str], *named: Path | str) -> str:
    """One error line (see :func:`one_error_line`) naming every path of ``named``."""
    line = one_error_line(argv, capsys)
    for path in named:
        assert str(path) in line, line
    return line


def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (links not followed): its kind and, for a file, its sha256."""
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = stat.S_IFMT(path.lstat().st_mode)
    return found


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def _hub_cache(model: Path, root: Path, blobs_at: Path | None = None) -> tuple[Path, Path]:
    """``model`` laid out as the Hub cache does: ``snapshots/main/<file> -> ../../blobs/<sha256>``.

    With ``blobs_at`` the cache's ``blobs`` is itself a link to that folder. Returns the
    snapshot folder and the real blobs folder.
    """
    repo = root / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    blobs = blobs_at if blobs_at is not None else repo / "blobs"
    blobs.mkdir(parents=True)
    if blobs_at is not None:
        (repo / "blobs").symlink_to(blobs_at)
    for file in sorted(p for p in model.iterdir() if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot, blobs


# -- the Hugging Face cache layout -----------------------------------------------------------------
def test_a_hub_snapshot_transports_and_records_its_blobs(models, tmp_path) -> None:
    snapshot, _ = _hub_cache(models["B"], tmp_path)
    before = _snapshot(tmp_path / "hub")
    out = tmp_path / "out"
    assert main(_args(models, out, B=snapshot)) == 0
    record = json.loads((out / "gradfix.json").read_text())
    hashed = record["inputs"]["target_base"]["sha256"]
    assert hashed["config.json"] == hashlib.sha256((models["B"] / "config.json").read_bytes()).hexdigest()
    assert not (out / "config.json").is_symlink()
    assert _snapshot(tmp_path / "hub") == before
    assert _leftovers(tmp_path) == []


def test_out_over_the_hub_blobs_is_refused_and_the_blobs_kept(models, tmp_path, capsys) -> None:
    snapshot, blobs = _hub_cache(models["B"], tmp_path)
    before = _snapshot(tmp_path / "hub")
    weights = Path(os.path.realpath(snapshot / "model.safetensors"))
    line = _error(_args(models, blobs, "--overwrite", B=snapshot), capsys, blobs)
    assert "contains the file" in line and str(weights.parent) in line
    line = _error(_args(models, weights, "--overwrite", B=snapshot), capsys, weights)
    assert f"output {weights} is the file" in line
    assert _snapshot(tmp_path / "hub") == before
    assert _leftovers(tmp_path) == []


def test_out_over_a_folder_holding_a_blob_elsewhere_is_refused(models, tmp_path, capsys) -> None:
    store = tmp_path / "store"  # the cache's blobs/ is a link to store/blobs
    snapshot, _ = _hub_cache(models["B"], tmp_path, blobs_at=store / "blobs")
    before = {**_snapshot(tmp_path / "hub"), **_snapshot(store)}
    line = _error(_args(models, store, "--overwrite", B=snapshot), capsys, store)
    assert "contains the file" in line
    assert {**_snapshot(tmp_path / "hub"), **_snapshot(store)} == before
    assert _leftovers(tmp_path) == []


# -- links out of a model folder and special files ------------------------------------------------
def _target_copy(models: dict[str, Path], tmp_path: Path) -> Path:
    target = tmp_path / "B"
    shutil.copytree(models["B"], target)
    return target


def test_a_tokenizer_file_linked_outside_the_folder_is_neither_copied_nor_hashed(
    models, tmp_path, capsys
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:do not leak\n")
    target = _target_copy(models, tmp_path)
    link = target / "special_tokens_map.json"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    out = tmp_path / "out"
    line = _error(_args(models, out, B=target), capsys, link)
    assert "leaves the model folder" in line
    assert not out.exists() and _leftovers(tmp_path) == []
    dst = tmp_path / "copied"
    with pytest.raises(CheckpointError, match="leaves the model folder"):
        copy_model_files(target, dst)
    with pytest.raises(CheckpointError, match="leaves the model folder"):
        input_record(target, model_files=True)
    assert not dst.exists()
    assert secret.read_text() == "root:x:0:0:do not leak\n"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_files_among_the_model_files_are_refused_without_hanging(
    models, tmp_path, capsys, kind
) -> None:
    target = _target_copy(models, tmp_path)
    special = target / "added_tokens.json"
    if kind == "fifo":
        os.mkfifo(special)
        expected = "a FIFO, not a regular file"
    else:
        special.symlink_to("/dev/zero")
        expected = "leaves the model folder"
    out = tmp_path / "out"
    line = _error(_args(models, out, B=target), capsys, special)
    assert expected in line
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"not a regular file|leaves the model folder"):
        copy_model_files(target, tmp_path / "copied")
    with pytest.raises(CheckpointError, match="not a regular file"):
        sha256_file(special)


def test_a_fifo_inside_the_hub_blobs_is_refused(models, tmp_path, capsys) -> None:
    snapshot, blobs = _hub_cache(models["B"], tmp_path)
    os.mkfifo(blobs / "fifo")
    (snapshot / "added_tokens.json").symlink_to(Path("..", "..", "blobs", "fifo"))
    line = _error(_args(models, tmp_path / "out", B=snapshot), capsys, snapshot / "added_tokens.json")
    assert "a FIFO, not a regular file" in line
    assert _leftovers(tmp_path) == []


def test_a_fifo_given_as_the_data_file_is_refused(models, tmp_path, capsys) -> None:
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    line = _error(_args(models, tmp_path / "out", *VOTE, few=fifo), capsys, fifo)
    assert "not a file" in line or "not a regular file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


# -- paths the system will not take ---------------------------------------------------------------
@pytest.mark.parametrize("option", ["--data", "--target-base", "--out", "--config", "--votes-in"])
def test_a_path_component_over_255_bytes_is_one_line(models, tmp_path, capsys, option) -> None:
    long = tmp_path / LONG / "file"
    out = tmp_path / "out"
    roles = {"few": long} if option == "--data" else {"B": long} if option == "--target-base" else {}
    argv = _args(models, long if option == "--out" else out, **roles)
    if option in ("--config", "--votes-in"):
        argv += [option, str(long)]
    line = _error(argv, capsys, long)
    assert "File name too long" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_where_a_file_is_expected_is_one_line(models, tmp_path, capsys) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    out = tmp_path / "out"
    _error([*_args(models, out), "--config", str(folder)], capsys, folder)
    _error(_args(models, out, *VOTE, few=folder), capsys, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder"]


def test_an_unreadable_input_is_one_line(models, tmp_path, capsys, monkeypatch) -> None:
    """A data file the process may not read. As root, permissions do not stop reads, so ``stat``
    of that one path is made to fail with EACCES (what a non-root user gets); otherwise the file
    really is made unreadable."""
    data = write_jsonl(tmp_path / "private.jsonl", topic_examples(2, seed=0))
    if os.geteuid() == 0:
        real_stat = os.stat

        def denied(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if os.fspath(path) == str(data):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", denied)
    else:
        data.chmod(0)
    line = _error(_args(models, tmp_path / "out", *VOTE, few=data), capsys, data)
    assert "Permission denied" in line
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.jsonl"]


# -- signals and leftovers ------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_mid_write_cleans_up_like_ctrl_c(models, tmp_path, capsys, monkeypatch, signum) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("an earlier result")
    write = streaming_module.StreamingSafetensorsFile.write
    sent: list[int] = []

    def signalled(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(streaming_module.StreamingSafetensorsFile, "write", signalled)
    before = signal.getsignal(signum)
    assert main(_args(models, out, "--overwrite")) == 128 + signum
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"stopped by {signal.Signals(signum).name}" in err
    assert sent == [signum]
    assert signal.getsignal(signum) == before
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_dot_with_overwrite_is_refused_without_leftovers(models, tmp_path, capsys, monkeypatch) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    line = _error(_args(models, Path("."), "--overwrite"), capsys)
    assert "current folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert list(here.iterdir()) == []


def test_a_failed_swap_of_an_existing_output_leaves_no_old_folder(tmp_path, monkeypatch) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "kept.txt").write_text("kept")
    real_replace = os.replace

    def refuse_moving_dest(src: Any, dst: Any) -> None:
        if Path(src) == dest:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(outputs_module.os, "replace", refuse_moving_dest)
    with (
        pytest.raises(OutputError, match="nothing was written"),
        atomic_output_dir(dest, overwrite=True) as tmp,
    ):
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]


def test_the_zero_shot_head_is_written_world_readable(tmp_path) -> None:
    head = SimpleNamespace(head=torch.zeros(2, 4), labels=["a", "b"], template="{}", logit_scale=1.0)
    path = TextZeroShotRecipe.save_head(head, tmp_path / "zero_shot_head.safetensors")  # type: ignore[arg-type]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_missing_input_still_reads_as_missing(models, tmp_path) -> None:
    """The path checks leave "does not exist" to the readers, which name it their own way."""
    with pytest.raises(ConfigError):
        outputs_module.check_output_free(tmp_path / LONG)
    outputs_module.check_output_not_input(tmp_path / "out", [tmp_path / "absent", models["B"]])

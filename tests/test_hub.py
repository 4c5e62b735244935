"""Models given as Hugging Face Hub ids, resolved from a local cache built in each test.

The cache is laid out as huggingface_hub lays it out (``models--org--name/refs/<ref>`` holding a
commit hash, ``snapshots/<commit>/<file>`` linked into ``blobs/<sha256>``), under ``tmp_path``,
with downloads off (``HF_HUB_OFFLINE=1``): no test reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_checks import one_error_line, transport_args, transport_models
from huggingface_hub import constants
from tiny_models import perturbed_copy

import gradfix.io.hub as hub_module
from gradfix.cli.config import validated_options
from gradfix.cli.main import main
from gradfix.io.hub import MODEL_FILES, TORCH_WEIGHTS, parse_hub_id, resolve_model
from gradfix.jobs import input_record, transport_checkpoints
from gradfix.settings import MaskSettings

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

FAST = ("--method", "gradfix", "--alpha", "1")  # the published mask at a fixed α: no choice to make
IDS = {"A": "org/tiny-a", "A-ft": "org/tiny-a-ft", "B": "org/tiny-b"}


def commit_of(name: str) -> str:
    """A 40-hex commit hash made from ``name``."""
    return hashlib.sha1(name.encode()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_snapshot(
    cache: Path, repo_id: str, model: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """``model``'s files as the snapshot ``commit`` of ``repo_id`` in ``cache``; ``refs`` point at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in model.rglob("*") if p.is_file()):
        blob = repo / "blobs" / sha256(file)
        if not blob.exists():
            blob.write_bytes(file.read_bytes())
        link = snapshot / file.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # as huggingface_hub writes it: no newline
    return snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-models")
    found = transport_models(root)
    found["B2"] = perturbed_copy(found["B"], root / "B2", 0.05, seed=7)  # a later revision of B
    return found


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache under ``tmp_path``, downloads off (the environment and huggingface_hub's
    constants, which it reads once when imported)."""
    root = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (root / "hub").mkdir(parents=True)
    return root / "hub"


@pytest.fixture
def cached(cache: Path, models: dict[str, Path]) -> dict[str, Path]:
    """A, A-ft and B in the cache at ``main``; B2 as B's revision ``v2``. Returns the snapshots."""
    snapshots = {role: add_snapshot(cache, IDS[role], models[role], commit_of(role)) for role in IDS}
    snapshots["B2"] = add_snapshot(cache, IDS["B"], models["B2"], commit_of("B2"), refs=("v2",))
    return snapshots


def _record(out: Path) -> dict[str, Any]:
    return json.loads((out / "gradfix.json").read_text())


def _ids(**roles: str) -> dict[str, str]:
    return {**IDS, **roles}


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): a link's target or a file's sha256."""
    return {
        str(p): os.readlink(p) if p.is_symlink() else sha256(p) if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# -- what is a Hub id ------------------------------------------------------------------------------
def test_what_reads_as_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v2") == ("org/name", "v2")
    assert parse_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    for path in ("./missing_dir", "/abs/missing", "a/b/c", "~/x", "name", "org/name@", "org/a@b@c",
                 "org/model.safetensors", "data/few.jsonl", "org/na--me", "org/bad name", ""):  # fmt: skip
        assert parse_hub_id(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_id("org/name") is None  # an existing folder is a path
    assert resolve_model("org/name") == "org/name"


# -- transport from the cache ----------------------------------------------------------------------
def test_transport_from_hub_ids_offline_equals_the_local_run_and_records_the_commits(
    models, cached, tmp_path
) -> None:
    local, from_hub = tmp_path / "local", tmp_path / "hub-out"
    before = _tree(tmp_path / "hf")
    assert main(transport_args(models, local, options=FAST)) == 0
    assert main(transport_args(models, from_hub, options=FAST, **_ids())) == 0
    assert sha256(from_hub / "model.safetensors") == sha256(local / "model.safetensors")
    assert not (from_hub / "config.json").is_symlink()  # copied out of the snapshot, not linked
    assert (from_hub / "config.json").read_bytes() == (models["B"] / "config.json").read_bytes()
    inputs = _record(from_hub)["inputs"]
    for key, role in (("source_base", "A"), ("source_finetuned", "A-ft"), ("target_base", "B")):
        assert inputs[key]["hub"] == {
            "repo_id": IDS[role],
            "revision_requested": None,
            "commit": commit_of(role),
        }
        assert os.path.realpath(inputs[key]["path"]) == os.path.realpath(cached[role])
        assert inputs[key]["sha256"]["model.safetensors"] == sha256(models[role] / "model.safetensors")
        blob = Path(os.path.realpath(cached[role] / "model.safetensors"))
        assert blob.name == inputs[key]["sha256"]["model.safetensors"]  # the cache names blobs by hash
    assert inputs["target_base"]["sha256"]["config.json"] == sha256(models["B"] / "config.json")
    assert "hub" not in _record(local)["inputs"]["target_base"]
    assert _tree(tmp_path / "hf") == before  # the cache is only read


@pytest.mark.parametrize("how", ["ref", "commit", "per-input"])
def test_a_revision_selects_another_snapshot(models, cached, tmp_path, how) -> None:
    out = tmp_path / "out"
    if how == "per-input":
        argv = transport_args(models, out, options=FAST, B=f"{IDS['B']}@v2")
        requested = "v2"
    else:
        requested = "v2" if how == "ref" else commit_of("B2")
        argv = transport_args(models, out, "--revision", requested, options=FAST, B=IDS["B"])
    assert main(argv) == 0
    target = _record(out)["inputs"]["target_base"]
    assert target["hub"] == {"repo_id": IDS["B"], "revision_requested": requested, "commit": commit_of("B2")}
    assert target["sha256"]["model.safetensors"] == sha256(models["B2"] / "model.safetensors")
    replay = yaml.safe_load((out / "gradfix.yaml").read_text())
    assert replay["target_base"] == f"{IDS['B']}@{commit_of('B2')}"  # pinned: a moved ref replays the same
    again = tmp_path / "again"
    assert main(["transport", "--config", str(out / "gradfix.yaml"), "--out", str(again)]) == 0
    assert sha256(again / "model.safetensors") == sha256(out / "model.safetensors")
    main_out = tmp_path / "main"
    assert main(transport_args(models, main_out, options=FAST, B=IDS["B"])) == 0
    assert _record(main_out)["inputs"]["target_base"]["hub"]["commit"] == commit_of("B")
    assert sha256(out / "model.safetensors") != sha256(main_out / "model.safetensors")


def test_the_api_takes_hub_ids_and_a_revision(models, cached, tmp_path) -> None:
    record = transport_checkpoints(
        f"{IDS['A']}@main",
        f"{IDS['A-ft']}@main",
        IDS["B"],  # takes the revision: it names none of its own
        tmp_path / "out",
        masking=MaskSettings(alpha=1.0, exclude=["pooler.*"]),
        method="naive",
        revision="v2",
    )
    assert record["inputs"]["source_base"]["hub"]["revision_requested"] == "main"
    assert record["inputs"]["target_base"]["hub"]["commit"] == commit_of("B2")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # a snapshot folder given as a path is recorded with its repository and commit too
    direct = input_record(cached["B"])["hub"]
    assert direct == {"repo_id": IDS["B"], "revision_requested": None, "commit": commit_of("B")}


# -- errors ----------------------------------------------------------------------------------------
def test_not_cached_and_offline_is_one_line_with_the_download_command(
    models, cached, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    line = one_error_line(transport_args(models, out, options=FAST, B="org/not-cached"), capsys)
    assert "org/not-cached" in line and "HF_HUB_OFFLINE=1" in line
    assert "`hf download org/not-cached`" in line
    line = one_error_line(transport_args(models, out, "--revision", "v9", options=FAST, B=IDS["B"]), capsys)
    assert "at revision v9" in line and f"`hf download {IDS['B']} --revision v9`" in line
    line = one_error_line(transport_args(models, out, options=FAST, B=f"{IDS['B']}@v9"), capsys)
    assert f"`hf download {IDS['B']} --revision v9`" in line
    assert not out.exists()


@pytest.mark.parametrize("missing", ["./missing_dir", "/abs/missing", "a/b/c"])
def test_a_missing_path_keeps_the_no_such_file_error(models, cache, tmp_path, capsys, missing) -> None:
    line = one_error_line(transport_args(models, tmp_path / "out", options=FAST, B=missing), capsys)
    assert f"{Path(missing)}: no such file or folder" in line and "hf download" not in line


def test_a_snapshot_without_weights_offline_says_so(models, cache, tmp_path, capsys) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((models["B"] / "config.json").read_bytes())
    add_snapshot(cache, "org/config-only", config_only, commit_of("config-only"))
    line = one_error_line(transport_args(models, tmp_path / "out", options=FAST, B="org/config-only"), capsys)
    assert "holds no weights" in line and "`hf download org/config-only`" in line


def test_out_inside_a_resolved_snapshot_is_refused(models, cached, tmp_path, capsys) -> None:
    before = _tree(tmp_path / "hf")
    inside = cached["B"] / "out"
    line = one_error_line(transport_args(models, inside, options=FAST, **_ids()), capsys)
    assert "lies inside input" in line
    blobs = cached["B"].parent.parent / "blobs"
    line = one_error_line(transport_args(models, blobs, "--overwrite", options=FAST, **_ids()), capsys)
    assert "contains the file" in line
    assert _tree(tmp_path / "hf") == before


def test_a_revision_without_any_hub_id_is_refused(models, cache, tmp_path, capsys) -> None:
    line = one_error_line(transport_args(models, tmp_path / "out", "--revision", "v2", options=FAST), capsys)
    assert "--revision v2" in line and "Hub id" in line


# -- the other commands ----------------------------------------------------------------------------
def test_merge_eval_and_inspect_take_hub_ids(models, cached, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    argv = ["merge", "--source-base", IDS["A"], "--source-finetuned", IDS["A-ft"],
            "--target-base", IDS["B"], "--revision", "main", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    record = _record(out)
    assert record["inputs"]["target_base"]["hub"]["commit"] == commit_of("B")
    assert record["tasks"][0]["source_finetuned"]["hub"]["repo_id"] == IDS["A-ft"]
    capsys.readouterr()
    argv = ["eval", "--model", f"{IDS['B']}@v2", "--data", str(models["few"]), "--json"]
    assert main(argv) == 0
    assert os.path.realpath(json.loads(capsys.readouterr().out)["model"]) == os.path.realpath(cached["B2"])
    assert main(["inspect", "--base", IDS["A"], "--finetuned", IDS["A-ft"], "--json"]) == 0
    tensors = json.loads(capsys.readouterr().out)["tensors"]
    assert tensors and any(row["norm"] > 0 for row in tensors)
    assert main(["inspect", IDS["B"], "--revision", commit_of("B2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"]


def test_config_yaml_accepts_revision() -> None:
    options = validated_options("transport", [], {"revision": "v2"})
    assert options["revision"] == "v2"
    assert validated_options("merge", ["--revision", "abc"])["revision"] == "abc"
    assert validated_options("eval", [])["revision"] is None


def test_the_environment_switches_downloads_off_in_a_fresh_process(models, cached, tmp_path) -> None:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    cached_one = ["inspect", f"{IDS['B']}@v2", "--top", "1"]
    code = (
        "import sys; from gradfix.cli.main import main; "
        f"sys.exit(10 * main({cached_one!r}) + main(['inspect', 'org/not-cached']))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr  # the cached one printed, the other one is an error
    assert "tensors" in done.stdout and "Traceback" not in done.stderr
    assert done.stderr.count("error") == 1
    assert "HF_HUB_OFFLINE=1" in done.stderr and "`hf download org/not-cached`" in done.stderr


# -- downloads (huggingface_hub's download replaced: nothing leaves the machine) --------------------
def _fake_hub(cache: Path, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Downloads on (for gradfix), served from ``files`` by a stand-in for ``snapshot_download``
    that writes only the files its ``allow_patterns`` match; returns the calls it gets."""
    from fnmatch import fnmatch

    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: list[dict[str, Any]] = []

    def fake_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        snapshot = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit_of(repo_id)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if any(fnmatch(name, pattern) for pattern in kwargs["allow_patterns"]):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_bytes(data)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(hub_module, "hub_offline", lambda: False)
    return calls


def test_a_download_fetches_only_what_gradfix_reads(models, cache, monkeypatch) -> None:
    repo = {p.name: p.read_bytes() for p in models["B"].iterdir() if p.is_file()}
    repo.update({"pytorch_model.bin": b"old", "onnx/model.onnx": b"onnx", "tf_model.h5": b"tf"})
    repo["1_Pooling/config.json"] = b"{}"
    calls = _fake_hub(cache, repo, monkeypatch)
    folder = Path(resolve_model("org/fetched@v1"))
    assert folder.name == commit_of("org/fetched")
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    assert all(c["revision"] == "v1" and c["allow_patterns"] == list(MODEL_FILES) for c in calls)
    fetched = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert "model.safetensors" in fetched and "config.json" in fetched and "1_Pooling/config.json" in fetched
    assert not {"pytorch_model.bin", "onnx/model.onnx", "tf_model.h5"} & set(fetched)


def test_pytorch_weights_are_fetched_only_without_safetensors(models, cache, monkeypatch) -> None:
    repo = {"config.json": (models["B"] / "config.json").read_bytes(), "pytorch_model.bin": b"weights"}
    calls = _fake_hub(cache, repo, monkeypatch)
    folder = Path(resolve_model("org/old-style"))
    assert [c["allow_patterns"] for c in calls[1:]] == [list(MODEL_FILES), list(TORCH_WEIGHTS)]
    assert (folder / "pytorch_model.bin").read_bytes() == b"weights"

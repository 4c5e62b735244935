"""``--device`` and ``--dtype``: where and in which dtype B is loaded for its votes.

- bfloat16 votes through the command line agree with float32's on most coordinates (measured on
  the tiny BERT: 96.7 %; float16 99.5 %), the record and the model card state where they were
  computed, and the written weights keep B's own dtype;
- ``auto`` is float32 on the CPU, also for a checkpoint published in bfloat16, and the
  checkpoint's own dtype on a GPU (config ``dtype``/``torch_dtype``, else the weights' headers);
- a device or dtype this machine cannot run, or an unknown name, is one line and status 2,
  before anything is written (transport, check, ``--config``);
- the GPU benchmark says when there is no GPU; with a GPU, a tiny transport runs on it in bfloat16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import one_error_line, transport_args, transport_models
from safetensors import safe_open
from tiny_models import make_tiny_bert

from gradfix.cli.main import main
from gradfix.errors import ConfigError
from gradfix.ops.signs import majority_sign
from gradfix.recipes import placement
from gradfix.recipes.placement import checkpoint_dtype, resolve_device, resolve_dtype, resolve_placement
from gradfix.votes import SignVotes

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AGREEMENT_FLOOR = 0.9
"""bfloat16 against float32 majority signs on the tiny BERT, 12 shots: 96.7 % measured; 90 % asserted."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return transport_models(tmp_path_factory.mktemp("placement"))


def _transport(m: dict[str, Path], out: Path, *options: str, **roles: Path) -> dict[str, Any]:
    given = ["--method", "gradfix", "--shots", "4", *options]
    assert main(transport_args(m, out, "--json", options=given, **roles)) == 0
    return json.loads((out / "gradfix.json").read_text())


def _dtypes(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118


def test_bfloat16_votes_agree_with_float32_and_the_record_says_so(models, tmp_path) -> None:
    full = _transport(models, tmp_path / "f32", "--votes-out", str(tmp_path / "f32.safetensors"))
    half = _transport(
        models, tmp_path / "bf16", "--dtype", "bfloat16", "--votes-out", str(tmp_path / "bf16.safetensors")
    )
    assert (full["data"]["device"], full["data"]["dtype"]) == ("cpu", "float32")
    assert (half["data"]["device"], half["data"]["dtype"]) == ("cpu", "bfloat16")
    assert (half["options"]["device"], half["options"]["dtype"]) == ("cpu", "bfloat16")  # replayed as asked
    assert (full["options"]["device"], full["options"]["dtype"]) == ("cpu", "auto")
    card = (tmp_path / "bf16" / "README.md").read_text()
    assert "on `cpu` in bfloat16" in card
    a, b = SignVotes.load(tmp_path / "f32.safetensors"), SignVotes.load(tmp_path / "bf16.safetensors")
    assert set(a.counts) == set(b.counts) and a.num_samples == b.num_samples == 12
    same = sum(int(majority_sign(a.counts[n]).eq(majority_sign(b.counts[n])).sum()) for n in a.counts)
    total = sum(c.numel() for c in a.counts.values())
    assert same / total >= AGREEMENT_FLOOR
    # the written weights are B's plus the masked update, in B's own dtype, whatever B voted in
    assert _dtypes(tmp_path / "bf16") == _dtypes(models["B"])
    assert half["descent"]["total_inner"] <= 0  # the first-order report from the bf16 model


def test_auto_votes_in_float32_on_the_cpu_for_a_bfloat16_checkpoint(models, tmp_path) -> None:
    b16 = make_tiny_bert(tmp_path / "B16", seed=3)
    from transformers import BertModel

    BertModel.from_pretrained(b16, dtype=torch.bfloat16).save_pretrained(b16)
    assert checkpoint_dtype(b16) == torch.bfloat16
    record = _transport(models, tmp_path / "out", B=b16)
    assert (record["data"]["device"], record["data"]["dtype"]) == ("cpu", "float32")
    assert set(_dtypes(tmp_path / "out").values()) == {"BF16"}  # written in the checkpoint's dtype


def test_the_checkpoint_dtype_comes_from_the_config_then_the_headers(models, tmp_path) -> None:
    folder = tmp_path / "B"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((models["B"] / "model.safetensors").read_bytes())
    assert checkpoint_dtype(folder) == torch.float32  # no config: the headers
    for key, value, expected in [
        ("torch_dtype", "float16", torch.float16),
        ("dtype", "bfloat16", torch.bfloat16),
        ("dtype", "float64", torch.float32),  # not a voting dtype: the headers decide
    ]:
        (folder / "config.json").write_text(json.dumps({key: value}))
        assert checkpoint_dtype(folder) == expected
    gpu = torch.device("cuda", 0)
    (folder / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert resolve_dtype("auto", gpu, folder) == torch.float16  # the checkpoint's own on a GPU
    assert resolve_dtype("auto", torch.device("cpu"), folder) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu"), folder) == torch.bfloat16


def test_bfloat16_on_a_gpu_without_it_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(placement, "_cuda_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"cuda:0 \(Tesla V100\) does not compute in bfloat16"):
        resolve_dtype("bfloat16", torch.device("cuda", 0), tmp_path)
    with pytest.raises(ConfigError, match="expected auto, float32, bfloat16, float16"):
        resolve_dtype("bf16", torch.device("cpu"), tmp_path)


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "mps", ""):
        with pytest.raises(ConfigError, match="expected cpu, cuda, cuda:N or auto"):
            resolve_device(bad)


@needs_cuda
def test_a_cuda_index_past_the_devices_is_refused() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"PyTorch sees \d+ CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@no_cuda
def test_cuda_without_cuda_is_one_line_and_nothing_is_written(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    line = one_error_line(transport_args(models, out, options=["--device", "cuda"]), capsys)
    assert "--device cuda: PyTorch" in line and "use --device cpu" in line
    assert not out.exists()
    line = one_error_line(
        transport_args(models, out, options=["--device", "cuda:1", "--dtype", "float16"]), capsys
    )
    assert "--device cuda:1" in line
    argv = [
        "check", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"]),
        "--target-base", str(models["B"]), "--data", str(models["few"]), "--device", "cuda",
    ]  # fmt: skip
    assert "--device cuda: PyTorch" in one_error_line(argv, capsys, command="check")
    assert resolve_placement("auto", "auto", models["B"]).record() == {"device": "cpu", "dtype": "float32"}


def test_unknown_names_are_one_line(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert "--dtype: expected one of auto, float32, bfloat16, float16, got 'bf16'" in one_error_line(
        transport_args(models, out, options=["--dtype", "bf16"]), capsys
    )
    assert "--device: expected cpu, cuda, cuda:N or auto, got 'gpu'" in one_error_line(
        transport_args(models, out, options=["--device", "gpu"]), capsys
    )
    config = tmp_path / "job.yaml"
    config.write_text("device: tpu\n")
    line = one_error_line(transport_args(models, out, options=["--config", str(config)]), capsys)
    assert "device" in line and "expected cpu, cuda, cuda:N or auto" in line
    assert not out.exists()


def test_check_votes_in_bfloat16(models, capsys) -> None:
    argv = [
        "check", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"]),
        "--target-base", str(models["B"]), "--data", str(models["few"]), "--shots", "4",
        "--exclude", "pooler.*", "--dtype", "bfloat16", "--bootstrap", "20", "--permutations", "4",
        "--rebasin", "never", "--no-progress", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["data"]["device"], record["data"]["dtype"]) == ("cpu", "bfloat16")
    assert 0.0 < record["sign_agreement"]["estimate"] < 1.0


def _benchmark(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(ROOT / "benchmarks" / "gpu_votes.sh")
    return subprocess.run(["bash", script, *argv], env=env, capture_output=True, text=True, timeout=180)


def test_the_gpu_benchmark_says_when_there_is_no_gpu() -> None:
    run = _benchmark()
    assert run.returncode == 0, run.stderr
    if torch.cuda.is_available():
        assert "votes_over_batched_backward=" in run.stdout
    else:
        assert "no CUDA GPU present" in run.stdout and "votes_over_batched_backward" not in run.stdout


def test_the_gpu_benchmark_measures_on_the_cpu_when_allowed() -> None:
    run = _benchmark("--allow-cpu", "--tiny", "--repeat", "1", "--samples", "2", "--tokens", "8")
    assert run.returncode == 0, run.stderr
    lines = dict(line.split("=", 1) for line in run.stdout.splitlines() if line.startswith("votes_over"))
    assert set(lines) == {
        "votes_over_batched_backward",
        "votes_over_batched_backward_bfloat16",
        "votes_over_batched_backward_float32",
    }
    assert all(float(v) > 0 for v in lines.values())


@needs_cuda
def test_a_tiny_transport_votes_on_cuda_in_bfloat16(models, tmp_path) -> None:
    record = _transport(models, tmp_path / "gpu", "--device", "cuda", "--dtype", "bfloat16")
    assert record["data"]["device"].startswith("cuda:") and record["data"]["dtype"] == "bfloat16"
    assert record["descent"]["total_inner"] <= 0
    assert _dtypes(tmp_path / "gpu") == _dtypes(models["B"])


def test_the_adaptive_choice_and_a_merge_vote_in_bfloat16(models, tmp_path) -> None:
    argv = transport_args(
        models, tmp_path / "adaptive", "--json", options=["--shots", "4", "--dtype", "bfloat16"]
    )
    assert main(argv) == 0  # the default method: votes, the check and the choice on the bf16 model
    record = json.loads((tmp_path / "adaptive" / "gradfix.json").read_text())
    assert record["method"] == "adaptive" and record["choice"]["scores"]
    assert record["data"]["dtype"] == "bfloat16"
    argv = [
        "merge", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"]),
        "--target-base", str(models["B"]), "--data", str(models["few"]), "--shots", "4",
        "--pipeline", "mask-then-merge", "--exclude", "pooler.*", "--dtype", "bfloat16",
        "--out", str(tmp_path / "merged"), "--no-progress", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    merged = json.loads((tmp_path / "merged" / "gradfix.json").read_text())
    assert (merged["tasks"][0]["data"]["device"], merged["tasks"][0]["data"]["dtype"]) == ("cpu", "bfloat16")

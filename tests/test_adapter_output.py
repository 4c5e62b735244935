"""``--out-format adapter``: the transported update as a PEFT LoRA adapter that PEFT loads onto B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import file_hashes, one_error_line, transport_args, transport_models
from tiny_models import load_saved_model, make_adapter, make_tiny_gpt2, perturbed_copy

from gradfix import TaskVector
from gradfix.cli.main import main
from gradfix.errors import ConfigError
from gradfix.io import load_state_dict, open_checkpoint
from gradfix.ops.lowrank import truncated_svd

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")
NO_TOKEN_TYPES = ("--exclude", "embeddings.token_type_embeddings.*")  # 2 × 32: rank 2 at most


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-out")
    m = transport_models(root)
    make_adapter(m["A"], root / "lora")
    return {**m, "lora": root / "lora"}


def _merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """B with the adapter loaded by PEFT and merged in, as a state dict."""
    model = peft.PeftModel.from_pretrained(load_saved_model(base), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _record(out: Path) -> dict[str, Any]:
    return json.loads((out / "gradfix.json").read_text())


def _transport(m: dict[str, Path], out: Path, *extra: str, **roles: Any) -> dict[str, Any]:
    assert main(transport_args(m, out, *extra, **roles)) == 0
    return _record(out)


def test_full_rank_adapter_merges_into_the_full_output(models, tmp_path) -> None:
    full, out = tmp_path / "full", tmp_path / "adapter"
    options = ("--method", "naive", "--alpha", "0.8", *NO_TOKEN_TYPES)
    _transport(models, full, *options)
    record = _transport(models, out, *options, "--out-format", "adapter", "--adapter-rank", "32")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "gradfix.json",
        "gradfix.yaml",
    ]
    assert "library_name: peft" in (out / "README.md").read_text()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == str(models["B"])
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["bias"] == "lora_only"
    assert "encoder.layer.1.attention.self.query" in config["target_modules"]
    assert "encoder.layer.0.output.LayerNorm" in config["modules_to_save"]
    expected, merged = load_state_dict(full), _merged(models["B"], out)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5, msg=name)
    adapter = record["adapter"]
    assert adapter["rank"] == 32 and adapter["dropped"] == []
    assert adapter["kept_share"] == pytest.approx(1.0, abs=1e-6)
    assert record["out_format"] == "adapter" and record["adapter_rank"] == 32
    assert record["kept_fraction"] == _record(full)["kept_fraction"]
    # gradfix reads its own adapter back: ΔW over B's names is the transported update
    delta, base = TaskVector.from_adapter(models["B"], out), load_state_dict(models["B"])
    assert set(delta) == set(adapter["tensors"])
    for name, tensor in delta.items():
        torch.testing.assert_close(tensor, expected[name].float() - base[name].float(), rtol=0, atol=2e-5)


def test_the_tensor_names_are_those_peft_itself_saves(models, tmp_path) -> None:
    out = tmp_path / "adapter"
    _transport(
        models, out, "--method", "naive", *NO_TOKEN_TYPES, "--out-format", "adapter", "--adapter-rank", "2"
    )
    config = peft.LoraConfig.from_pretrained(out)
    ours = peft.get_peft_model(load_saved_model(models["B"]), config)
    with open_checkpoint(out / "adapter_model.safetensors") as written:
        names, shapes = set(written.names()), written.shapes()
    saved = peft.get_peft_model_state_dict(ours)
    assert names == set(saved)
    assert all(tuple(saved[n].shape) == tuple(shapes[n]) for n in names)


def test_low_rank_records_the_energy_share_its_factors_keep(models, tmp_path) -> None:
    full, out = tmp_path / "full", tmp_path / "adapter"
    options = ("--method", "gradfix", "--shots", "2", "--alpha", "0.9", *NO_TOKEN_TYPES)
    _transport(models, full, *options)
    record = _transport(models, out, *options, "--out-format", "adapter", "--adapter-rank", "2")
    assert record["descent"] == _record(full)["descent"]  # the same votes and mask
    base, expected, merged = load_state_dict(models["B"]), load_state_dict(full), _merged(models["B"], out)
    tensors = record["adapter"]["tensors"]
    total = kept = 0.0
    for name, entry in tensors.items():
        update = expected[name].float() - base[name].float()
        low = merged[name].float() - base[name].float()
        share = float(low.pow(2).sum() / update.pow(2).sum())
        assert entry["kept_share"] == pytest.approx(share, rel=1e-3), name
        assert entry["energy"] == pytest.approx(float(update.pow(2).sum()), rel=1e-3), name
        if entry["form"] == "lora":  # the best rank-2 approximation (Eckart–Young)
            assert share < 0.999, name
            u, s, vh = torch.linalg.svd(update, full_matrices=False)
            torch.testing.assert_close(low, (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)
        else:
            assert entry["form"] == "full" and share == pytest.approx(1.0), name
        total, kept = total + float(update.pow(2).sum()), kept + float(low.pow(2).sum())
    assert record["adapter"]["kept_share"] == pytest.approx(kept / total, rel=1e-3)
    assert 0.05 < record["adapter"]["kept_share"] < 0.95


def test_a_lora_adapter_input_round_trips_at_its_rank(models, tmp_path) -> None:
    out = tmp_path / "adapter"
    options = ("--method", "naive", "--out-format", "adapter", "--adapter-rank", "4")
    record = _transport(models, out, *options, **{"A-ft": models["lora"]})
    config = json.loads((out / "adapter_config.json").read_text())
    layers = [f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert sorted(config["target_modules"]) == layers and config["modules_to_save"] is None
    assert record["adapter"]["kept_share"] == pytest.approx(1.0, abs=1e-6)
    source, written = (
        TaskVector.from_adapter(models["A"], models["lora"]),
        TaskVector.from_adapter(models["B"], out),
    )
    assert set(written) == set(source)
    for name, tensor in source.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_masked_lora_adapter_input_at_full_rank_is_the_masked_update(models, tmp_path) -> None:
    full, out = tmp_path / "full", tmp_path / "adapter"
    options = ("--method", "gradfix", "--shots", "2")
    _transport(models, full, *options, **{"A-ft": models["lora"]})
    _transport(
        models, out, *options, "--out-format", "adapter", "--adapter-rank", "32", **{"A-ft": models["lora"]}
    )
    expected, merged = load_state_dict(full), _merged(models["B"], out)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_gpt2_conv1d_modules_set_fan_in_fan_out(tmp_path) -> None:
    a = make_tiny_gpt2(tmp_path / "A", seed=0)
    m = {
        "A": a,
        "A-ft": perturbed_copy(a, tmp_path / "A-ft", 0.02, seed=1),
        "B": make_tiny_gpt2(tmp_path / "B", 3),
    }
    m["few"] = m["A"] / "config.json"  # unused: naive addition takes no votes
    full, out = tmp_path / "full", tmp_path / "adapter"
    _transport(m, full, "--method", "naive")
    record = _transport(m, out, "--method", "naive", "--out-format", "adapter", "--adapter-rank", "32")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    assert "transformer.h.0.attn.c_attn" in config["target_modules"]
    assert "transformer.wte" in config["target_modules"]
    assert record["adapter"]["dropped"] == []
    expected, merged = load_state_dict(full), _merged(m["B"], out)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_adapter_options_from_a_config_file(models, tmp_path) -> None:
    config, out = tmp_path / "job.yaml", tmp_path / "adapter"
    config.write_text("out_format: adapter\nadapter_rank: 2\nmethod: naive\n")
    record = _transport(models, out, "--config", str(config), *NO_TOKEN_TYPES)
    assert record["adapter"]["rank"] == 2 and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--adapter-rank", "3"), "--adapter-rank 3 is larger than 1 module(s) allow: "
         "embeddings.token_type_embeddings (2×32: at most 2)"),
        (("--adapter-rank", "0"), "--adapter-rank: expected a positive integer, got '0'"),
        (("--adapter-rank", "40", *NO_TOKEN_TYPES), "embeddings.word_embeddings"),
        ((), "--out-format adapter needs --adapter-rank R"),
    ],
)  # fmt: skip
def test_bad_ranks_are_one_line_and_write_nothing(models, tmp_path, capsys, options, message) -> None:
    out = tmp_path / "adapter"
    argv = transport_args(models, out, "--method", "naive", "--out-format", "adapter", *options)
    assert message in one_error_line(argv, capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rank_without_adapter_format_and_aligned_methods_are_refused(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    line = one_error_line(transport_args(models, out, "--adapter-rank", "2"), capsys)
    assert line.endswith("--adapter-rank needs --out-format adapter")
    argv = transport_args(
        models, out, "--method", "transfusion", "--out-format", "adapter", "--adapter-rank", "2"
    )
    assert "--method transfusion permutes the target's own weights" in one_error_line(argv, capsys)
    merge = ["merge", "--source-base", str(models["A"]), "--source-finetuned", str(models["A-ft"]),
             "--out", str(out), "--out-format", "adapter", "--adapter-rank", "2"]  # fmt: skip
    assert "merge: writes full weights only" in one_error_line(merge, capsys, command="merge")
    assert not out.exists()


def test_truncated_svd_is_the_best_rank_r_approximation_and_reports_its_energy() -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(40, 24, generator=generator)
    low = truncated_svd(matrix, 5)
    s = torch.linalg.svdvals(matrix)
    assert low.b.shape == (40, 5) and low.a.shape == (5, 24)
    assert low.energy == pytest.approx(float(matrix.pow(2).sum()), rel=1e-5)
    assert low.share == pytest.approx(float(s[:5].pow(2).sum() / s.pow(2).sum()), rel=1e-5)
    assert float((low.b @ low.a).pow(2).sum()) == pytest.approx(low.kept, rel=1e-4)
    torch.testing.assert_close(low.b.T @ low.b, low.a @ low.a.T, rtol=0, atol=1e-4)  # the balanced split
    # large and low rank: the seeded randomized SVD, a projection (its share is its energy)
    big = torch.randn(300, 8, generator=generator) @ torch.randn(8, 200, generator=generator)
    noisy = big + 1e-3 * torch.randn(300, 200, generator=generator)
    fast = truncated_svd(noisy, 8, exact_limit=100)
    assert fast.share > 0.999
    assert float((fast.b @ fast.a).pow(2).sum()) == pytest.approx(fast.kept, rel=1e-4)
    again = truncated_svd(noisy, 8, exact_limit=100)
    assert torch.equal(fast.a, again.a) and torch.equal(fast.b, again.b)
    with pytest.raises(ValueError, match=r"rank 25 is not in 1\.\.24"):
        truncated_svd(matrix, 25)


def test_a_target_without_config_is_refused(models, tmp_path, capsys) -> None:
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((models["B"] / "model.safetensors").read_bytes())
    out = tmp_path / "adapter"
    argv = transport_args(
        models, out, "--method", "naive", "--out-format", "adapter", "--adapter-rank", "2", B=bare
    )
    line = one_error_line(argv, capsys)
    assert "needs the target as a folder with config.json" in line
    assert not out.exists()


def test_the_layout_saves_what_lora_cannot_hold_and_drops_what_peft_cannot() -> None:
    from gradfix.io.adapter_writer import ModuleParam, plan_adapter

    owners = {
        "emb.pos.weight": ModuleParam("emb.pos", "weight", "embedding"),
        "emb.cls": ModuleParam("emb", "cls", "other"),  # its module holds a LoRA module
        "fc.weight": ModuleParam("fc", "weight", "linear"),
        "fc.bias": ModuleParam("fc", "bias", "linear"),
        "norm.weight": ModuleParam("norm", "weight", "other"),
        "scale": ModuleParam("", "scale", "other"),  # the root's own parameter
    }
    shapes = {"emb.pos.weight": (9, 4), "emb.cls": (4,), "fc.weight": (3, 4), "fc.bias": (3,)}
    shapes |= {"norm.weight": (4,), "scale": (), "buffer": (2,)}
    names = [*owners, "buffer"]
    layout = plan_adapter(names, shapes, dict.fromkeys(names, torch.float16), owners, 3)
    forms = {e.name: (e.form, e.keys) for e in layout.entries}
    assert forms["emb.pos.weight"] == (
        "lora",
        ("base_model.model.emb.pos.lora_embedding_A", "base_model.model.emb.pos.lora_embedding_B"),
    )
    assert forms["fc.bias"] == ("full", ("base_model.model.fc.base_layer.bias",))
    assert forms["norm.weight"] == ("full", ("base_model.model.norm.weight",))
    assert {n for n, (form, _) in forms.items() if form == "dropped"} == {"emb.cls", "scale", "buffer"}
    assert layout.target_modules == ["emb.pos", "fc"] and layout.modules_to_save == ["norm"]
    assert layout.bias == "lora_only" and not layout.fan_in_fan_out
    plan = {p.name: (p.dtype, p.shape) for p in layout.plan()}
    assert plan["base_model.model.emb.pos.lora_embedding_A"] == (torch.float32, (3, 9))  # ΔWᵀ = B A
    assert plan["base_model.model.fc.lora_B.weight"] == (torch.float32, (3, 3))
    assert plan["base_model.model.norm.weight"] == (torch.float16, (4,))
    conv = {**owners, "c.weight": ModuleParam("c", "weight", "conv1d")}
    with pytest.raises(ConfigError, match=r"both nn\.Linear and Conv1D"):
        plan_adapter(["fc.weight", "c.weight"], shapes | {"c.weight": (4, 4)}, {}, conv, 3)
    with pytest.raises(ConfigError, match=r"--adapter-rank 4 is larger than 1 module\(s\) allow: fc \(3×4"):
        plan_adapter(names, shapes, dict.fromkeys(names, torch.float16), owners, 4)


def test_an_adapter_output_replays_from_its_gradfix_yaml(models, tmp_path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    _transport(
        models,
        first,
        "--method",
        "gradfix",
        *NO_TOKEN_TYPES,
        "--out-format",
        "adapter",
        "--adapter-rank",
        "3",
    )
    assert main(["transport", "--config", str(first / "gradfix.yaml"), "--out", str(again)]) == 0
    weights = [file_hashes(folder / "adapter_model.safetensors") for folder in (first, again)]
    assert list(weights[0].values()) == list(weights[1].values())
    assert json.loads((again / "gradfix.json").read_text())["adapter_rank"] == 3

"""PEFT LoRA adapter folders read as task vectors, checked against PEFT's own merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from gradfix.errors import CheckpointError, ConfigError  # noqa: E402
from gradfix.io import open_checkpoint  # noqa: E402
from gradfix.io.adapters import is_adapter_folder, open_adapter, pattern_key  # noqa: E402
from gradfix.task_vector import TaskVector  # noqa: E402


def _bert() -> Any:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config)


def _gpt2() -> Any:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    return transformers.GPT2Model(config)


def _build(tmp_path: Path, model: Any, peft_config: Any) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Save base and adapter folders; return them with PEFT's merged ``θ_merged − θ_base``."""
    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir, safe_serialization=True)
    base = load_file(str(base_dir / "model.safetensors"))
    wrapped = peft.get_peft_model(model, peft_config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:  # PEFT starts B (embedding: A) at 0
                param.normal_()
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    wrapped.save_pretrained(adapter_dir)
    merged = wrapped.merge_and_unload().state_dict()
    delta = {n: merged[n].float() - t.float() for n, t in base.items() if not torch.equal(merged[n], t)}
    return base_dir, adapter_dir, delta


def _check(tau: TaskVector, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(tau) == sorted(expected)
    for name, t in expected.items():
        assert tau[name].dtype == torch.float32
        torch.testing.assert_close(tau[name], t, atol=1e-6, rtol=0)


def _lora(**kwargs: Any) -> Any:
    kwargs.setdefault("target_modules", ["query", "value"])
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)


def _layer_names(*modules: str, layers: int = 2) -> set[str]:
    return {f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(layers) for m in modules}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_rslora": True},
        {
            "rank_pattern": {"layer.0.attention.self.query": 2, r"layer\.1\..*value": 6},
            "alpha_pattern": {"value": 3},
        },
        {"target_modules": ["query", "value", "word_embeddings"]},
    ],
    ids=["plain", "rslora", "patterns", "embedding"],
)
def test_lora_matches_peft_merge(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    base_dir, adapter_dir, expected = _build(tmp_path, _bert(), _lora(**kwargs))
    assert is_adapter_folder(adapter_dir) and not is_adapter_folder(base_dir)
    tau = TaskVector.from_adapter(base_dir, adapter_dir)
    _check(tau, expected)
    wanted = _layer_names("query", "value")
    if "word_embeddings" in kwargs.get("target_modules", []):
        wanted.add("embeddings.word_embeddings.weight")
    assert set(tau) == wanted


def test_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    config = _lora(target_modules=["c_attn"], fan_in_fan_out=True)
    base_dir, adapter_dir, expected = _build(tmp_path, _gpt2(), config)
    tau = TaskVector.from_adapter(base_dir, adapter_dir)
    _check(tau, expected)
    assert set(tau) == {"h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"}
    assert tau["h.0.attn.c_attn.weight"].shape == (32, 96)


def test_modules_to_save_is_saved_minus_base(tmp_path: Path) -> None:
    base_dir, adapter_dir, expected = _build(tmp_path, _bert(), _lora(modules_to_save=["pooler.dense"]))
    tau = TaskVector.from_adapter(base_dir, adapter_dir)
    _check(tau, expected)
    assert set(tau) == _layer_names("query", "value") | {"pooler.dense.weight", "pooler.dense.bias"}
    filtered = TaskVector.from_adapter(base_dir, adapter_dir, include=["pooler.*"])
    assert set(filtered) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert set(TaskVector.from_adapter(base_dir, adapter_dir, exclude=["pooler.*"])) == _layer_names(
        "query", "value"
    )


def test_rows_and_base_prefix_difference(tmp_path: Path) -> None:
    base_dir, adapter_dir, expected = _build(tmp_path, _bert(), _lora(modules_to_save=["pooler.dense"]))
    prefixed = tmp_path / "prefixed.safetensors"
    save_file(
        {f"bert.{n}": t for n, t in load_file(str(base_dir / "model.safetensors")).items()}, str(prefixed)
    )
    with open_checkpoint(prefixed) as base, open_adapter(adapter_dir, base.names(), base.shapes()) as ad:
        assert sorted(ad.names()) == sorted(f"bert.{n}" for n in expected)
        for name in expected:
            full = ad.tensor(f"bert.{name}", base)
            torch.testing.assert_close(full, expected[name], atol=1e-6, rtol=0)
            torch.testing.assert_close(ad.rows(f"bert.{name}", 3, 7, base), full[3:7])
        with pytest.raises(ValueError, match="base reader"):
            ad.rows("bert.pooler.dense.weight", 0, 2)


def test_unmatched_module_is_one_line_error(tmp_path: Path) -> None:
    _, adapter_dir, _ = _build(tmp_path, _bert(), _lora())
    with pytest.raises(CheckpointError, match=r"query\.weight matches no tensor") as err:
        open_adapter(adapter_dir, ["embeddings.word_embeddings.weight"])
    assert "\n" not in str(err.value)


def test_ia3_and_dora_are_refused(tmp_path: Path) -> None:
    ia3 = peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[])
    base_dir, ia3_dir, _ = _build(tmp_path / "ia3", _bert(), ia3)
    with pytest.raises(ConfigError, match="IA3") as err:
        TaskVector.from_adapter(base_dir, ia3_dir)
    assert "\n" not in str(err.value)
    base_dir, dora_dir, _ = _build(tmp_path / "dora", _bert(), _lora(use_dora=True))
    with pytest.raises(ConfigError, match="use_dora") as err:
        TaskVector.from_adapter(base_dir, dora_dir)
    assert "\n" not in str(err.value)


def test_pattern_key_matches_peft() -> None:
    from peft.utils.other import get_pattern_key

    keys = ["query", r"layer\.1\..*value", "attention.self.key"]
    for module in [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.attention.self.value",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.self.key",
        "xquery",
    ]:
        ours = pattern_key(keys, module)
        assert (ours if ours is not None else module) == get_pattern_key(keys, module)

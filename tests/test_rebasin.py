"""TransFusion: weight matching recovers the permutation between a model and a permuted copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfix import ConfigError, MismatchError, TaskVector
from gradfix.methods.transfusion import (
    HeadSet,
    PermutationSpec,
    alignment,
    apply_permutations,
    match_permutations,
    mlp_spec,
    spec_for_module,
    spec_for_state_dict,
    transfusion_task_vector,
)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5)
    )


def _random_perms(spec: PermutationSpec, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Uniform permutations; head-split groups get a head permutation plus one within each head."""
    gen = torch.Generator().manual_seed(seed)
    perms = {g: torch.randperm(n, generator=gen) for g, n in sizes.items()}
    for hs in spec.head_sets.values():
        sigma = torch.randperm(hs.num_heads, generator=gen)
        for g in hs.groups:
            d = sizes[g] // hs.num_heads
            perms[g] = torch.cat([s * d + torch.randperm(d, generator=gen) for s in sigma.tolist()])
    return perms


def _finetuned(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: t + scale * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
        for n, t in sd.items()
    }


def _assert_perms_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(found) == set(expected)
    for g in expected:
        assert torch.equal(found[g], expected[g]), g


def test_mlp_permutation_recovered_and_task_vector_permuted() -> None:
    model_a = _mlp()
    sd_a = {n: t.clone() for n, t in model_a.state_dict().items()}
    spec = spec_for_module(model_a)
    assert set(spec.groups) == {"hidden.0", "hidden.1"}
    assert ("2.weight", 0) in spec.groups["hidden.0"]  # the LayerNorm moves with layer 0's units
    truth = _random_perms(spec, spec.sizes(sd_a), seed=1)
    sd_b = apply_permutations(sd_a, truth, spec)
    model_b = _mlp(seed=5)
    model_b.load_state_dict(sd_b)
    x = torch.randn(64, 10)
    torch.testing.assert_close(model_b(x), model_a(x), atol=1e-5, rtol=0)  # same function

    perms = match_permutations(sd_a, sd_b, spec, seed=3)
    _assert_perms_equal(perms, truth)
    assert alignment(sd_a, sd_b, spec, perms) == pytest.approx(1.0)

    tau_a = TaskVector.from_state_dicts(sd_a, _finetuned(sd_a, seed=2))
    tau_b = transfusion_task_vector(tau_a, sd_a, sd_b)
    expected = apply_permutations(tau_a, truth, spec)
    for name in tau_a:
        torch.testing.assert_close(tau_b[name], expected[name], atol=1e-6, rtol=0)
    model_a.load_state_dict(tau_a.apply_to(sd_a))
    model_b.load_state_dict(tau_b.apply_to(sd_b))
    torch.testing.assert_close(model_b(x), model_a(x), atol=1e-5, rtol=0)


def _tiny_bert(seed: int):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so that every tensor carries the permutation
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
            elif "LayerNorm.weight" in name:
                param.uniform_(0.5, 1.5)
    return model


def _bert_pair(seed: int = 0, noise: float = 0.0):
    model_a = _tiny_bert(seed)
    sd_a = model_a.state_dict()
    spec = spec_for_module(model_a)
    truth = _random_perms(spec, spec.sizes(sd_a), seed=seed + 1)
    sd_b = apply_permutations(sd_a, truth, spec)
    if noise:
        gen = torch.Generator().manual_seed(seed + 2)
        sd_b = {
            n: t + noise * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
            for n, t in sd_b.items()
        }
    model_b = _tiny_bert(seed + 7)
    model_b.load_state_dict(sd_b)
    return model_a, model_b, spec, truth


def test_bert_spec_layout() -> None:
    model = _tiny_bert(0)
    spec = spec_for_module(model)
    assert set(spec.groups) == {"residual", "pooler"} | {
        f"layer.{i}.{k}" for i in (0, 1) for k in ("qk", "vo", "ffn")
    }
    assert spec.head_sets["layer.0.heads"] == HeadSet(("layer.0.qk", "layer.0.vo"), 4)
    covered = set(spec.tensor_names())
    assert covered == {n for n, t in model.state_dict().items() if t.is_floating_point()}
    prefixed = {f"bert.{n}": t for n, t in model.state_dict().items()}
    prefixed["classifier.weight"], prefixed["classifier.bias"] = torch.zeros(3, 32), torch.zeros(3)
    spec_cls = spec_for_state_dict(prefixed, num_heads=4)
    assert ("classifier.weight", 1) in spec_cls.groups["pooler"]
    assert ("bert.embeddings.word_embeddings.weight", 1) in spec_cls.groups["residual"]


def test_bert_permutation_recovered() -> None:
    model_a, model_b, spec, truth = _bert_pair()
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a, out_b = model_a(input_ids=ids), model_b(input_ids=ids)
    # same function: B's residual stream is A's, permuted; the pooler output is unchanged
    residual = truth["residual"]
    torch.testing.assert_close(
        out_b.last_hidden_state, out_a.last_hidden_state[..., residual], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        out_b.pooler_output, out_a.pooler_output[..., truth["pooler"]], atol=1e-5, rtol=0
    )

    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    perms = match_permutations(sd_a, sd_b, spec, seed=0)
    _assert_perms_equal(perms, truth)
    tau_a = TaskVector.from_state_dicts(sd_a, _finetuned(sd_a, seed=4))
    tau_b = transfusion_task_vector(tau_a, sd_a, sd_b, num_heads=4)
    expected = apply_permutations(tau_a, truth, spec)
    for name in tau_a:
        torch.testing.assert_close(tau_b[name], expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_copy_still_recovered(seed: int) -> None:
    model_a, model_b, spec, truth = _bert_pair(seed=seed, noise=2e-3)  # weights have std 0.02
    perms = match_permutations(model_a.state_dict(), model_b.state_dict(), spec, seed=seed)
    _assert_perms_equal(perms, truth)

    mlp = _mlp(seed)
    mspec = spec_for_module(mlp)
    sd_a = mlp.state_dict()
    mtruth = _random_perms(mspec, mspec.sizes(sd_a), seed=seed + 10)
    sd_b = {n: t + 0.02 * torch.randn_like(t) for n, t in apply_permutations(sd_a, mtruth, mspec).items()}
    _assert_perms_equal(match_permutations(sd_a, sd_b, mspec, seed=seed), mtruth)


def test_masked_after_transfusion_composes() -> None:
    from gradfix import mask_task_vector

    model_a = _mlp()
    sd_a = model_a.state_dict()
    spec = spec_for_module(model_a)
    truth = _random_perms(spec, spec.sizes(sd_a), seed=3)
    sd_b = apply_permutations(sd_a, truth, spec)
    tau_a = TaskVector.from_state_dicts(sd_a, _finetuned(sd_a, seed=2))
    tau_b = transfusion_task_vector(tau_a, sd_a, sd_b, spec)
    oracle = TaskVector(apply_permutations(tau_a, truth, spec))
    masked = mask_task_vector(tau_b, oracle, "agreement")
    assert all(torch.equal(masked[n], tau_b[n]) for n in tau_b)  # every sign agrees after re-basin


def test_detection_and_errors() -> None:
    sd = _mlp().state_dict()
    spec = spec_for_state_dict(sd)
    assert spec.groups == spec_for_module(_mlp()).groups
    assert mlp_spec(["a", "b", "c"]).groups["hidden.1"] == (("b.weight", 0), ("b.bias", 0), ("c.weight", 1))
    with pytest.raises(ConfigError, match="num_heads"):
        spec_for_state_dict(_tiny_bert(0).state_dict())
    with pytest.raises(ConfigError, match="module conv has"):
        spec_for_state_dict({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)})
    with pytest.raises(ConfigError, match=r"module b has \{'weight': \[2, 7\]\} after width 5"):
        spec_for_state_dict({"a.weight": torch.zeros(5, 3), "b.weight": torch.zeros(2, 7)})
    extra = dict(_tiny_bert(0).state_dict(), **{"cls.predictions.bias": torch.zeros(40)})
    with pytest.raises(ConfigError, match=r"cls\.predictions\.bias"):
        spec_for_state_dict(extra, num_heads=4)
    with pytest.raises(ConfigError, match="two groups"):
        PermutationSpec({"a": (("w", 0),), "b": (("w", 0),)})
    wide = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 5)).state_dict()
    narrow = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)).state_dict()
    with pytest.raises(MismatchError, match=r"0\.weight: shapes differ"):
        match_permutations(narrow, wide, spec_for_state_dict(narrow))
    with pytest.raises(MismatchError, match=r"group 'hidden\.0'"):
        apply_permutations(wide, {"hidden.0": torch.arange(32)}, spec_for_state_dict(wide))

"""The narrow release: a narrower encoder initialised from A's units of largest variance, then distilled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_zoo_fakes import write_fake_bbc, write_fake_python
from tiny_models import make_tiny_bert, topic_examples

from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.methods.activations import Site, record_activations
from gradfix.methods.transfusion import spec_for_module
from gradfix.recipes._hf import tokenize
from gradfix.zoo import MANIFEST, get_scenario
from gradfix.zoo.scenario import build_scenario
from gradfix.zoo.text import load_encoder
from gradfix.zoo.text_narrow import (
    NarrowShape,
    distill,
    distillation_loss,
    distillation_targets,
    narrow_init,
    narrow_scenario,
    selection_maps,
    top_units,
    unit_variances,
    write_narrow,
)
from gradfix.zoo.text_scenarios import TEXT_TASKS, TextConfig
from gradfix.zoo.training import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHAPE = NarrowShape(hidden=16, heads=2, intermediate=32)  # A: hidden 32, 4 heads of 8, FFN 64
TEXTS = [ex.text for ex in topic_examples(6, seed=0)]


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("narrow") / "A", seed=0, heads=4)


def test_top_units_keeps_the_largest_in_index_order_ties_to_the_lower_index() -> None:
    assert top_units(torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0]), 3).tolist() == [1, 2, 4]
    assert top_units(torch.tensor([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]
    with pytest.raises(ConfigError, match="cannot keep 4 of 3"):
        top_units(torch.ones(3), 4)


def test_unit_variances_are_the_activation_variances_pooled_over_sites(tiny_a: Path) -> None:
    model, tokenizer = load_encoder(tiny_a)
    variances = unit_variances(model, tokenizer, TEXTS, max_length=16, batch_size=7)
    batches = [tokenize(tokenizer, TEXTS[i : i + 7], 16) for i in range(0, len(TEXTS), 7)]
    sites = [
        Site("encoder.layer.1.intermediate.dense", "output"),
        Site("encoder.layer.1.output.dense", "input"),
    ]
    recorded = record_activations(model, batches, sites)
    per_site = [x.double().var(0, unbiased=False) * len(x) for x in recorded.values()]
    expected = sum(per_site) / sum(len(x) for x in recorded.values())
    torch.testing.assert_close(variances["layer.1.ffn"], expected, rtol=1e-9, atol=1e-12)
    assert set(variances) == set(spec_for_module(model).groups)


def test_selection_keeps_the_units_and_whole_heads_of_largest_variance(tiny_a: Path) -> None:
    model, _ = load_encoder(tiny_a)
    spec = spec_for_module(model)
    gen = torch.Generator().manual_seed(0)
    variances = {
        g: torch.rand(n, generator=gen, dtype=torch.float64)
        for g, n in spec.sizes(model.state_dict()).items()
    }
    variances["layer.0.qk"][8:16] += 5.0  # head 1 has the largest query/key variance
    variances["layer.0.vo"][24:32] += 3.0  # head 3 the largest value variance
    maps = selection_maps(variances, spec, SHAPE)
    kept = {g: t.nonzero()[:, 0] for g, t in maps.items()}  # rows of A kept, in B's order
    assert kept["residual"].tolist() == top_units(variances["residual"], 16).tolist()
    assert kept["layer.1.ffn"].tolist() == top_units(variances["layer.1.ffn"], 32).tolist()
    assert kept["layer.0.qk"].tolist() == kept["layer.0.vo"].tolist() == [*range(8, 16), *range(24, 32)]
    assert all(t.sum(0).eq(1).all() and t.sum(1).le(1).all() for t in maps.values())  # 0/1 selections
    again = selection_maps(variances, spec, SHAPE)
    assert all(torch.equal(maps[g], again[g]) for g in maps)


def test_narrow_init_is_a_restriction_of_a_and_deterministic(tiny_a: Path) -> None:
    model_a, tokenizer = load_encoder(tiny_a)
    model_b, record, residual_map = narrow_init(model_a, tokenizer, TEXTS, SHAPE, max_length=16)
    again, _, _ = narrow_init(model_a, tokenizer, TEXTS, SHAPE, max_length=16)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in sd_b.items())
    assert sd_b["embeddings.word_embeddings.weight"].shape == (
        sd_a["embeddings.word_embeddings.weight"].shape[0],
        16,
    )
    variances = unit_variances(model_a, tokenizer, TEXTS, max_length=16)
    residual = top_units(variances["residual"], 16)
    ffn = top_units(variances["layer.0.ffn"], 32)
    w_a = sd_a["encoder.layer.0.intermediate.dense.weight"]
    assert torch.equal(sd_b["encoder.layer.0.intermediate.dense.weight"], w_a[ffn][:, residual])
    assert residual_map.nonzero()[:, 0].tolist() == residual.tolist()
    assert len(record["kept_heads"]["layer.0"]) == 2 and 0 < record["kept_variance_share"]["residual"] < 1
    with pytest.raises(ConfigError, match="head size"):
        narrow_init(model_a, tokenizer, TEXTS, NarrowShape(hidden=12, heads=2, intermediate=32))


def test_narrow_model_loads_in_transformers_with_its_own_widths(tiny_a: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    out = tmp_path / "B"
    out.mkdir()
    settings = TrainSettings(steps=2, lr=1e-3, batch_size=8, weight_decay=0.01, seed=3)
    record = write_narrow(tiny_a, out, TEXTS, SHAPE, settings, progress=False)
    model = AutoModel.from_pretrained(out)
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (16, 2, 32)
    shapes = {n: tuple(t.shape) for n, t in load_state_dict(out).items()}
    assert shapes["embeddings.position_embeddings.weight"][1] == 16
    assert shapes["encoder.layer.1.attention.self.query.weight"] == (16, 16)
    assert shapes["encoder.layer.1.output.dense.weight"] == (16, 32)
    assert (out / "vocab.txt").is_file() and 0 < record["projection_energy"] <= 1


def test_distillation_lowers_the_distillation_loss(tiny_a: Path) -> None:
    model_a, tokenizer = load_encoder(tiny_a)
    model_b, _, projection = narrow_init(model_a, tokenizer, TEXTS, SHAPE, max_length=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # start away from the target: the restriction of A is already close to it
        for name, param in model_b.named_parameters():
            if name.startswith("encoder.") and name.endswith("weight") and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    word_embeddings = model_b.embeddings.word_embeddings.weight.detach().clone()
    targets, energy = distillation_targets(model_a, tokenizer, TEXTS, projection, max_length=16)
    assert 0 < energy < 1

    def loss() -> float:
        model_b.eval()
        with torch.no_grad():
            batch = tokenize(tokenizer, TEXTS, 16)
            hidden = model_b(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return float(distillation_loss((hidden * mask).sum(1) / mask.sum(1), targets))

    before = loss()
    settings = TrainSettings(steps=30, lr=3e-3, batch_size=len(TEXTS), weight_decay=0.0, seed=3)
    record = distill(model_b, model_a, tokenizer, TEXTS, settings, projection, max_length=16, progress=False)
    assert loss() < 0.5 * before, (before, loss())
    assert record["relative_change"] > 0 and record["texts_drawn"] == len(TEXTS)
    assert torch.equal(model_b.embeddings.word_embeddings.weight, word_embeddings)  # frozen


def test_narrow_scenario_shares_a_and_its_finetunes_and_builds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    config = TextConfig(
        base=str(make_tiny_bert(src / "tiny", seed=0, heads=4)),
        corpus=str(write_fake_bbc(src / "bbc", articles_per_class=12)),
        unlabelled=str(write_fake_python(src / "lib")),
        caps={"validation": 8, "test": 10},
        finetune={name: TrainSettings(steps=2, lr=1e-3, batch_size=4, seed=2) for name in TEXT_TASKS},
    )
    settings = TrainSettings(steps=3, lr=1e-3, batch_size=4, weight_decay=0.01, seed=3)
    scenario = narrow_scenario("tiny-narrow", config, SHAPE, settings)
    view = build_scenario(
        scenario, tmp_path / "cache", tasks=["headlines"], log=lambda m: None, progress=False
    )
    manifest = json.loads((view / MANIFEST).read_text())
    assert manifest["entries"]["B"]["recipe"]["shape"] == {"hidden": 16, "heads": 2, "intermediate": 32}
    assert load_state_dict(view / "B-ft" / "headlines")["encoder.layer.0.output.dense.weight"].shape == (
        16,
        32,
    )
    longer = narrow_scenario("tiny-narrow", config, SHAPE, TrainSettings(steps=4, lr=1e-3, batch_size=4))
    assert longer.entries["B"].key() != scenario.entries["B"].key()


def test_registered_narrow_scenario_reuses_the_short_releases_a_entries() -> None:
    narrow, short = get_scenario("text-narrow"), get_scenario("text-release-short")
    for entry in ("data", "A", "A-ft/headlines", "A-ft/sentences", "A-ft/style"):
        assert narrow.entries[entry].key() == short.entries[entry].key(), entry
    assert narrow.entries["B"].name == "text/B-narrow" and narrow.extra["widths"] == {"A": 384, "B": 256}
    assert narrow.entries["B"].recipe["settings"]["steps"] > 0

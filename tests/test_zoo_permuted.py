"""The permuted release: the same function in other coordinates, recovered by TransFusion."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_zoo_fakes import write_fake_bbc, write_fake_python
from tiny_models import make_tiny_bert, perturbed_copy

from gradfix import TaskVector
from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.methods.transfusion import (
    apply_permutations,
    match_permutations,
    mlp_spec,
    transfusion_task_vector,
)
from gradfix.recipes import HEAD_FILENAME
from gradfix.recipes._hf import tokenize
from gradfix.zoo import MANIFEST, get_scenario
from gradfix.zoo.scenario import build_scenario
from gradfix.zoo.text import load_encoder
from gradfix.zoo.text_permuted import (
    encoder_permutations,
    permutation_digest,
    permute_model,
    permuted_scenario,
    release_permutations,
)
from gradfix.zoo.text_scenarios import TEXT_TASKS, TextConfig, text_scenario
from gradfix.zoo.training import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HEADS = 4
TEXTS = ["the team won the match today", "stock market shares fell", "new phone app launches"]


def _hidden(folder: Path) -> torch.Tensor:
    model, tokenizer = load_encoder(folder)
    with torch.no_grad():
        return model(**tokenize(tokenizer, TEXTS, 16)).last_hidden_state


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("permuted")
    src = make_tiny_bert(root / "src", seed=0, heads=HEADS)
    out = root / "out"
    out.mkdir()
    return src, out, permute_model(src, out, seed=3)


def test_permuted_model_computes_the_same_function_with_other_weights(pair: tuple) -> None:
    src, out, record = pair
    assert torch.allclose(_hidden(src), _hidden(out), atol=1e-5, rtol=0)
    assert record["max_output_difference"] < 1e-5
    a, b = load_state_dict(src), load_state_dict(out)
    assert a.keys() == b.keys()
    permuted = [n for n in a if n.startswith("encoder.") and "LayerNorm" not in n and n.endswith("weight")]
    assert permuted and all(not torch.equal(a[n], b[n]) for n in permuted)
    for name in a:  # the residual stream is not permuted: its tensors are unchanged
        if "LayerNorm" in name or name.startswith(("embeddings.", "pooler.")):
            assert torch.equal(a[name], b[name]), name
        if name.endswith("attention.output.dense.bias") or name.endswith("output.dense.bias"):
            assert torch.equal(a[name], b[name]), name
    assert 0.9 * record["units"] < record["units_moved"] <= record["units"]


def test_transfusion_recovers_the_permutation(pair: tuple, tmp_path: Path) -> None:
    src, out, _ = pair
    a, b = load_state_dict(src), load_state_dict(out)
    spec, drawn = encoder_permutations(a, HEADS, seed=3)
    found = match_permutations(a, b, spec)
    for group, perm in found.items():
        expected = drawn.get(group, torch.arange(len(perm)))  # residual and pooler: unmoved
        assert torch.equal(perm, expected), group
    # a release that also moved (noise of a tenth of the weights' scale) is matched as well
    moved = perturbed_copy(src, tmp_path / "moved", scale=0.002, seed=1)
    permuted = tmp_path / "moved-permuted"
    permuted.mkdir()
    permute_model(moved, permuted, seed=3)
    found = match_permutations(a, load_state_dict(permuted), spec)
    assert all(torch.equal(found[g], p) for g, p in drawn.items())


def test_task_vector_lines_up_only_after_rebasin(pair: tuple) -> None:
    src, out, _ = pair
    a, b = load_state_dict(src), load_state_dict(out)
    spec, drawn = encoder_permutations(a, HEADS, seed=3)
    generator = torch.Generator().manual_seed(0)
    tau = TaskVector(
        {n: torch.randn(t.shape, generator=generator) for n, t in a.items() if n.startswith("encoder.")}
    )
    carried = TaskVector(apply_permutations(dict(tau), drawn, spec))
    rebased = transfusion_task_vector(dict(tau), a, b, num_heads=HEADS)
    assert all(torch.equal(rebased[n], carried[n]) for n in carried)
    changed = [n for n in tau if not torch.equal(tau[n], carried[n])]
    assert changed and all("LayerNorm" not in n for n in changed)


def test_permutations_are_seeded_and_move_heads_as_blocks(pair: tuple) -> None:
    src, _, _ = pair
    a = load_state_dict(src)
    _, first = encoder_permutations(a, HEADS, seed=3)
    _, again = encoder_permutations(a, HEADS, seed=3)
    _, other = encoder_permutations(a, HEADS, seed=4)
    assert permutation_digest(first) == permutation_digest(again) != permutation_digest(other)
    assert set(first) == {f"layer.{i}.{k}" for i in range(2) for k in ("qk", "vo", "ffn")}
    d = 32 // HEADS
    for i in range(2):
        qk, vo = first[f"layer.{i}.qk"], first[f"layer.{i}.vo"]
        assert sorted(qk.tolist()) == list(range(32)) and sorted(first[f"layer.{i}.ffn"].tolist()) == list(
            range(64)
        )
        assert torch.equal(qk.view(HEADS, d) // d, vo.view(HEADS, d) // d)  # one head order
        assert all(len(set(row.tolist())) == 1 for row in qk.view(HEADS, d) // d)
    _, blocks = encoder_permutations(a, HEADS, seed=3, within_heads=False)
    assert torch.equal(blocks["layer.0.qk"].view(HEADS, d).diff(dim=1), torch.ones(HEADS, d - 1).long())


def test_a_spec_without_layers_is_refused() -> None:
    spec = mlp_spec(["0", "1"])
    with pytest.raises(ConfigError, match="not a BERT-like encoder"):
        release_permutations(spec, {"hidden.0": 8}, seed=0)


def _config(src: Path) -> TextConfig:
    return TextConfig(
        base=str(make_tiny_bert(src / "tiny", seed=0, heads=HEADS)),
        corpus=str(write_fake_bbc(src / "bbc", articles_per_class=10)),
        unlabelled=str(write_fake_python(src / "lib")),
        caps={"validation": 6, "test": 8},
        pretrain={"short": TrainSettings(steps=2, lr=1e-3, batch_size=4, weight_decay=0.01, seed=1)},
        finetune={name: TrainSettings(steps=2, lr=1e-3, batch_size=4, seed=2) for name in TEXT_TASKS},
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scenario_shares_a_and_permutes_b_and_its_fine_tunes(tmp_path: Path) -> None:
    config = _config(tmp_path / "src")
    short = text_scenario("tiny-short", "short", config)
    scenario = permuted_scenario("tiny-permuted", "short", config, seed=5)
    for entry in ("data", "A", "A-ft/headlines"):
        assert scenario.entries[entry].key() == short.entries[entry].key(), entry
    cache = tmp_path / "cache"
    short_view = build_scenario(short, cache, tasks=["headlines"], log=lambda m: None, progress=False)
    messages: list[str] = []
    view = build_scenario(scenario, cache, tasks=["headlines"], log=messages.append, progress=False)
    built = {m.split()[1] for m in messages if m.startswith("building")}
    assert built == {"text/B-short-permuted", "text/B-short-permuted-ft/headlines"}
    for rel in ("B", "B-ft/headlines"):
        assert torch.allclose(_hidden(view / rel), _hidden(short_view / rel), atol=1e-5, rtol=0), rel
    head = f"B-ft/headlines/{HEAD_FILENAME}"
    assert _sha(view / head) == _sha(short_view / head)
    manifest = json.loads((view / MANIFEST).read_text())
    b_record = manifest["entries"]["B"]["details"]
    ft_record = manifest["entries"]["B-ft/headlines"]["details"]
    assert b_record["permutation_sha256"] == ft_record["permutation_sha256"]
    drift = b_record["drift_from_A"]
    assert drift["encoder"] > 10 * drift["encoder_before_permutation"] > 0
    assert manifest["permutation_seed"] == 5 and manifest["level"] == "short-permuted"
    # τ_B of the permuted scenario is the short release's τ_B permuted
    tau = TaskVector.from_checkpoints(view / "B", view / "B-ft/headlines", include="encoder.*")
    tau_short = TaskVector.from_checkpoints(
        short_view / "B", short_view / "B-ft/headlines", include="encoder.*"
    )
    spec, perms = encoder_permutations(load_state_dict(short_view / "B"), HEADS, seed=5)
    expected = apply_permutations(dict(tau_short), perms, spec)
    assert all(torch.allclose(tau[n], expected[n], atol=1e-6) for n in tau)


def test_registered_scenario_reuses_the_short_release() -> None:
    permuted, short = get_scenario("text-release-permuted"), get_scenario("text-release-short")
    assert permuted.tasks == short.tasks and permuted.family == "text"
    shared = ["data", "A", *(f"A-ft/{t}" for t in short.tasks)]
    assert all(permuted.entries[e].key() == short.entries[e].key() for e in shared)
    assert permuted.entries["B"].deps["model"].key() == short.entries["B"].key()
    for task in short.tasks:
        assert permuted.entries[f"B-ft/{task}"].deps["model"].key() == short.entries[f"B-ft/{task}"].key()


def test_a_built_scenario_is_read_without_the_cache_lock(tmp_path: Path, monkeypatch) -> None:
    import contextlib

    from gradfix.zoo import scenario as scenario_module
    from gradfix.zoo.cache import Artifact
    from gradfix.zoo.scenario import Scenario

    def write(out: Path, deps: object, progress: bool) -> dict:
        (out / "value.txt").write_text("v")
        return {}

    toy = Scenario("toy", "toy", "a toy", {"A": Artifact("toy/A", "file", {"v": 1}, write)}, tasks=())
    taken: list[Path] = []

    @contextlib.contextmanager
    def lock(root: Path):
        taken.append(root)
        yield

    monkeypatch.setattr(scenario_module, "build_lock", lock)
    build_scenario(toy, tmp_path, log=lambda m: None, progress=False)
    assert taken == [tmp_path]  # building takes the lock
    view = build_scenario(toy, tmp_path, log=lambda m: None, progress=False)
    assert taken == [tmp_path] and (view / "A" / "value.txt").read_text() == "v"  # reading does not

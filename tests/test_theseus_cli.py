"""``gradfix transport --method theseus --data ...``: Theseus from A's and B's activations on the shots.

Tiny BERTs built here: B is A under a known map (permutations of every space, or a narrower
selection of A's units), so the task vector B's coordinates should receive is known:
``τ_B = T(τ_A)``. The activation maps must recover it exactly for a permuted B and come closer to
it than the data-free maps for a narrower B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import one_error_line
from tiny_models import make_tiny_bert, make_tiny_gpt2, perturbed_copy, topic_examples, write_jsonl

from gradfix import TaskVector
from gradfix.cli.main import main
from gradfix.io import load_state_dict
from gradfix.methods.theseus import apply_transforms
from gradfix.methods.transfusion import spec_for_module

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = 4


def _selection(d_a: int, d_b: int, gen: torch.Generator) -> torch.Tensor:
    """``T [d_A, d_B]``: ``d_B`` of A's units, in random order (a permutation when ``d_A = d_B``)."""
    t = torch.zeros(d_a, d_b, dtype=torch.float64)
    t[torch.randperm(d_a, generator=gen)[:d_b], torch.arange(d_b)] = 1.0
    return t


def _head_selection(sigma: torch.Tensor, dims: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Heads permuted by ``σ``, each keeping ``d_B`` of its ``d_A`` dimensions in random order."""
    (d_a, d_b), heads = dims, len(sigma)
    t = torch.zeros(heads * d_a, heads * d_b, dtype=torch.float64)
    for j, s in enumerate(sigma.tolist()):
        t[s * d_a : (s + 1) * d_a, j * d_b : (j + 1) * d_b] = _selection(d_a, d_b, gen)
    return t


def _maps(widths_a: tuple[int, int], widths_b: tuple[int, int], seed: int, heads: int = HEADS) -> dict:
    """A known map of every space of a 2-layer BERT: A's ``(hidden, intermediate)`` to B's."""
    gen = torch.Generator().manual_seed(seed)
    maps = {"residual": _selection(widths_a[0], widths_b[0], gen)}
    maps["pooler"] = _selection(widths_a[0], widths_b[0], gen)
    for i in range(2):
        maps[f"layer.{i}.ffn"] = _selection(widths_a[1], widths_b[1], gen)
        dims = (widths_a[0] // heads, widths_b[0] // heads)
        sigma = torch.randperm(heads, generator=gen)  # a head's query/key and value/output move together
        maps[f"layer.{i}.qk"] = _head_selection(sigma, dims, gen)
        maps[f"layer.{i}.vo"] = _head_selection(sigma, dims, gen)
    return maps


def _mapped_copy(
    a: Path, out: Path, maps: dict, widths: tuple[int, int], unused_positions: int | None = None
) -> Path:
    """B: a BERT of ``widths`` whose weights are A's under ``maps`` (``W_B = T_outᵀ W_A T_in``).

    ``unused_positions``: B's position embeddings from that position on (never reached by the
    examples) are drawn anew, as an independently trained B would have them."""
    from transformers import BertModel

    folder = make_tiny_bert(out, seed=9, hidden=widths[0], intermediate=widths[1], heads=HEADS)
    model_a, model_b = BertModel.from_pretrained(a), BertModel.from_pretrained(folder)
    mapped = apply_transforms(model_a.state_dict(), maps, spec_for_module(model_a))
    model_b.load_state_dict({n: t for n, t in mapped.items() if t.is_floating_point()}, strict=False)
    if unused_positions is not None:
        with torch.no_grad():
            rows = model_b.embeddings.position_embeddings.weight[unused_positions:]
            rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(7)) * rows.std())
    model_b.save_pretrained(folder)
    return folder


def _silence_units(folder: Path, ffn_maps: dict) -> None:
    """A's FFN units that ``ffn_maps`` drop write nothing (their output columns are zero), so a
    narrower B with the others computes A's function."""
    from transformers import BertModel

    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        for i in range(2):
            dropped = ffn_maps[f"layer.{i}.ffn"].sum(1) == 0
            model.encoder.layer[i].output.dense.weight[:, dropped] = 0.0
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Any]:
    """A (hidden 48, FFN 96), A-ft, a permuted copy of A, a narrower B (hidden 32, FFN 64), a B
    with A's function and a narrower FFN (64 units) and labelled examples."""
    root = tmp_path_factory.mktemp("theseus_cli")
    random_init = make_tiny_bert(root / "init", seed=0, hidden=48, intermediate=96, heads=HEADS)
    a = perturbed_copy(random_init, root / "A", 0.1, seed=1)  # norm gains and biases off 1 and 0
    same, narrow, ffn = (
        _maps((48, 96), w, seed) for w, seed in (((48, 96), 1), ((32, 64), 2), ((48, 64), 3))
    )
    _silence_units(a, ffn)
    return {
        "A": a,
        "A-ft": perturbed_copy(a, root / "A-ft", 0.02, seed=3),
        "permuted": _mapped_copy(a, root / "permuted", same, (48, 96)),
        "narrow": _mapped_copy(a, root / "narrow", narrow, (32, 64)),
        "ffn": _mapped_copy(a, root / "ffn", ffn, (48, 64), unused_positions=24),
        "maps": same,
        "ffn_maps": ffn,
        "few": write_jsonl(root / "few.jsonl", topic_examples(20, seed=0)),
    }


def _args(p: dict, target: Path, out: Path, *extra: str) -> list[str]:
    return [
        "transport", "--source-base", str(p["A"]), "--source-finetuned", str(p["A-ft"]),
        "--target-base", str(target), "--method", "theseus", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def _carried(out: Path, target: Path) -> TaskVector:
    """``θ_out − θ_B`` without the pooler: the examples (48) cannot fix its 48 units."""
    tau = TaskVector.from_state_dicts(load_state_dict(target), load_state_dict(out))
    return TaskVector({n: t for n, t in tau.items() if not n.startswith("pooler.")})


def _expected(p: dict, maps: dict) -> TaskVector:
    """``T(τ_A)`` under the known maps, without the pooler."""
    from transformers import BertModel

    tau_a = TaskVector.from_checkpoints(p["A"], p["A-ft"], exclude="pooler.*")
    return TaskVector(apply_transforms(tau_a, maps, spec_for_module(BertModel.from_pretrained(p["A"]))))


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The float tensors' shapes, without the pooler (as :func:`_carried`)."""
    sd = load_state_dict(folder)
    return {n: tuple(t.shape) for n, t in sd.items() if t.is_floating_point() and not n.startswith("pooler.")}


def _cosine(a: TaskVector, b: TaskVector) -> float:
    x = torch.cat([a[n].flatten().double() for n in sorted(b)])
    y = torch.cat([b[n].flatten().double() for n in sorted(b)])
    return float(x @ y / (x.norm() * y.norm()))


def test_a_permuted_target_gets_the_permuted_task_vector(pair, tmp_path) -> None:
    out = tmp_path / "out"
    data = ["--data", str(pair["few"]), "--shots", "16", "--exclude", "pooler.*"]
    assert main(_args(pair, pair["permuted"], out, *data)) == 0
    record = json.loads((out / "gradfix.json").read_text())
    theseus = record["theseus"]
    assert theseus["from"] == "activations" and theseus["examples"] == 48
    assert theseus["center"] is False and theseus["whiten"] == 0.0
    assert set(theseus["underdetermined"]) <= {"pooler"}  # every token-level space is fixed
    assert len(theseus["drawn_lines"]) == 48 and theseus["tokens"] > 96
    assert record["num_samples"] == 0 and "data" not in record  # no mask: no votes
    carried, expected = _carried(out, pair["permuted"]), _expected(pair, pair["maps"])
    assert set(carried) == set(expected)
    for name in expected:
        torch.testing.assert_close(carried[name], expected[name].float(), atol=2e-5, rtol=0, msg=name)
    card = (out / "README.md").read_text()
    assert "activations of A and B on 48 examples" in card


def test_without_data_the_maps_come_from_the_weights(pair, tmp_path) -> None:
    out = tmp_path / "out"
    assert main(_args(pair, pair["narrow"], out)) == 0
    assert _carried(out, pair["narrow"]).shapes() == _shapes(pair["narrow"])
    record = json.loads((out / "gradfix.json").read_text())
    assert record["theseus"] == {"from": "weights", "examples": 0, "whiten": 0.0}
    assert "two bases' weights" in (out / "README.md").read_text()


def test_a_narrower_ffn_activation_maps_beat_the_data_free_maps(pair, tmp_path) -> None:
    """B computes A's function with 64 of its 96 FFN units, its residual stream and heads permuted,
    and positions the examples never reach drawn anew. The activations fix every shared space
    exactly; the weights, which also see the unused positions, do not."""
    expected = _expected(pair, pair["ffn_maps"])
    shared = [n for n in expected if "intermediate" not in n and "output.dense.weight" not in n]
    cosines: dict[str, dict[str, float]] = {}
    for source, extra in (("activations", ["--data", str(pair["few"]), "--shots", "16"]), ("weights", [])):
        out = tmp_path / source
        assert main(_args(pair, pair["ffn"], out, *extra, "--exclude", "pooler.*")) == 0
        assert json.loads((out / "gradfix.json").read_text())["theseus"]["from"] == source
        carried = _carried(out, pair["ffn"])
        assert carried.shapes() == expected.shapes()  # B's shapes
        cosines[source] = {
            "all": _cosine(carried, expected),
            "shared": min(_cosine(TaskVector({n: carried[n]}), TaskVector({n: expected[n]})) for n in shared),
        }
    assert cosines["activations"]["shared"] > 0.9999, cosines
    assert cosines["weights"]["shared"] < 0.999, cosines
    assert cosines["activations"]["all"] > 0.9, cosines


def test_a_wider_target_and_a_mask_after_the_mapping(pair, tmp_path) -> None:
    out = tmp_path / "wide"
    args = [
        "transport", "--source-base", str(pair["narrow"]), "--source-finetuned", str(pair["narrow"]),
        "--target-base", str(pair["A"]), "--method", "theseus", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    narrow_ft = perturbed_copy(pair["narrow"], tmp_path / "narrow-ft", 0.02, seed=4)
    args[4] = str(narrow_ft)
    data = ["--data", str(pair["few"]), "--shots", "4", "--mask", "agreement", "--exclude", "pooler.*"]
    assert main([*args, *data]) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert record["theseus"]["from"] == "activations" and record["theseus"]["examples"] == 12
    assert record["mask"] == "agreement" and record["num_samples"] == 12
    assert record["theseus"]["underdetermined"]  # 12 examples cannot fix the pooler's 32 units
    assert _carried(out, pair["A"]).shapes() == _shapes(pair["A"])
    kept = record["kept_fraction"]
    assert min(kept.values()) > 0.0 and max(kept.values()) < 1.0


def test_errors_are_one_line(pair, tmp_path, capsys) -> None:
    few = ["--data", str(pair["few"])]
    line = one_error_line(_args(pair, pair["narrow"], tmp_path / "x", *few, "--shots", "25"), capsys)
    assert "25" in line and "few.jsonl" in line
    gpt = make_tiny_gpt2(tmp_path / "gpt", seed=0)
    line = one_error_line(_args(pair, gpt, tmp_path / "x", *few), capsys)
    assert "'bert'" in line and "'gpt2'" in line and "architecture family" in line
    gpt_ft = perturbed_copy(gpt, tmp_path / "gpt-ft", 0.02, seed=1)
    gpt_b = perturbed_copy(gpt, tmp_path / "gpt-b", 0.02, seed=2)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": ex.text} for ex in topic_examples(3, seed=1)])
    args = [
        "transport", "--source-base", str(gpt), "--source-finetuned", str(gpt_ft), "--target-base",
        str(gpt_b), "--method", "theseus", "--recipe", "causal-lm", "--data", str(texts), "--shots", "4",
        "--out", str(tmp_path / "x"), "--no-progress",
    ]  # fmt: skip
    line = one_error_line(args, capsys)
    assert "source base" in line and "wpe" in line
    assert not (tmp_path / "x").exists()

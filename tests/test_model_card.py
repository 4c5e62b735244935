"""Every output folder has a model card of its own (``README.md``), generated from ``gradfix.json``.

The target's card describes the target and is not copied; gradfix's card has Hugging Face front
matter (``base_model`` = B, ``tags``, ``library_name``) and says what the model is: the source
models, the method, the chosen threshold and α with every candidate's score, the kept share of
``τ_A``, the first-order descent certificate and the sha256 of every input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_checks import transport_args, transport_models

from gradfix.cli.main import main
from gradfix.io import copy_model_files
from gradfix.jobs.card import card_metadata, model_card, model_name

B_CARD = "# B's own model card\n\nZEBRA-7 is what this base model was trained to say.\n"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A default (adaptive) transport, a TransFusion transport and a plain merge onto a B with a card."""
    root = tmp_path_factory.mktemp("card")
    m = transport_models(root)
    (m["B"] / "README.md").write_text(B_CARD)
    grids = ("--thresholds", "0", "naive", "--alphas", "0", "0.5", "1")
    assert main(transport_args(m, root / "adaptive", *grids)) == 0
    assert main(transport_args(m, root / "transfusion", "--method", "transfusion", "--alpha", "1")) == 0
    merge = ["merge", "--source-base", str(m["A"]), "--source-finetuned", str(m["A-ft"])]
    merge += ["--target-base", str(m["B"]), "--exclude", "pooler.*", "--out", str(root / "merge")]
    assert main([*merge, "--no-progress"]) == 0
    return {**m, **{name: root / name for name in ("adaptive", "transfusion", "merge")}}


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    front, _, _ = card[4:].partition("\n---\n")
    meta = yaml.safe_load(front)
    assert isinstance(meta, dict)
    return meta


def _record(out: Path) -> dict[str, Any]:
    return json.loads((out / "gradfix.json").read_text())


def test_the_targets_card_is_replaced_by_gradfixs_own(outputs) -> None:
    for name in ("adaptive", "transfusion", "merge"):
        card = (outputs[name] / "README.md").read_text()
        assert "ZEBRA-7" not in card and "B's own model card" not in card, name
        assert card == model_card(_record(outputs[name]))  # generated from the record alone
        assert (outputs[name] / "config.json").exists()  # the other files are still copied


def test_front_matter_names_b_the_tags_and_the_library(outputs) -> None:
    hub = pytest.importorskip("huggingface_hub")
    for name, tags in (
        ("adaptive", ["gradfix", "task-vector-transport"]),
        ("merge", ["gradfix", "task-vector-transport", "merge"]),
    ):
        path = outputs[name] / "README.md"
        meta = _front_matter(path.read_text())
        assert meta == {"base_model": "B", "tags": tags, "library_name": "transformers"}
        data = hub.ModelCard.load(path).data  # the Hub's own reader agrees
        assert data.base_model == "B" and data.tags == tags and data.library_name == "transformers"


def test_the_card_states_the_choice_the_kept_share_the_certificate_and_the_hashes(outputs) -> None:
    record = _record(outputs["adaptive"])
    card = (outputs["adaptive"] / "README.md").read_text()
    choice = record["choice"]
    t = "naive" if choice["threshold"] > 1 else f"{choice['threshold']:g}"
    assert f"**t = {t}, α = {choice['alpha']:g}**" in card
    assert "| t \\ α | 0 | 0.5 | 1 |" in card and "| naive |" in card  # every candidate's score
    assert f"**{choice['score']:.4g}**" in card.split("| t \\ α |")[1]  # marked in the table
    assert f"{100 * record['descent']['kept_fraction']:.2f} %" in card
    assert "first-order descent certificate" in card
    if record["alpha"] != 0:
        assert f"{record['descent']['total_inner']:.4e}" in card
    for entry in record["inputs"].values():
        for digest in entry["sha256"].values():
            assert digest in card
    assert record["data"]["sha256"]["few.jsonl"] in card
    assert "gradfix transport --config gradfix.yaml --out" in card
    assert "`adaptive`" in card and "few.jsonl" in card


def test_cards_of_an_aligned_method_and_of_a_merge(outputs) -> None:
    card = (outputs["transfusion"] / "README.md").read_text()
    assert "method `transfusion`" in card and "no mask: every coordinate of `τ_A` is added" in card
    assert "no first-order descent certificate" in card and "Choice of t and α" not in card
    merge = (outputs["merge"] / "README.md").read_text()
    assert "merge `ties`" in merge and "pipeline `plain`" in merge and "non-zero on" in merge
    assert "gradfix merge --config gradfix.yaml" in merge


def _transport_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "command": "transport",
        "method": "gradfix",
        "mask": "agreement",
        "alpha": 1.0,
        "shots": "all",
        "inputs": {
            "source_base": {"path": "/m/A", "sha256": {"model.safetensors": "aa"}},
            "source_finetuned": {"path": "/m/lora", "sha256": {"adapter_config.json": "bb"}},
            "target_base": {"path": "/m/B", "sha256": {"model.safetensors": "cc"}},
        },
        "data": {"path": "/m/d.jsonl", "sha256": {"d.jsonl": "dd"}, "num_samples": 9, "labels": ["x", "y"]},
        "descent": {"alpha": 1.0, "total_inner": 0.25, "kept_fraction": 0.5, "tensors": []},
    }
    record.update(changes)
    return record


def test_card_from_records_of_every_kind() -> None:
    card = model_card(_transport_record())
    assert "A fine-tuned (a LoRA adapter)" in card and "every example" in card
    assert "> 0: to first order the update raises" in card  # an honest certificate
    assert "library_name" not in _front_matter(card)  # bare weights: no library loads the folder
    assert "gradfix.yaml" not in card  # an old record without options: no replay to offer
    unchanged = model_card(_transport_record(alpha=0.0, descent={"alpha": 0.0, "kept_fraction": 0.5}))
    assert "α = 0: the weights are B's, unchanged" in unchanged and "none is added" in unchanged
    sentence = _transport_record()
    sentence["inputs"]["target_base"]["sha256"] = {"config.json": "1", "modules.json": "2"}
    assert card_metadata(sentence)["library_name"] == "sentence-transformers"
    assert card_metadata(_transport_record(files=["adapter_model.safetensors"]))["library_name"] == "peft"


def test_model_name_is_the_hub_id_when_there_is_one() -> None:
    snapshot = "/home/u/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/abc"
    assert model_name({"path": snapshot}) == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_name({"path": "/x/y", "repo_id": "org/name"}) == "org/name"
    assert model_name({"path": "relative/B-release-2/"}) == "B-release-2"


def test_copy_model_files_skips_what_it_is_told_and_never_gradfix_files(tmp_path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for rel in ("config.json", "readme.MD", "sub/README.md", "gradfix.yaml", "gradfix.json"):
        (src / rel).write_text("x")
    copied = copy_model_files(src, tmp_path / "a", skip=("README.md",))
    assert sorted(copied) == ["config.json", "sub/README.md"]  # the top-level card only, any case
    assert sorted(copy_model_files(src, tmp_path / "b")) == ["config.json", "readme.MD", "sub/README.md"]

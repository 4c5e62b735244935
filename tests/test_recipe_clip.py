"""The ``clip-zero-shot`` recipe on a tiny random CLIP: data, loss, votes, head and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line
from tiny_clip import COLOURS, image_dataset, make_tiny_clip, perturbed_clip

from gradfix import estimate_signs
from gradfix.cli.main import main
from gradfix.errors import CheckpointError, ConfigError, DataError
from gradfix.recipes import BuildOptions, get_recipe
from gradfix.recipes.clip_zero_shot import DEFAULT_CLIP_TEMPLATE
from gradfix.votes.hooks import hooked_parameters

LABELS = sorted(COLOURS)
FAMILY = get_recipe("clip-zero-shot")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP ``A`` and the same images as JSON lines and as class folders."""
    root = tmp_path_factory.mktemp("clip")
    return {"A": make_tiny_clip(root / "A", seed=0), **image_dataset(root / "data")}


@pytest.fixture(scope="module")
def built(clip):
    """``(model, recipe, examples)`` for ``A`` on the JSON-lines data."""
    model, recipe = FAMILY.build(clip["A"], LABELS, BuildOptions())
    return model, recipe, FAMILY.read_examples(clip["jsonl"])


def test_both_data_layouts_give_the_same_examples(clip) -> None:
    rows = FAMILY.read_examples(clip["jsonl"])
    folders = FAMILY.read_examples(clip["folders"])
    assert len(rows) == len(folders) == 9
    assert sorted((Path(e.text), e.label) for e in rows) == sorted((Path(e.text), e.label) for e in folders)
    assert all(Path(e.text).is_absolute() and Path(e.text).is_file() for e in rows)
    assert [e.line for e in rows] == list(range(1, 10))
    assert rows[0].get("source") == str(clip["jsonl"])


def test_a_missing_or_unreadable_image_names_the_row(clip, built, tmp_path) -> None:
    _, recipe, _ = built
    data = tmp_path / "rows.jsonl"
    good = str(clip["folders"] / "tech" / "0.png")
    data.write_text(
        json.dumps({"image": good, "label": "tech"}) + "\n" + '{"image": "nope.png", "label": "tech"}\n'
    )
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2: image .*nope\.png not found"):
        FAMILY.read_examples(data)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    data.write_text(
        json.dumps({"image": good, "label": "tech"}) + '\n{"image": "broken.png", "label": "tech"}\n'
    )
    examples = FAMILY.read_examples(data)  # existence is checked on reading, decoding on collating
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2: cannot read the image .*broken\.png") as err:
        recipe.collate(examples)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty" / "sports"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found"):
        FAMILY.read_examples(empty.parent)


def test_logits_are_clip_s_own_and_the_loss_is_per_sample_and_pure(built) -> None:
    model, recipe, examples = built
    batch = recipe.collate(examples)
    assert batch["pixel_values"].shape == (9, 3, 8, 8)
    losses = recipe.loss(model, batch)
    assert losses.shape == (9,) and bool(torch.isfinite(losses).all())
    alone = torch.cat([recipe.loss(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(9)])
    torch.testing.assert_close(alone, losses.detach(), rtol=1e-5, atol=1e-5)
    # the logits are CLIPModel's own logits_per_image for the class prompts
    prompts = recipe.tokenizer(
        [DEFAULT_CLIP_TEMPLATE.format(label=x) for x in LABELS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**prompts, pixel_values=batch["pixel_values"]).logits_per_image
        torch.testing.assert_close(recipe.logits(model, batch), expected, rtol=1e-4, atol=1e-4)
    assert recipe.logit_scale == pytest.approx(float(model.logit_scale.exp()))
    # only the image tower votes; the head is a constant of the recipe
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vision_model.", "visual_projection.")) for n in trainable)
    head = recipe.head.clone()
    losses.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("text_"))
    model.zero_grad(set_to_none=True)
    assert torch.equal(recipe.head, head)
    accuracy = recipe.accuracy(model, examples, batch_size=4)
    predicted = recipe.logits(model, batch).argmax(dim=-1)
    assert accuracy == pytest.approx(float((predicted == batch["labels"]).float().mean()))


def test_votes_of_every_engine_equal_the_loop(built) -> None:
    model, recipe, examples = built
    model.double()
    recipe.head = recipe.head.double()
    model.logit_scale.requires_grad_(True)  # a parameter the loss does not use: no vote, no error
    try:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        covered = {n for names in hooked_parameters(model, params).values() for n in names.values()}
        assert set(params) - covered == {"logit_scale"}  # the conv patches and the class token included
        batches = [recipe.collate(examples[::2]), recipe.collate(examples[1:6:2])]
        loop = estimate_signs(model, batches, recipe.loss, engine="loop", progress=False)
        assert loop.untouched() == ["logit_scale"]
        for engine in ("hooks", "vmap", "auto"):
            votes = estimate_signs(model, batches, recipe.loss, engine=engine, progress=False)
            assert votes.hits == loop.hits, engine
            for name, counts in loop.counts.items():
                torch.testing.assert_close(votes.grad_sum[name], loop.grad_sum[name], rtol=1e-9, atol=1e-12)
                if name.endswith("k_proj.bias"):  # 0 exactly, as softmax ignores it: its votes are
                    # the rounding noise of the attention's float32 softmax
                    assert float(loop.grad_sum[name].abs().max()) < 1e-6
                else:
                    assert torch.equal(votes.counts[name], counts), (engine, name)
    finally:
        model.float()
        recipe.head = recipe.head.float()
        model.logit_scale.requires_grad_(False)


def test_template_head_file_and_scale(clip, built, tmp_path) -> None:
    _, recipe, _ = built
    other = FAMILY.build(clip["A"], LABELS, BuildOptions(template="the {label} one .", logit_scale=3.0))[1]
    assert other.template == "the {label} one ." and other.logit_scale == 3.0
    assert not torch.allclose(other.head, recipe.head)
    saved = recipe.save_head(tmp_path / "head.safetensors")
    assert FAMILY.known_labels(clip["A"], saved) == (LABELS, f"the zero-shot head {saved}")
    reloaded = FAMILY.build(clip["A"], ["tech", "sports"], BuildOptions(head_from=saved))[1]
    torch.testing.assert_close(reloaded.head, recipe.head[[2, 1]])
    assert reloaded.logit_scale == recipe.logit_scale
    with pytest.raises(ConfigError, match="built with template"):
        FAMILY.build(clip["A"], LABELS, BuildOptions(head_from=saved, template="x {label}"))
    with pytest.raises(ConfigError, match=r"no row for label\(s\) \['cats'\]"):
        FAMILY.build(clip["A"], ["cats", "tech"], BuildOptions(head_from=saved))
    with pytest.raises(ConfigError, match="must contain"):
        FAMILY.build(clip["A"], LABELS, BuildOptions(template="a photo"))


def test_other_recipes_name_both_zero_shot_families_for_template(tmp_path) -> None:
    with pytest.raises(ConfigError, match="only text-zero-shot and clip-zero-shot use it, not causal-lm"):
        get_recipe("causal-lm").build(tmp_path, [], BuildOptions(template="{label}"))


def test_a_folder_without_an_image_processor_is_refused(clip, tmp_path) -> None:
    import shutil

    copy = Path(shutil.copytree(clip["A"], tmp_path / "A"))
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no preprocessor_config\.json"):
        FAMILY.build(copy, LABELS, BuildOptions())


@pytest.fixture(scope="module")
def transported(clip, tmp_path_factory) -> dict[str, Path]:
    """``A``, ``A-ft`` (``A`` changed in the image tower only), ``B`` (``A`` changed everywhere)
    and ``gradfix transport --recipe clip-zero-shot`` of ``A``'s update onto ``B``, voting on the
    class folders."""
    root = tmp_path_factory.mktemp("transport")
    m = {
        "A": clip["A"],
        "A-ft": perturbed_clip(clip["A"], root / "A-ft", 0.05, seed=1, prefix="vision_model."),
        "B": perturbed_clip(clip["A"], root / "B", 0.02, seed=2),
        "out": root / "out",
    }
    argv = ["transport", "--recipe", "clip-zero-shot", "--source-base", str(m["A"])]
    argv += ["--source-finetuned", str(m["A-ft"]), "--target-base", str(m["B"])]
    argv += ["--data", str(clip["folders"]), "--method", "gradfix", "--out", str(m["out"]), "--no-progress"]
    assert main(argv) == 0
    return m


def test_transport_writes_a_clip_folder_that_transformers_loads(clip, transported, capsys) -> None:
    from transformers import AutoImageProcessor, CLIPModel

    out = transported["out"]
    record = json.loads((out / "gradfix.json").read_text())
    assert record["recipe"] == "clip-zero-shot"
    assert sorted(record["data"]["sha256"]) == sorted(f"{x}/{i}.png" for x in LABELS for i in range(3))
    loaded = CLIPModel.from_pretrained(out, local_files_only=True)
    base = CLIPModel.from_pretrained(transported["B"], local_files_only=True)
    changed = {n for n, p in loaded.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(n.startswith("vision_model.") for n in changed)
    assert AutoImageProcessor.from_pretrained(out, local_files_only=True, backend="pil") is not None
    assert FAMILY.known_labels(out) == (LABELS, f"the zero-shot head {out / 'zero_shot_head.safetensors'}")
    capsys.readouterr()
    argv = ["eval", "--recipe", "clip-zero-shot", "--model", str(out), "--data", str(clip["jsonl"]), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 9 and 0.0 <= result["accuracy"] <= 1.0


def test_transport_of_a_text_tower_update_needs_an_unvoted_policy(clip, transported, capsys) -> None:
    text_ft = perturbed_clip(clip["A"], transported["out"].parent / "A-text", 0.05, seed=4)
    argv = ["transport", "--recipe", "clip-zero-shot", "--source-base", str(clip["A"])]
    argv += ["--source-finetuned", str(text_ft), "--target-base", str(transported["B"])]
    argv += ["--data", str(clip["jsonl"]), "--no-progress"]
    line = one_error_line([*argv, "--out", str(transported["out"].parent / "bad")], capsys)
    assert "have no votes from the target" in line and "text_model." in line
    assert not (transported["out"].parent / "bad").exists()


def test_an_unreadable_image_is_one_line_from_the_command_line(clip, transported, tmp_path, capsys) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    good = clip["folders"] / "sports" / "1.png"
    data = tmp_path / "rows.jsonl"
    rows = [{"image": str(good), "label": "sports"}, {"image": "broken.png", "label": "tech"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["eval", "--recipe", "clip-zero-shot", "--model", str(transported["out"]), "--data", str(data)]
    line = one_error_line(argv, capsys, command="eval")
    assert f"{data}, line 2: cannot read the image {tmp_path / 'broken.png'}" in line

"""The ``seq2seq`` recipe on a tiny random T5 built offline: labels as decoder targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line
from tiny_models import perturbed_copy, topic_examples, vocab_words, write_jsonl

from gradfix import estimate_signs
from gradfix.cli.main import main
from gradfix.data import Example
from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.recipes import RECIPES, Seq2SeqRecipe, load_recipe
from gradfix.votes.hooks import hooked_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["sports", "business", "tech news"]  # "tech news" is two tokens: targets of two lengths


def make_tiny_t5(out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny ``T5ForConditionalGeneration`` and a word-level tokenizer to ``out_dir``.

    The tokenizer lower-cases, drops control characters, splits on whitespace and punctuation and
    ends each text with ``</s>``; ``<pad>`` (id 0) is the padding and decoder start token.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = ["<pad>", "</s>", "<unk>"] + [w for w in vocab_words() if not w.startswith("[")]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = T5Config(
        vocab_size=len(words),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    folder = Path(out_dir)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def topic_data(n_per_class: int, seed: int) -> list[Example]:
    """Topic sentences labelled with :data:`LABELS` (``tech`` becomes ``tech news``)."""
    rename = {"tech": "tech news"}
    return [Example(ex.text, rename.get(ex.label, ex.label)) for ex in topic_examples(n_per_class, seed)]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "A", seed=0)


@pytest.fixture(scope="module")
def built(t5_dir: Path) -> tuple[torch.nn.Module, Seq2SeqRecipe]:
    model, recipe = load_recipe("seq2seq", t5_dir, LABELS)
    assert isinstance(recipe, Seq2SeqRecipe)
    return model, recipe


def test_registered_with_accuracy_and_labels_of_two_lengths(built) -> None:
    assert "seq2seq" in RECIPES and RECIPES["seq2seq"].scores_accuracy
    model, recipe = built
    assert type(model).__name__ == "T5ForConditionalGeneration" and not model.training
    assert recipe.labels == LABELS and recipe.use_prepared_mask
    ids = recipe.tokenizer.convert_tokens_to_ids
    assert recipe.targets.tolist() == [
        [ids("sports"), 1, -100],  # the word, then </s>
        [ids("business"), 1, -100],
        [ids("tech"), ids("news"), 1],
    ]
    assert recipe.decoder_inputs[:, 0].tolist() == [0, 0, 0]  # the decoder starts with <pad>
    assert torch.equal(recipe.decoder_inputs[:, 1:], recipe.targets[:, :-1].clamp(min=0))
    batch = recipe.collate([Example("the game", "sports"), Example("a big match", "business")])
    assert batch["targets"].shape == (2, 2)  # trimmed to the longest label in the batch
    assert batch["labels"].tolist() == [0, 1]


def test_loss_is_per_sample_minus_the_own_label_log_likelihood(built) -> None:
    model, recipe = built
    examples = topic_data(3, seed=0)
    batch = recipe.collate(examples)
    assert (batch["attention_mask"] == 0).any() and (batch["targets"] == -100).any()
    losses = recipe.loss(model, batch)
    assert losses.shape == (len(examples),) and bool((losses > 0).all())
    for i, example in enumerate(examples):
        sliced = recipe.loss(model, {k: v[i : i + 1] for k, v in batch.items()})
        alone = recipe.loss(model, recipe.collate([example]))
        torch.testing.assert_close(sliced, losses[i : i + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, losses[i : i + 1], atol=1e-5, rtol=1e-5)
    logits = recipe.logits(model, batch)
    assert logits.shape == (len(examples), len(LABELS))
    torch.testing.assert_close(-logits[torch.arange(len(examples)), batch["labels"]], losses)
    plain = Seq2SeqRecipe(model, recipe.tokenizer, LABELS, use_prepared_mask=False)
    torch.testing.assert_close(plain.loss(model, batch), losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.logits(model, batch), logits, atol=1e-5, rtol=1e-5)


def test_the_library_default_attention_gives_the_same_losses(t5_dir: Path, built) -> None:
    model, recipe = built
    sdpa_model, sdpa = load_recipe("seq2seq", t5_dir, LABELS, attn_implementation=None)
    assert sdpa_model.config._attn_implementation == "sdpa"
    batch = recipe.collate(topic_data(2, seed=4))
    torch.testing.assert_close(sdpa.loss(sdpa_model, batch), recipe.loss(model, batch), atol=1e-5, rtol=1e-5)


def test_accuracy_follows_the_logits_and_rises_with_training(t5_dir: Path) -> None:
    model, recipe = load_recipe("seq2seq", t5_dir, LABELS)
    examples = topic_data(4, seed=1)
    batch = recipe.collate(examples)
    with torch.no_grad():
        predicted = recipe.logits(model, batch).argmax(dim=-1)
    expected = float((predicted == batch["labels"]).float().mean())
    assert recipe.accuracy(model, examples, batch_size=5) == pytest.approx(expected)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        optimizer.zero_grad()
        recipe.loss(model, batch).mean().backward()
        optimizer.step()
    assert recipe.accuracy(model, examples) == 1.0 > expected
    assert model.training  # the mode is restored


def test_votes_of_every_engine_equal_the_loop(built) -> None:
    model, recipe = built
    params = dict(model.named_parameters())
    covered = {n for names in hooked_parameters(model, params).values() for n in names.values()}
    assert "encoder.final_layer_norm.weight" in covered  # T5's layer norm has its rule
    assert set(params) - covered == {"shared.weight"}  # tied to the output layer: the loop
    # as many samples as encoder tokens and as decoder tokens: the relative attention bias,
    # looked up once for the batch, has a first axis as long as the batch
    same = [Example("the game", "sports"), Example("stock", "business"), Example("chip", "tech news")]
    batches = [recipe.collate(same), recipe.collate(topic_data(2, seed=2))]
    assert batches[0]["input_ids"].shape == batches[0]["targets"].shape == (3, 3)
    for order in (batches, batches[::-1]):
        loop = estimate_signs(model, order, recipe.loss, engine="loop", progress=False)
        for engine in ("auto", "hooks", "vmap"):
            votes = estimate_signs(model, order, recipe.loss, engine=engine, progress=False)
            for name, counts in loop.counts.items():
                assert torch.equal(votes.counts[name], counts), (engine, name)
                torch.testing.assert_close(votes.grad_sum[name], loop.grad_sum[name], atol=1e-5, rtol=1e-4)
            assert votes.hits == loop.hits


def test_a_label_that_tokenises_to_nothing_or_like_another_is_refused(built) -> None:
    model, recipe = built
    with pytest.raises(
        ConfigError, match=r"^label '\\x07' tokenises to nothing with this model's tokenizer$"
    ):
        Seq2SeqRecipe(model, recipe.tokenizer, ["sports", "\x07"])
    with pytest.raises(ConfigError, match="labels 'zzz' and 'qqq' tokenise to the same tokens"):
        Seq2SeqRecipe(model, recipe.tokenizer, ["zzz", "qqq"])  # both <unk>


def test_transport_and_eval_from_the_command_line(tmp_path: Path, t5_dir: Path, capsys) -> None:
    from transformers import AutoModelForSeq2SeqLM

    a_ft = perturbed_copy(t5_dir, tmp_path / "A-ft", 0.05, seed=1)
    b = perturbed_copy(t5_dir, tmp_path / "B", 0.05, seed=2)
    few = write_jsonl(tmp_path / "few.jsonl", topic_data(4, seed=3))
    out = tmp_path / "out"
    argv = ["transport", "--recipe", "seq2seq", "--source-base", str(t5_dir), "--source-finetuned"]
    argv += [str(a_ft), "--target-base", str(b), "--data", str(few), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    record = json.loads((out / "gradfix.json").read_text())
    assert record["recipe"] == "seq2seq" and record["num_samples"] == 6  # 2 shots a class
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True)
    assert type(loaded).__name__ == "T5ForConditionalGeneration"
    written, base = load_state_dict(out), load_state_dict(b)
    assert set(written) == set(base)
    assert any(not torch.equal(written[n], base[n]) for n in base)  # the update reached B
    assert torch.equal(loaded.lm_head.weight, written["shared.weight"])  # still tied

    assert main(["eval", "--recipe", "seq2seq", "--model", str(out), "--data", str(few), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, recipe = load_recipe("seq2seq", out, sorted(LABELS))
    model = loaded.float().eval()
    assert result["accuracy"] == pytest.approx(recipe.accuracy(model, topic_data(4, seed=3)))

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the game", "label": "\x07"}, *topic_data(1, 0)])
    line = one_error_line(
        ["eval", "--recipe", "seq2seq", "--model", str(out), "--data", str(bad)], capsys, "eval"
    )
    assert line.endswith(f"{out}: label '\\x07' tokenises to nothing with this model's tokenizer")

"""The causal-lm recipe in TRL's data conventions: {"text"}, {"prompt", "completion"}, {"messages"}.

Tiny random GPT-2 and Llama models with a word-level tokenizer and a chat template written as a
string are built here; the loss is checked against a hand computation over the scored tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from cli_checks import one_error_line
from tiny_models import perturbed_copy, vocab_words, write_jsonl

from gradfix.cli.main import main
from gradfix.data import UNLABELLED, Example
from gradfix.errors import DataError
from gradfix.recipes import get_recipe, load_recipe
from gradfix.votes import estimate_signs

pytestmark = pytest.mark.usefixtures("one_thread")

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
MARKED_TEMPLATE = (  # the same text, with the assistant turns inside generation markers
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> "
    "{% generation %}{{ m['content'] }} <|end|> {% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CHAT = [
    {"role": "system", "content": "the news desk"},
    {"role": "user", "content": "what about the game today ?"},
    {"role": "assistant", "content": "the team won the match"},
    {"role": "user", "content": "and the market ?"},
    {"role": "assistant", "content": "stock price up"},
]


def word_tokenizer(chat_template: str | None = TEMPLATE) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the test vocabulary that puts ``<s>`` first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", *ROLE_TOKENS]
    words = [w for w in vocab_words() if not w.startswith("[")]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_lm(folder: Path, kind: str = "llama", seed: int = 0, chat_template: str | None = TEMPLATE) -> Path:
    """Save a random tiny Llama or GPT-2 causal LM with :func:`word_tokenizer` to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(chat_template)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
        model: Any = LlamaForCausalLM(config)
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {kind: tiny_lm(root / kind, kind) for kind in ("llama", "gpt2")}


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _read(tmp_path: Path, rows: list[Any], name: str = "data.jsonl") -> list[Example]:
    return get_recipe("causal-lm").read_examples(_write(tmp_path / name, rows))


def _scored_text(recipe: Any, example: Example) -> list[str]:
    ids, scored = recipe.encode(example)
    return [recipe.tokenizer.convert_ids_to_tokens(i) for i, s in zip(ids, scored, strict=True) if s]


def _hand_loss(model: Any, ids: list[int], scored: list[bool]) -> torch.Tensor:
    """Mean cross-entropy of the next token at the scored positions, from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    positions = [t for t in range(1, len(ids)) if scored[t]]
    targets = torch.tensor([ids[t] for t in positions])
    return F.cross_entropy(logits[[t - 1 for t in positions]], targets)


# --- reading the formats -------------------------------------------------------------------------


def test_every_format_reads_unlabelled(tmp_path):
    text = _read(tmp_path, [{"text": "the game", "label": "sports"}, {"text": "the market"}])
    assert [(ex.text, ex.label, ex.line) for ex in text] == [
        ("the game", UNLABELLED, 1),
        ("the market", UNLABELLED, 2),
    ]
    pc = _read(tmp_path, [{"prompt": "the game", "completion": " was won", "id": 7}])
    assert pc[0].get("prompt") == "the game" and pc[0].get("completion") == " was won"
    assert pc[0].label == UNLABELLED and pc[0].text == "the game was won"
    chat = _read(tmp_path, [{"messages": CHAT}])
    assert chat[0].get("scored") == (2, 4) and chat[0].get("messages")[1] == ("user", CHAT[1]["content"])
    conv = _read(tmp_path, [{"prompt": CHAT[:2], "completion": CHAT[2:3]}])
    assert conv[0].get("scored") == (2,) and len(conv[0].get("messages")) == 3
    (tmp_path / "d.csv").write_text("text,label\nthe game,sports\n", encoding="utf-8")
    assert get_recipe("causal-lm").read_examples(tmp_path / "d.csv")[0] == Example("the game", UNLABELLED)
    assert len({ex for ex in chat + conv + pc + text}) == 5  # examples stay hashable


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"text": "a"}, {"prompt": "a", "completion": "b"}],
            "line 2: a {'prompt', 'completion'} example, but line 1",
        ),
        ([{"messages": CHAT}, "", {"text": "a"}], "line 3: a {'text'} example, but line 1 is a {'messages'}"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "line 1: messages[0] has role 'bot'"),
        (
            [{"messages": [CHAT[1], {"role": "assistant"}]}],
            "line 1: messages[1] (assistant) has no 'content'",
        ),
        ([{"messages": [{"role": "user", "content": ["x"]}]}], "messages[0] (user) has a list 'content'"),
        ([{"messages": [CHAT[1]]}], "line 1: 'messages' has no assistant turn"),
        ([{"messages": "hello"}], "'messages' must be a non-empty list"),
        ([{"messages": CHAT, "text": "a"}], "both 'messages' and ['text']"),
        ([{"prompt": "a"}], "line 1: has ['prompt']; expected {'text'}"),
        ([{"prompt": "a", "completion": CHAT[2:]}], "must both be strings or both lists of messages"),
        ([{"prompt": "a", "completion": " "}], "empty 'completion'"),
        ([{"label": "x"}], "expected {'text'}, {'prompt', 'completion'} or {'messages'}; got keys ['label']"),
        ([{"text": ""}], "'text' must be a non-empty string"),
        (["{oops"], "line 1: invalid JSON"),
        (["[1]"], "expected a JSON object, got list"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, rows, message):
    with pytest.raises(DataError) as caught:
        _read(tmp_path, rows)
    text = str(caught.value)
    assert text.startswith(str(tmp_path / "data.jsonl")) and message in text and "\n" not in text


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="file is empty"):
        _read(tmp_path, [""])
    with pytest.raises(DataError, match="data file not found"):
        get_recipe("causal-lm").read_examples(tmp_path / "none.jsonl")


# --- what the loss scores ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_scores_the_completion_only(lms, tmp_path, kind):
    model, recipe = load_recipe("causal-lm", lms[kind], [])
    pc = _read(tmp_path, [{"prompt": "the team won the game", "completion": " after the match"}])[0]
    ids, scored = recipe.encode(pc)
    assert recipe.tokenizer.convert_ids_to_tokens(ids)[0] == "<s>" and not scored[0]
    assert _scored_text(recipe, pc) == ["after", "the", "match"]
    loss = recipe.loss(model, recipe.collate([pc]))
    assert torch.allclose(loss, _hand_loss(model, ids, scored).unsqueeze(0), atol=1e-6)
    # the same text scored on every token is another number: the prompt's tokens were left out
    every = recipe.loss(model, recipe.collate([Example(pc.text, UNLABELLED)]))
    assert torch.allclose(every, _hand_loss(model, ids, [True] * len(ids)).unsqueeze(0), atol=1e-6)
    assert not torch.allclose(loss, every, atol=1e-3)
    # changing a prompt token changes the context but never adds it to the scored tokens
    other = Example("x", UNLABELLED, 0, (("completion", " after the match"), ("prompt", "a new stock deal")))
    assert _scored_text(recipe, other) == ["after", "the", "match"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chat_scores_the_assistant_turns(lms, tmp_path, kind):
    model, recipe = load_recipe("causal-lm", lms[kind], [])
    chat = _read(tmp_path, [{"messages": CHAT}])[0]
    assert _scored_text(recipe, chat) == [
        "the",
        "team",
        "won",
        "the",
        "match",
        "<|end|>",
        "stock",
        "price",
        "up",
        "<|end|>",
    ]
    ids, scored = recipe.encode(chat)
    assert recipe.tokenizer.convert_ids_to_tokens(ids).count("<s>") == 1  # the template's own
    loss = recipe.loss(model, recipe.collate([chat]))
    assert torch.allclose(loss, _hand_loss(model, ids, scored).unsqueeze(0), atol=1e-6)
    # the transformers mask of a template with generation markers marks the same tokens
    marked = word_tokenizer(MARKED_TEMPLATE)
    library = marked.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert library["input_ids"] == ids and [bool(m) for m in library["assistant_masks"]] == scored
    conv = _read(tmp_path, [{"prompt": CHAT[:4], "completion": CHAT[4:]}], "conv.jsonl")[0]
    assert _scored_text(recipe, conv) == ["stock", "price", "up", "<|end|>"]


def test_truncation_keeps_the_masks(lms, tmp_path):
    rows = [{"messages": CHAT}, {"prompt": "the team won the game", "completion": " after the match"}]
    examples = _read(tmp_path, rows[:1]) + _read(tmp_path, rows[1:], "pc.jsonl")
    _, full = load_recipe("causal-lm", lms["llama"], [])
    assert [len(full.encode(ex)[0]) for ex in examples] == [32, 9]
    for limit in (7, 8, 16, 19, 29):  # cuts the completion; the first assistant turn; the second
        _, short = load_recipe("causal-lm", lms["llama"], [], max_length=limit)
        ids, scored = full.encode(examples[limit < 16])
        assert short.encode(examples[limit < 16]) == (ids[:limit], scored[:limit])
    _, short = load_recipe("causal-lm", lms["llama"], [], max_length=16)
    batch = short.collate(examples)
    assert batch["input_ids"].shape[1] == 16 and batch["attention_mask"].sum(dim=1).tolist() == [16, 9]
    assert (batch["labels"][0] != -100).sum() == 1  # the first assistant turn's first token
    _, tiny = load_recipe("causal-lm", lms["llama"], [], max_length=6)
    with pytest.raises(DataError, match=rf"{tmp_path / 'pc.jsonl'}, line 1: no completion token is left"):
        tiny.encode(examples[1])
    with pytest.raises(
        DataError, match=r"data.jsonl, line 1: no scored turn's token is left within the first 6"
    ):
        tiny.encode(examples[0])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_sample_losses_and_gradients_are_pure(lms, tmp_path, kind):
    model, recipe = load_recipe("causal-lm", lms[kind], [])
    rows = [
        {"messages": CHAT},
        {"messages": CHAT[1:3]},
        {"messages": [CHAT[1], {"role": "assistant", "content": "win"}]},
    ]
    examples = _read(tmp_path, rows)
    batch = recipe.collate(examples)
    assert batch["attention_mask"].sum(dim=1).unique().numel() == 3  # three lengths, padded
    losses = recipe.loss(model, batch)
    for i, ex in enumerate(examples):
        assert torch.allclose(losses[i], recipe.loss(model, recipe.collate([ex]))[0], atol=1e-6)
    hooks = estimate_signs(model, [batch], recipe.loss, "majority", engine="auto", progress=False)
    loop = estimate_signs(model, [batch], recipe.loss, "majority", engine="loop", progress=False)
    for name, counts in loop.counts.items():
        assert torch.equal(hooks.counts[name], counts), name
        assert torch.allclose(hooks.grad_sum[name], loop.grad_sum[name], atol=1e-6, rtol=1e-4), name


def test_a_tokenizer_without_chat_template_is_named(tmp_path):
    folder = tiny_lm(tmp_path / "plain", "llama", chat_template=None)
    _, recipe = load_recipe("causal-lm", folder, [])
    chat = _read(tmp_path, [{"messages": CHAT}])[0]
    with pytest.raises(DataError) as caught:
        recipe.collate([chat])
    assert str(caught.value).startswith(
        f"{tmp_path / 'data.jsonl'}, line 1: conversations need the tokenizer's chat"
    )
    pc = _read(tmp_path, [{"prompt": "the game", "completion": " won"}], "pc.jsonl")[0]
    assert _scored_text(recipe, pc) == ["won"]  # other formats need no template


# --- the command line ----------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "what about the game ?"}, {"role": "assistant", "content": "the team won"}],
    [{"role": "user", "content": "the market ?"}, {"role": "assistant", "content": "stock price up"}],
    [{"role": "user", "content": "new phone ?"}, {"role": "assistant", "content": "the app launches today"}],
    [
        {"role": "user", "content": "the vote ?"},
        {"role": "assistant", "content": "the party won the election"},
    ],
    CHAT,
    [{"role": "user", "content": "a film ?"}, {"role": "assistant", "content": "the movie star wins again"}],
]


def test_cli_transport_of_a_llama_on_chat_data(tmp_path, capsys):
    a = tiny_lm(tmp_path / "A", "llama", seed=0)
    models = {
        "A": a,
        "A-ft": perturbed_copy(a, tmp_path / "A-ft", 0.02, seed=1),
        "B": tiny_lm(tmp_path / "B", seed=3),
    }
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    base = ["transport", "--recipe", "causal-lm", "--data", str(chat), "--no-progress", "--json"]
    for role, flag in (("A", "--source-base"), ("A-ft", "--source-finetuned"), ("B", "--target-base")):
        base += [flag, str(models[role])]
    assert main([*base, "--shots", "4", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "gradfix.json").read_text())
    assert record["data"]["labels"] == [UNLABELLED] and record["data"]["max_length"] == 128
    assert len(record["data"]["drawn_lines"]) == 4 and record["data"]["num_samples"] == 4
    assert record["method"] == "adaptive" and "choice" in record
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert type(out).__name__ == "LlamaForCausalLM"
    capsys.readouterr()
    line = one_error_line([*base, "--shots", "7", "--out", str(tmp_path / "o7")], capsys)
    assert f"{chat}: 7 shots requested but the file has 6 example(s)" in line
    line = one_error_line([*base, "--shots", "1", "--out", str(tmp_path / "o1")], capsys)
    assert "needs at least 2 shots, but there are 1" in line
    line = one_error_line(
        ["eval", "--model", str(models["B"]), "--data", str(chat), "--recipe", "causal-lm"], capsys, "eval"
    )
    assert "no accuracy" in line
    assert not (tmp_path / "o7").exists() and not (tmp_path / "o1").exists()

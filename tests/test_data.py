"""Tests for gradfix.data: loading JSON lines / CSV / TSV, few-shot sampling, batching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradfix.data import Example, batched, label_set, load_examples, sample_shots
from gradfix.errors import ConfigError, DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_parsing_skips_blank_lines_and_stringifies_labels(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        '{"text": "the team won", "label": "sports"}\n\n   \n'
        '{"text": "shares fell", "label": 1, "extra": true}\n',
    )
    assert load_examples(path) == [
        Example("the team won", "sports"),
        Example("shares fell", "1"),
    ]


def test_json_suffix_and_custom_fields(tmp_path):
    path = _write(tmp_path / "d.json", json.dumps({"sentence": "hi", "y": "a"}) + "\n")
    assert load_examples(path, text_field="sentence", label_field="y") == [Example("hi", "a")]


def test_csv_and_tsv_parsing(tmp_path):
    csv_path = _write(tmp_path / "d.csv", 'id,text,label\n1,"hello, world",greet\n2,bye,part\n')
    assert load_examples(csv_path) == [Example("hello, world", "greet"), Example("bye", "part")]
    tsv_path = _write(tmp_path / "d.tsv", "label\ttext\ngreet\thello, world\n")
    assert load_examples(tsv_path) == [Example("hello, world", "greet")]


def test_csv_multiline_field_reports_physical_line(tmp_path):
    path = _write(tmp_path / "d.csv", 'text,label\n"two\nlines",a\nok,\n')
    with pytest.raises(DataError, match=r"d\.csv, line 4: empty label"):
        load_examples(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "a", "label": "x"}\n{"text": oops}\n', r"line 2: invalid JSON"),
        ('{"text": "a", "label": "x"}\n\n[1, 2]\n', r"line 3: expected a JSON object, got list"),
        ('{"label": "x"}\n', r"line 1: missing text field 'text'"),
        ('{"text": "a"}\n', r"line 1: missing label field 'label'"),
        ('{"text": "  ", "label": "x"}\n', r"line 1: empty text field"),
        ('{"text": "a", "label": ""}\n', r"line 1: empty label field"),
        ('{"text": "a", "label": null}\n', r"line 1: missing label field"),
        ('{"text": "a", "label": [1]}\n', r"line 1: label field 'label' must be a string or"),
        ('{"text": 5, "label": "x"}\n', r"line 1: text field 'text' must be a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, pattern):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=pattern) as info:
        load_examples(path)
    assert "bad.jsonl" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load_examples(_write(tmp_path / "empty.jsonl", "\n\n"))
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        load_examples(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataError, match=r"header\.csv: file is empty"):
        load_examples(_write(tmp_path / "header.csv", "text,label\n"))
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'"):
        load_examples(_write(tmp_path / "d.txt", "x"))
    with pytest.raises(DataError, match="not a file"):
        load_examples(tmp_path)


def test_csv_missing_columns_lists_available(tmp_path):
    path = _write(tmp_path / "cols.csv", "sentence,label\nhi,a\n")
    with pytest.raises(DataError, match=r"cols\.csv, line 1: .*'text'.* it has 'sentence', 'label'"):
        load_examples(path)


def test_csv_short_row(tmp_path):
    path = _write(tmp_path / "short.csv", "text,label\nhi,a\nlonely\n")
    with pytest.raises(DataError, match=r"short\.csv, line 3: missing label field"):
        load_examples(path)


def test_label_set_sorted_unique():
    examples = [Example("a", "b"), Example("b", "a"), Example("c", "b")]
    assert label_set(examples) == ["a", "b"]


def _pool() -> list[Example]:
    return [Example(f"{label} {i}", label) for label in ("z", "a", "m") for i in range(10)]


def test_sample_shots_counts_order_and_determinism():
    pool = _pool()
    first = sample_shots(pool, shots=3, seed=7)
    assert first == sample_shots(pool, shots=3, seed=7)
    assert [ex.label for ex in first] == ["a"] * 3 + ["m"] * 3 + ["z"] * 3
    assert len(set(first)) == 9
    assert sample_shots(pool, shots=3, seed=8) != first
    ordered = sample_shots(pool, shots=2, seed=7, labels=["z", "a", "m"])
    assert [ex.label for ex in ordered] == ["z", "z", "a", "a", "m", "m"]


def test_sample_shots_independent_of_hash_seed():
    code = (
        "from gradfix.data import Example, sample_shots\n"
        "pool = [Example(f'{l} {i}', l) for l in ('z', 'a', 'm', 'q') for i in range(9)]\n"
        "print([e.text for e in sample_shots(pool, 4, seed=3)])\n"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_sample_shots_errors():
    pool = _pool()[:12]  # z: 10, a: 2
    with pytest.raises(DataError, match=r"'a' has 2"):
        sample_shots(pool, shots=3, seed=0)
    with pytest.raises(DataError, match="positive integer"):
        sample_shots(pool, shots=0, seed=0)
    with pytest.raises(DataError, match=r"example 1: label 'z'"):
        sample_shots(pool, shots=1, seed=0, labels=["a"])
    with pytest.raises(DataError, match=r"'q' has 0"):
        sample_shots(pool, shots=1, seed=0, labels=["a", "z", "q"])


def test_batched():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 2)) == []
    with pytest.raises(ConfigError):
        list(batched([1], 0))


def test_examples_remember_their_line(tmp_path):
    jsonl = _write(tmp_path / "d.jsonl", '\n{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    assert [ex.line for ex in load_examples(jsonl)] == [2, 4]
    csv_path = _write(tmp_path / "d.csv", 'text,label\n"two\nlines",a\nok,b\n')
    assert [ex.line for ex in load_examples(csv_path)] == [3, 4]
    assert Example("a", "x", line=3) == Example("a", "x")  # the line is provenance, not identity


def test_parse_shots_accepts_positive_integers_and_all():
    from gradfix.data import parse_shots

    assert parse_shots(3) == 3 and parse_shots("4") == 4 and parse_shots(" ALL ") == "all"
    for bad in (0, -1, "0", "two", True, 1.5, None):
        with pytest.raises(ConfigError, match="positive integer or 'all'"):
            parse_shots(bad)


def test_all_shots_keep_file_order_and_errors_name_the_file(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(5)),
    )
    examples = load_examples(path)
    assert sample_shots(examples, "all", seed=0) == examples
    with pytest.raises(DataError, match=rf"{path}: 3 shot\(s\) per class requested but 'b' has 2"):
        sample_shots(examples, 3, seed=0, source=path)
    with pytest.raises(DataError, match=rf"{path}, line 2: label 'b' .* not in the labels \['a'\]"):
        sample_shots(examples, 1, seed=0, labels=["a"], source=path)


def test_unknown_labels_name_the_first_row_and_count_all(tmp_path):
    from gradfix.data import check_known_labels

    path = _write(tmp_path / "d.csv", "text,label\nhi,a\nyo,c\nhey,d\nho,c\n")
    examples = load_examples(path)
    check_known_labels(examples, ["a", "c", "d"], path)
    with pytest.raises(DataError) as info:
        check_known_labels(examples, ["a"], path, "the head of B")
    message = str(info.value)
    assert message.startswith(f"{path}, line 3: label 'c' (text 'yo') is not in the head of B ['a']")
    assert "'c' (2 rows), 'd' (1 row)" in message

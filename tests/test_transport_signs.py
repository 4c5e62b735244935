"""`gradfix transport --signs`: the mask's signs from B's own few-shot fine-tune (gradfix.jobs.signs).

Tiny BERTs: ``A``, its fine-tune ``A-ft`` and ``B`` (``A`` plus small noise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from check_models import finetune
from cli_checks import one_error_line, transport_args
from tiny_models import make_tiny_bert, perturbed_copy, topic_examples, write_jsonl

from gradfix.cli.main import main
from gradfix.io import load_state_dict
from gradfix.jobs.signs import uses_finetune
from gradfix.settings import VoteSettings


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signs")
    a = make_tiny_bert(root / "A", seed=0)
    return {
        "A": a,
        "A-ft": finetune(a, root / "A-ft"),
        "B": perturbed_copy(a, root / "B", 0.002, seed=5),
        "few": write_jsonl(root / "few.jsonl", topic_examples(4, seed=0)),
    }


def _transport(m: dict[str, Path], out: Path, *extra: str) -> dict[str, Any]:
    assert main(transport_args(m, out, "--json", *extra, options=["--shots", "2"])) == 0
    return json.loads((out / "gradfix.json").read_text())


def test_finetune_signs_make_the_mask_and_leave_no_descent_report(
    models: dict[str, Path], tmp_path: Path
) -> None:
    fixed = ("--thresholds", "0", "--alpha", "1")  # one candidate: the agreement mask at α = 1
    record = _transport(models, tmp_path / "ft", "--signs", "finetune", *fixed)
    assert record["signs"]["from"] == "finetune" and "--signs finetune" in record["signs"]["why"]
    assert record["descent"] is None and (record["threshold"], record["alpha"]) == (0.0, 1.0)
    votes = _transport(models, tmp_path / "votes", "--signs", "votes", *fixed)
    assert "signs" not in votes and votes["descent"] is not None
    assert record["kept_fraction"] != votes["kept_fraction"]  # other signs, another mask
    a, a_ft, b = (load_state_dict(models[k]) for k in ("A", "A-ft", "B"))
    ours = load_state_dict(tmp_path / "ft")
    for name, written in ours.items():  # every coordinate is B's own or B's plus τ_A's
        tau, step = a_ft[name] - a[name], written - b[name]
        assert bool(((step == 0) | torch.isclose(step, tau, atol=1e-6)).all()), name


def test_finetune_signs_need_a_choice_and_shots(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = transport_args(
        models, tmp_path / "out", "--signs", "finetune", "--method", "gradfix", "--alpha", "1"
    )
    line = one_error_line(argv, capsys)
    assert "--signs finetune" in line and "--method adaptive" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("signs", "verdict", "expected"),
    [
        ("auto", "weak", True),
        ("auto", "transfers", False),
        ("auto", None, False),
        ("finetune", "transfers", True),
        ("votes", "weak", False),
    ],
)
def test_auto_follows_the_weak_verdict(signs: str, verdict: str | None, expected: bool) -> None:
    record = {"check": {"verdict": verdict}} if verdict else {}
    assert uses_finetune(VoteSettings(signs=signs), record) is expected  # type: ignore[arg-type]


def test_the_weak_warning_says_where_the_signs_came_from() -> None:
    from gradfix.jobs.check_votes import warning_line

    agreement = {"estimate": 0.503, "null": {"low": 0.499, "high": 0.501}}
    check = {"verdict": "weak", "recommended_method": "adaptive", "sign_agreement": agreement}
    plain = warning_line(check)
    assert plain is not None and "fine-tune" not in plain
    said = warning_line({**check, "signs_from": "finetune"})
    assert said is not None and said.startswith(plain) and "short fine-tune of B on the shots" in said

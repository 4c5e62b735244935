"""The sign estimators beyond the majority vote (experiments/estimators.py), on a tiny linear task."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from envs import TaskEnv
from estimators import (
    ESTIMATORS,
    estimator_updates,
    self_labelled_votes,
    unlabelled_pool,
    weighted_signs,
    wrong_probability,
)

from gradfix import TaskVector, mask_task_vector
from gradfix.data import Example

LABELS = ["a", "b", "c"]


class LinearEnv(TaskEnv):
    """Three classes, a linear model over 6 features; each example's text is its row index."""

    def __init__(self, n: int = 30, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.scenario, self.task, self.labels = "tiny", "t", list(LABELS)
        self.features_ = torch.randn(n, 6, generator=g)
        self.train = [Example(str(i), LABELS[i % 3]) for i in range(n)]
        self.train_labels = [ex.label for ex in self.train]
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        torch.manual_seed(seed)
        self.tau_a = TaskVector({n: torch.randn_like(p) * 0.1 for n, p in self.model.named_parameters()})
        self.tau_b = TaskVector({n: torch.randn_like(p) * 0.1 for n, p in self.model.named_parameters()})
        self.theta = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def collate(self, indices: Any) -> dict[str, Tensor]:
        rows = [int(self.train[i].text) for i in indices]
        labels = torch.tensor([LABELS.index(self.train[i].label) for i in indices])
        return {"inputs": self.features_[rows], "labels": labels}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(model(batch["inputs"]), batch["labels"], reduction="none")

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["inputs"])


def test_equal_weights_give_the_majority_vote() -> None:
    env = LinearEnv()
    shots = env.shots(3, seed=0)
    majority = env.votes(shots).sign()
    weighted = weighted_signs(env, shots, [1.0] * len(shots))
    for name, signs in majority.items():
        assert torch.equal(weighted[name], signs), name


def test_a_zero_weight_takes_an_example_out_of_the_vote() -> None:
    env = LinearEnv()
    shots = env.shots(2, seed=1)
    weights = [1.0] * len(shots)
    weights[0] = 0.0
    without = env.votes(shots[1:]).sign()
    weighted = weighted_signs(env, shots, weights)
    assert all(torch.equal(weighted[n], s) for n, s in without.items())


def test_wrong_probability_is_one_minus_the_probability_of_the_label() -> None:
    env = LinearEnv()
    shots = env.shots(2, seed=0)
    wrong = wrong_probability(env, shots)
    batch = env.collate(shots)
    probs = torch.softmax(env.model(batch["inputs"]).double(), dim=-1)
    expected = 1 - probs[torch.arange(len(shots)), batch["labels"]]
    assert torch.allclose(torch.tensor(wrong, dtype=torch.float64), expected)


def test_unlabelled_pool_is_disjoint_from_the_shots_and_balanced() -> None:
    env = LinearEnv()
    shots = env.shots(2, seed=0)
    pool = unlabelled_pool(env, shots, per_class=3, seed=0)
    assert not set(pool) & set(shots) and len(pool) == 9
    assert sorted(env.train_labels[i] for i in pool) == sorted(LABELS * 3)


def test_self_labelled_votes_restore_the_true_labels() -> None:
    env = LinearEnv()
    shots = env.shots(1, seed=0)
    pool = unlabelled_pool(env, shots, per_class=4, seed=0)
    before = list(env.train)
    gradfix = mask_task_vector(env.tau_a, env.votes(shots), "agreement")
    votes = self_labelled_votes(env, shots, gradfix, pool)
    assert env.train == before
    assert votes.num_samples == len(shots) + len(pool)


def test_every_estimator_gives_an_update_of_tau_a_shape() -> None:
    env = LinearEnv()
    shots = env.shots(2, seed=0)
    updates = estimator_updates(env, shots, env.votes(shots), seed=0, per_class=2)
    assert list(updates) == list(ESTIMATORS)
    for update in updates.values():
        assert {n: t.shape for n, t in update.items()} == {n: t.shape for n, t in env.tau_a.items()}
        # every kept coordinate is τ_A's own value, possibly scaled (confidence weights in [0, 1])
        for name, value in update.items():
            kept = value != 0
            assert bool((torch.sign(value[kept]) == torch.sign(env.tau_a[name][kept])).all())


REFERENCES = [
    {"task": "t", "method": "zero-shot B", "test": 0.2},
    {"task": "t", "method": "fine-tuned B", "test": 0.8},
    {"task": "t", "method": "naive", "test": 0.3},
    {"task": "t", "method": "oracle mask", "test": 0.7},
]
"""Zero-shot B, fine-tuned B, naive and the oracle of the page tests (margin 0.3 → 0.7)."""


def test_the_page_reads_each_estimator_against_the_naive_to_oracle_margin(tmp_path: Path) -> None:
    from estimator_table import margin_share

    assert margin_share(0.5, 0.3, 0.7) == pytest.approx(0.5) and margin_share(0.5, 0.3, 0.3) is None
    rows = [
        *REFERENCES,
        {"task": "t", "method": "GradFix", "k": 1, "seed": 0, "test": 0.25},
        {"task": "t", "method": "GradFix", "k": 1, "seed": 1, "test": 0.35},
        {"task": "t", "method": "estimator: mean gradient", "k": 1, "seed": 0, "test": 0.5},
    ]
    result = {
        "scenario": "s",
        "tasks": ["t"],
        "ks": [1],
        "seeds": [0, 1],
        "drift": 0.1,
        "rows": rows,
        "command": "python experiments/estimators.py --scenario s",
    }
    page = _page(tmp_path, result, floors_test=0.4)
    # GradFix: mean 0.30 = naive → 0 % of the margin; mean gradient 0.5 → 50 %; default 0.4 → 25 %
    assert "| GradFix | 1 | 30.0 | 17 % | 0 % |" in page
    assert "| mean gradient | 1 | 50.0 | 50 % | 50 % |" in page
    assert "| adaptive (shots, no-harm) | 1 | 40.0 | 33 % | 25 % |" in page


def test_votes_at_the_transported_point_are_taken_there_and_leave_b_unchanged() -> None:
    from estimators import votes_at

    env = LinearEnv()
    shots = env.shots(2, seed=0)
    big = TaskVector({n: t * 30 for n, t in env.tau_a.items()})
    at_b, moved = env.votes(shots).sign(), votes_at(env, shots, big).sign()
    assert any(not torch.equal(moved[n], s) for n, s in at_b.items())  # another point, other signs
    assert all(torch.equal(p.detach(), env.theta[n]) for n, p in env.model.named_parameters())
    env.set_weights(big, 1.0)
    by_hand = estimate_at_current(env, shots)
    env.set_weights(None)
    assert all(torch.equal(moved[n], s) for n, s in by_hand.items())


def estimate_at_current(env: LinearEnv, shots: list[int]) -> dict[str, Tensor]:
    """The majority vote at the model's current weights (no reset to θ_B)."""
    from gradfix.votes import estimate_signs

    for _, param in env.model.named_parameters():
        param.requires_grad_(True)
    return estimate_signs(env.model, [env.collate(shots)], env.loss, "majority", progress=False).sign()


def test_the_default_measured_in_the_run_is_preferred_and_extra_ks_are_listed(tmp_path: Path) -> None:
    rows = [
        *REFERENCES,
        {"task": "t", "method": "GradFix", "k": 1, "seed": 0, "test": 0.3},
        {"task": "t", "method": "adaptive (shots, no-harm)", "k": 1, "seed": 0, "test": 0.5},
        {
            "task": "t",
            "method": "estimator: majority vote, many labelled shots",
            "k": 100,
            "seed": 0,
            "test": 0.2,
        },
    ]
    result = {
        "scenario": "s", "tasks": ["t"], "ks": [1], "extra_ks": [100], "seeds": [0], "drift": 0.1,
        "rows": rows, "command": "python experiments/estimators.py --scenario s",
    }  # fmt: skip
    page = _page(tmp_path, result, floors_test=0.9)
    assert "| adaptive (shots, no-harm) | 1 | 50.0 | 50 % | 50 % |" in page  # this run's, not the floors'
    assert "| majority vote, many labelled shots | 100 | 20.0 | 0 % | -25 % |" in page
    assert "would mix two grids" not in page


def _page(tmp_path: Path, result: dict[str, Any], floors_test: float) -> str:
    """The estimators section of ``result`` beside a floors run whose default scored ``floors_test``."""
    import json

    from estimator_table import estimators_section

    row = {"task": "t", "method": "adaptive (shots, no-harm)", "k": 1, "seed": 0, "test": floors_test}
    floors = {"scenario": "s", "tasks": ["t"], "rows": [row]}
    (tmp_path / "estimators-s.json").write_text(json.dumps(result), encoding="utf-8")
    (tmp_path / "floors-s-t.json").write_text(json.dumps(floors), encoding="utf-8")
    return estimators_section(tmp_path)


def test_a_run_on_another_build_than_table_1_says_so(tmp_path: Path) -> None:
    import json

    result = {
        "scenario": "s", "tasks": ["t"], "ks": [1], "seeds": [0], "drift": 0.1219,
        "rows": [*REFERENCES, {"task": "t", "method": "GradFix", "k": 1, "seed": 0, "test": 0.3}],
        "command": "python experiments/estimators.py --scenario s",
    }  # fmt: skip
    table1 = {"scenario": "s", "tasks": ["t"], "drift": 0.1226, "rows": []}
    (tmp_path / "table1-s.json").write_text(json.dumps(table1), encoding="utf-8")
    page = _page(tmp_path, result, floors_test=0.4)
    assert "another build of the scenario than its Table 1 run (drift 12.19 % here, 12.26 % there)" in page
    (tmp_path / "table1-s.json").write_text(json.dumps({**table1, "drift": 0.1219}), encoding="utf-8")
    assert "another build" not in _page(tmp_path, result, floors_test=0.4)

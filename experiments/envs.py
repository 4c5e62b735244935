"""Task environments of the experiments: one target model, its task data, τ_A and τ_B.

An environment holds the target ``B`` in memory with its own frozen head (text: class-name prompt
embeddings; vision: class prototypes) and swaps ``θ_B + α · update`` into it to measure accuracy.
Training examples are addressed by index into the training pool, so shot draws, subset
selection, votes and few-shot fine-tuning all speak of the same examples.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradfix import SignVotes, TaskVector, estimate_signs
from gradfix.data import batched, load_examples
from gradfix.methods.autotune import (
    DEFAULT_ALPHAS,
    DEFAULT_THRESHOLDS,
    Choice,
    FoldScores,
    best_candidate,
    score_on_shots,
)
from gradfix.recipes import load_recipe
from gradfix.votes import finetune_signs
from gradfix.zoo import vision as zv

ALPHAS = DEFAULT_ALPHAS
"""The α grid of every sweep: the CLI's default (0 is the target unchanged, small steps 0.02 … 0.2,
then 0.5 … 2 as in the reference code's sweep). Raw files made before it used 0, 0.25, 0.5, 1, 1.5,
2, and those made before the grid grew (:data:`gradfix.methods.candidates.GROWN_ALPHAS`, tried
when 2 wins) stop at 2 (their rows' ``validation_by_alpha`` keys say which)."""
GATE_GRID = DEFAULT_THRESHOLDS
"""Gate thresholds of the adaptive choice: GradFix (0), two gates, naive addition."""
TEXT_VALIDATION_CAP = 250
"""Validation examples per text task used to choose α (the first of a fixed shuffle)."""


def best_on_validation(
    validation: Callable[[float, float], float],
    thresholds: Sequence[float],
    alphas: Sequence[float] = ALPHAS,
) -> tuple[float, float]:
    """The candidate ``(t, α)`` of the best ``validation(t, α)`` as the library's
    ``choose_on_validation`` picks it (:func:`gradfix.methods.candidates.best_candidate`: the earlier
    on a tie; a threshold whose own best α, or the overall best, is the grid's largest also tries the
    larger steps)."""
    return best_candidate(validation, thresholds, alphas)


def draw_per_class(labels: Sequence[Any], k: int, seed: int) -> list[int]:
    """``k`` indices per class (fewer if the class is smaller), from ``random.Random(seed)``."""
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(set(labels), key=str):
        members = [i for i, y in enumerate(labels) if y == label]
        chosen.extend(sorted(rng.sample(members, min(k, len(members)))))
    return chosen


class TaskEnv:
    """What every environment offers; subclasses fill the model, data and batches."""

    scenario: str
    task: str
    labels: list[str]
    model: nn.Module
    train_labels: list[Any]
    tau_a: TaskVector
    tau_b: TaskVector
    theta: dict[str, Tensor]
    splits: dict[str, list[Any]]

    def collate(self, indices: Sequence[int]) -> Any:
        """A batch of training examples by index."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-sample losses ``[B]`` through the target's frozen head."""
        raise NotImplementedError

    def logits(self, batch: Any) -> Tensor:
        """Class logits of the model as it is now."""
        raise NotImplementedError

    def features(self, indices: Sequence[int]) -> Tensor:
        """Embeddings of training examples by the target ``θ_B`` (for subset selection)."""
        raise NotImplementedError

    def correct(self, model: nn.Module, batch: Any) -> Tensor:
        """1/0 per sample: is the model's prediction right (the model as it is now)."""
        return (self.logits(batch).argmax(dim=-1) == batch["labels"]).double()

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters a task vector covers (they vote and are fine-tuned)."""
        return {n: p for n, p in self.model.named_parameters() if n in self.tau_a}

    # -- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_weights(self, update: Mapping[str, Tensor] | None, alpha: float = 1.0) -> None:
        """Load ``θ_B + α · update`` into the model (``None``: ``θ_B``)."""
        for name, param in self.trainable().items():
            value = self.theta[name]
            if update is not None and name in update:
                value = value + alpha * update[name].to(value.dtype)
            param.copy_(value)

    @contextmanager
    def weights(self, update: Mapping[str, Tensor] | None, alpha: float = 1.0) -> Iterator[None]:
        """``θ_B + α · update`` for the duration of the block, ``θ_B`` afterwards."""
        self.set_weights(update, alpha)
        try:
            yield
        finally:
            self.set_weights(None)

    # -- measurements -------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, update: Mapping[str, Tensor] | None, alpha: float, split: str) -> float:
        """Accuracy of ``θ_B + α · update`` on ``split`` (``validation`` or ``test``).

        ``θ_B`` itself (``update`` None or ``α = 0``) is measured once per split and remembered.
        """
        base = update is None or alpha == 0
        cache = self.__dict__.setdefault("_base_accuracy", {})
        if base and split in cache:
            return cache[split]
        self.model.eval()
        correct = total = 0
        with self.weights(update, alpha):
            for batch in self.splits[split]:
                correct += int((self.logits(batch).argmax(dim=-1) == batch["labels"]).sum())
                total += len(batch["labels"])
        if base:
            cache[split] = correct / total
        return correct / total

    def sweep(self, update: Mapping[str, Tensor], alphas: Sequence[float] = ALPHAS) -> dict[str, Any]:
        """α chosen on validation (smallest on ties), then test accuracy at that α. When the
        grid's largest α wins, the larger steps are tried too (:func:`best_on_validation`)."""
        start = time.perf_counter()
        val: dict[float, float] = {}

        def validation(t: float, a: float) -> float:
            if a not in val:
                val[a] = self.accuracy(update, a, "validation")
            return val[a]

        _, alpha = best_on_validation(validation, [0.0], alphas)
        return {
            "alpha": alpha,
            "validation": val[alpha],
            "test": self.accuracy(update, alpha, "test"),
            "validation_by_alpha": {f"{a:g}": v for a, v in val.items()},
            "seconds": round(time.perf_counter() - start, 2),
        }

    def shots(self, k: int, seed: int) -> list[int]:
        """``k`` training examples per class drawn with ``seed``."""
        return draw_per_class(self.train_labels, k, seed)

    def voting(self) -> None:
        """Only the parameters τ_A covers take gradients (they vote, or move in a fine-tune)."""
        params = self.trainable()
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in params)

    def votes(self, indices: Sequence[int], estimator: str = "majority") -> SignVotes:
        """The target's sign votes on the given training examples (one batch)."""
        self.set_weights(None)
        self.voting()
        return estimate_signs(self.model, [self.collate(indices)], self.loss, estimator, progress=False)

    def finetune_votes(self, indices: Sequence[int], seed: int = 0, runs: int = 1) -> SignVotes:
        """Signs of B's own few-shot fine-tune on the examples (:func:`gradfix.votes.finetune_signs`;
        ``runs`` fine-tunes summed)."""
        self.set_weights(None)
        self.voting()
        return finetune_signs(self.model, [self.collate(indices)], self.loss, seed=seed, runs=runs)

    def score_on_shots(self, shots: Sequence[int], seed: int, **options: Any) -> FoldScores:
        """:func:`gradfix.methods.autotune.score_on_shots` on ``θ_B`` with these shots (2 folds, the α
        grid :data:`ALPHAS`, gate thresholds :data:`GATE_GRID`); ``options`` (``correct``) go to it."""
        self.set_weights(None)
        labels = [self.train_labels[i] for i in shots]
        return score_on_shots(
            self.model,
            self.tau_a,
            shots,
            labels,
            self.collate,
            self.loss,
            thresholds=GATE_GRID,
            alphas=ALPHAS,
            folds=2,
            seed=seed,
            **options,
        )

    def choose_on_shots(self, shots: Sequence[int], seed: int, rule: str, **options: Any) -> Choice:
        """:meth:`score_on_shots`, then ``rule`` (``no-harm``, ``one-se`` or ``min``)."""
        return self.score_on_shots(shots, seed, **options).choose(rule)

    def finetune(
        self, indices: Sequence[int], steps: Sequence[int], lr: float, seed: int = 0
    ) -> Iterator[tuple[int, TaskVector]]:
        """Few-shot fine-tuning of ``θ_B`` on the examples (full batch, AdamW, constant ``lr``).

        Yields ``(step, τ)`` at each of the given step counts, ``τ = θ_step − θ_B``; the model
        holds ``θ_B`` again at the end.
        """
        self.set_weights(None)
        params = self.trainable()
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
        batch = self.collate(indices)
        done = 0
        try:
            for target in sorted(steps):
                self.model.train()
                for _ in range(target - done):
                    optimizer.zero_grad(set_to_none=True)
                    self.loss(self.model, batch).mean().backward()
                    optimizer.step()
                done = target
                self.model.eval()
                yield target, TaskVector({n: p.detach() - self.theta[n] for n, p in params.items()})
        finally:
            self.model.eval()
            self.set_weights(None)


class TextEnv(TaskEnv):
    """A text scenario's task: ``target`` (``B``, or ``A`` for the no-drift level) with its head."""

    def __init__(self, view: Path, task: str, target: str = "B", scenario: str | None = None):
        self.scenario = scenario or view.name
        self.task = task
        folder = view / "data" / task
        info = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        self.labels = list(info["labels"])
        self.model, self.recipe = load_recipe(
            "text-zero-shot",
            view / target,
            self.labels,
            template=info["template"],
            max_length=info["max_length"],
        )
        self.model.eval()
        self.train = load_examples(folder / "train.jsonl")
        self.train_labels = [ex.label for ex in self.train]
        validation = load_examples(folder / "validation.jsonl")
        random.Random(0).shuffle(validation)
        validation = validation[:TEXT_VALIDATION_CAP]
        test = load_examples(folder / "test.jsonl")
        self.splits = {
            "validation": self._batches(validation),
            "test": self._batches(test),
        }
        self.sizes = {"validation": len(validation), "test": len(test), "train": len(self.train)}
        self.tau_a = TaskVector.from_checkpoints(view / "A", view / f"A-ft/{task}", include="encoder.*")
        self.tau_b = TaskVector.from_checkpoints(
            view / target, view / f"{target}-ft/{task}", include="encoder.*"
        )
        self.theta = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.tau_a}

    def _batches(self, examples: Sequence[Any]) -> list[Any]:
        ordered = sorted(examples, key=lambda ex: len(ex.text))
        return [self.recipe.collate(chunk) for chunk in batched(ordered, 128)]

    def collate(self, indices: Sequence[int]) -> Any:
        return self.recipe.collate([self.train[i] for i in indices])

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.recipe.loss(model, batch)

    def logits(self, batch: Any) -> Tensor:
        return self.recipe.logits(self.model, batch)

    @torch.no_grad()
    def features(self, indices: Sequence[int]) -> Tensor:
        self.set_weights(None)
        return self.recipe.embed(self.model, [self.train[i].text for i in indices], batch_size=128)


class VisionEnv(TaskEnv):
    """A vision scenario's task: the target CNN with its own class-prototype head."""

    def __init__(self, view: Path, task: str, target: str = "B", scenario: str | None = None):
        self.scenario = scenario or view.name
        self.task = task
        data = view / "data"
        self.model = zv.load_backbone(view / target).eval()
        self.head, self.labels = zv.task_head(self.model, data, task)
        self._loss = zv.head_loss(self.head)
        self.images, labels = zv.load_split(data / task, "train")
        self.targets = labels
        self.train_labels = labels.tolist()
        self.splits = {s: self._batches(*zv.load_split(data / task, s)) for s in ("validation", "test")}
        self.sizes = {
            "train": len(labels),
            **{s: sum(len(b["labels"]) for b in self.splits[s]) for s in self.splits},
        }
        self.tau_a = TaskVector.from_checkpoints(view / "A", view / f"A-ft/{task}")
        self.tau_b = TaskVector.from_checkpoints(view / target, view / f"{target}-ft/{task}")
        self.theta = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.tau_a}

    @staticmethod
    def _batches(images: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
        return [
            {"inputs": zv.as_float(images[s : s + 512]), "labels": labels[s : s + 512]}
            for s in range(0, len(labels), 512)
        ]

    def collate(self, indices: Sequence[int]) -> Any:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"inputs": zv.as_float(self.images[idx]), "labels": self.targets[idx]}

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self._loss(model, batch)

    def logits(self, batch: Any) -> Tensor:
        return zv.head_logits(self.model, batch["inputs"], self.head)

    @torch.no_grad()
    def features(self, indices: Sequence[int]) -> Tensor:
        self.set_weights(None)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.model(zv.as_float(self.images[idx]))


def make_env(view: Path, task: str, family: str, target: str = "B", scenario: str | None = None) -> TaskEnv:
    """The environment of ``task`` in a scenario folder (``family``: ``text`` or ``vision``)."""
    cls = TextEnv if family == "text" else VisionEnv
    return cls(view, task, target, scenario)


def relative_drift(view: Path, include: str | None) -> float:
    """``‖θ_B − θ_A‖ / ‖θ_A‖`` over the tensors a task vector covers (the drift of the release)."""
    from gradfix.io import load_state_dict

    base_a, base_b = load_state_dict(view / "A"), load_state_dict(view / "B")
    drift = TaskVector.from_state_dicts(base_a, base_b, include=include)
    return _norm(drift) / _norm({n: base_a[n] for n in drift})


def _norm(tv: Mapping[str, Tensor]) -> float:
    return float(sum(float(t.double().pow(2).sum()) for t in tv.values()) ** 0.5)

"""A far release of all-MiniLM-L6-v2: continued pre-training with another objective (masked LM).

all-MiniLM-L6-v2 ships without a masked-LM head. :class:`MaskedLMHead` creates one as BERT's
(dense → GELU → LayerNorm, then the scores against the frozen word embeddings plus a bias), and
:func:`continue_pretraining_mlm` trains the encoder through it on unlabelled text: the further B
moves from A's contrastive optimum, the less of A's fine-tune lines up with B.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradfix.errors import ConfigError
from gradfix.recipes._hf import tokenize
from gradfix.zoo.text import load_encoder, relative_change, release_parameters, save_encoder
from gradfix.zoo.training import TrainSettings, seeded_batches, train

MASK_FRACTION = 0.15
"""Share of the (non-special) tokens each step predicts, as in BERT."""
IGNORE = -100
"""Label of the positions that are not predicted (cross-entropy's ``ignore_index``)."""


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head over a frozen embedding matrix: ``LN(gelu(W h + b)) Eᵀ + c``."""

    def __init__(self, embeddings: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        width = embeddings.embedding_dim
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.embeddings = embeddings
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, hidden: Tensor) -> Tensor:
        """Vocabulary scores ``[..., V]`` of the hidden states ``[..., H]``."""
        return self.norm(F.gelu(self.dense(hidden))) @ self.embeddings.weight.T + self.bias


def mask_tokens(
    input_ids: Tensor,
    special: Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    fraction: float = MASK_FRACTION,
) -> tuple[Tensor, Tensor]:
    """BERT's corruption: ``(inputs, labels)`` with ``fraction`` of the non-special tokens to predict.

    Of the chosen positions 80 % become ``mask_id``, 10 % a random token, 10 % stay; labels are
    the original ids there and :data:`IGNORE` elsewhere. ``special`` is a bool tensor like
    ``input_ids`` (padding, ``[CLS]``, ``[SEP]``), never chosen.
    """
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = (draw < fraction) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    how = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (how < 0.8)] = mask_id
    swap = chosen & (how >= 0.8) & (how < 0.9)
    inputs[swap] = torch.randint(vocab_size, input_ids.shape, generator=generator)[swap]
    return inputs, labels


def continue_pretraining_mlm(
    base: str | Path,
    out: Path,
    texts: Sequence[str],
    settings: TrainSettings,
    max_length: int = 48,
    progress: bool = True,
    desc: str = "pre-training (masked LM)",
) -> dict[str, Any]:
    """Masked-LM continued pre-training from ``base`` on ``texts``; writes the encoder into ``out``.

    Each step draws ``settings.batch_size`` texts (seeded), corrupts them with :func:`mask_tokens`
    and minimises the cross-entropy of the original tokens at the chosen positions through a new
    :class:`MaskedLMHead` (trained alongside, not saved). Word embeddings and the pooler are frozen
    (the head scores against the word embeddings). Returns the training record with the relative
    change ``‖θ_new − θ‖ / ‖θ‖`` of the trained encoder parameters.
    """
    model, tokenizer = load_encoder(base)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = release_parameters(model)
    embeddings = getattr(model, "get_input_embeddings")()  # noqa: B009 (a method mypy cannot see on nn.Module)
    if not isinstance(embeddings, nn.Embedding):
        raise ConfigError(
            f"{base}: the masked-LM head needs word embeddings (nn.Embedding), "
            f"got {type(embeddings).__name__}"
        )
    torch.manual_seed(settings.seed)
    head = MaskedLMHead(embeddings, eps=float(getattr(model.config, "layer_norm_eps", 1e-12)))
    head.train()
    head_params = [p for n, p in head.named_parameters() if not n.startswith("embeddings.")]
    batches = seeded_batches(list(texts), settings.batch_size, settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def step_loss(step: int) -> Tensor:
        batch = tokenize(tokenizer, next(batches), max_length)
        ids = batch["input_ids"]
        special = torch.isin(ids, special_ids) | (batch["attention_mask"] == 0)
        inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), generator)
        hidden = model(**{**batch, "input_ids": inputs}).last_hidden_state
        chosen = labels != IGNORE  # the head scores only the predicted positions (~15 %: its cost)
        if not bool(chosen.any()):  # nothing drawn in this batch: a zero loss, no step direction
            return hidden.sum() * 0.0
        return F.cross_entropy(head(hidden[chosen]), labels[chosen])

    record = train(model, params + head_params, step_loss, settings, desc=desc, progress=progress)
    record["relative_change"] = relative_change(model, reference)
    save_encoder(model, base, out)
    return record

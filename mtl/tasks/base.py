"""The task-kind protocol: each kind owns its head, label encoding, loss, decoding and metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100  # label of positions the loss and metrics skip (specials, padding, later subwords)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask: [B, T, H], [B, T] -> [B, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class SentenceHead(nn.Module):
    """Pool the token states (mean or [CLS]), dropout, linear: [B, T, H] -> [B, n]."""

    def __init__(self, hidden: int, n_out: int, dropout: float, pooling: str = "mean"):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(hidden, mask) if self.pooling == "mean" else hidden[:, 0]
        return self.out(self.dropout(pooled))


class TokenHead(nn.Module):
    """Dropout and a linear layer on every token state: [B, T, H] -> [B, T, n]."""

    def __init__(self, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(hidden))


class TaskKind(ABC):
    """One kind of task. Instances are bound to a label list (empty for regression)."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]  # the keys ``metrics()`` returns (what train.objective may name)
    label_dtype: ClassVar[Any] = np.int64

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        # labels met by ``encode_labels`` that are not in ``labels`` (an evaluation split's label
        # the train split never had): skipped (IGNORE_INDEX, or left out of a multi-label row), counted here
        self.unseen: Counter[str] = Counter()

    def label_id(self, name: Any) -> int | None:
        """The index of a label name, or None (counted in ``unseen``) when the list lacks it."""
        i = self.index.get(str(name))
        if i is None:
            self.unseen[str(name)] += 1
        return i

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @abstractmethod
    def build_head(self, hidden: int, dropout: float, pooling: str) -> nn.Module: ...

    @abstractmethod
    def encode_labels(self, raw: list[Any], word_ids: list[list[int | None]], length: int) -> np.ndarray:
        """Training targets for one batch from the raw labels and the tokenizer's word ids."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def gather(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
        """(predictions, references) in label space for metrics, from one evaluated batch."""

    @abstractmethod
    def metrics(self, preds: list, refs: list) -> dict[str, float]: ...

    def report(self, preds: list, refs: list) -> dict[str, Any]:
        """A per-label report (classification kinds); empty by default."""
        return {}

    def confusion(self, preds: list, refs: list) -> np.ndarray | None:
        return None

    @abstractmethod
    def decode(self, logits: torch.Tensor, words: list[str], spans: list[tuple[int, int]],
               word_ids: list[int | None], text: str, top_k: int) -> Any:
        """The serving answer for one text from its logits (one row of the batch)."""

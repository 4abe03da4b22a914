"""Task kinds and their registry. A new kind is one module here plus one entry in KINDS."""

from __future__ import annotations

from mtl.tasks.base import IGNORE_INDEX, TaskKind
from mtl.tasks.multilabel import MultiLabelClassification
from mtl.tasks.regression import Regression
from mtl.tasks.sequence import SequenceClassification
from mtl.tasks.token import TokenClassification

KINDS: dict[str, type[TaskKind]] = {
    cls.name: cls
    for cls in (SequenceClassification, TokenClassification, MultiLabelClassification, Regression)
}


def make_kind(kind: str, labels: list[str]) -> TaskKind:
    try:
        return KINDS[kind](labels)
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(KINDS)}") from None


__all__ = ["IGNORE_INDEX", "KINDS", "TaskKind", "make_kind"]

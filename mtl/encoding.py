"""Tokenization shared by training and serving: texts are split on whitespace into words (with
character spans), the fast tokenizer runs on the words, and labels align to the first subword."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the data workers that only check texts need neither torch nor the kinds
    from mtl.tasks import TaskKind

_WORD = re.compile(r"\S+")
# Unicode categories that carry no visible content: controls (NUL, ...), format characters (BOM,
# zero-width space/joiners, bidi overrides), separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def text_problem(text: str) -> str | None:
    """Why the model cannot take ``text``, or None when it can.

    Refused: text that is not valid Unicode (a lone UTF-16 surrogate, U+D800..U+DFFF, which
    no UTF-8 encoder accepts and which makes the fast tokenizer raise), and text with no visible
    character (empty, or only whitespace, control and format characters such as NUL, BOM,
    zero-width spaces and bidi overrides). Accepted as they are: control and format characters
    beside visible ones (the tokenizer drops them; character spans still index the original
    text), combining marks, emoji, and words longer than any vocabulary entry (one ``[UNK]``).
    The message never quotes the text.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"contains a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}, "
                "which is not valid Unicode; send UTF-8 text")
    if not any(unicodedata.category(ch) not in _INVISIBLE for ch in text):
        return "has no visible character (only whitespace, control or format characters)"
    return None


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Whitespace words and their [start, end) character offsets in ``text``."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def tokenize_words(tokenizer, words: list[list[str]], max_length: int, padding: str | bool = "max_length"):
    """The fast tokenizer on pre-split words; truncation at ``max_length`` tokens."""
    return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                     padding=padding, return_attention_mask=True)


def encode_batch(tokenizer, kind: TaskKind, texts: list[str], raw_labels: list[Any],
                 max_length: int) -> dict[str, np.ndarray]:
    """Token ids, attention mask and aligned labels for one batch, padded to ``max_length``:
    input_ids/attention_mask int64 [B, L]; labels as the kind encodes them."""
    words = [t.split() for t in texts]
    enc = tokenize_words(tokenizer, words, max_length)
    word_ids = [enc.word_ids(i) for i in range(len(texts))]
    return {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
        "labels": kind.encode_labels(raw_labels, word_ids, max_length),
    }


def labels_column(task: str) -> str:
    """The encoded-label column of ``task`` in a shared input's batches (``encode_input_batch``)."""
    return f"labels.{task}"


def encode_input_batch(tokenizer, kinds: dict[str, TaskKind], texts: list[str],
                       raw_labels: dict[str, list[Any]], max_length: int) -> dict[str, np.ndarray]:
    """One tokenization for the tasks of a shared input: input_ids/attention_mask int64 [B, L] and
    one ``labels.<task>`` column per task, each exactly what ``encode_batch`` gives that task."""
    words = [t.split() for t in texts]
    enc = tokenize_words(tokenizer, words, max_length)
    word_ids = [enc.word_ids(i) for i in range(len(texts))]
    out = {"input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
           "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64)}
    for task, kind in kinds.items():
        out[labels_column(task)] = kind.encode_labels(raw_labels[task], word_ids, max_length)
    return out

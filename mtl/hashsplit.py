"""Deterministic splits from a hash of the text (no Ray, no pass over the data).

A row's split depends only on ``seed`` and its normalised text (NFKC, case-folded, whitespace
collapsed), so exact duplicates (and texts that differ only in case, width or spacing) always land
in the same split, no text is in two splits, and the split of a row can be decided where the row
is read, on any worker, at any size. The fractions hold in expectation (within a few rows per
thousand at a thousand rows and more); there is no stratification by label.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

_SCALE = float(1 << 64)


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def split_point(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``seed`` and the normalised text."""
    digest = hashlib.blake2b(f"{seed}\x1f{normalize_text(text)}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def hash_split(text: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """``"test"`` when the text's split point is below ``test_fraction``, ``"validation"`` below
    ``test_fraction + validation_fraction``, else ``"train"`` (a fraction of 0 never chooses it)."""
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"fractions must be >= 0 with a sum below 1, got validation {validation_fraction}, "
                         f"test {test_fraction}")
    u = split_point(text, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def row_id(text: str, label: Any) -> int:
    """A stable non-negative 63-bit id of a row (its text and label): the ``idx`` of rows read
    where they lie, which have no global row number. Equal only for identical rows."""
    key = f"{text}\x1f{json.dumps(label, sort_keys=True, default=str)}"
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1

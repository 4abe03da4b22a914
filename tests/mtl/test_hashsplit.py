"""mtl.hashsplit: a row's split from a seeded hash of its normalised text."""

from __future__ import annotations

from collections import Counter

import pytest

from mtl.hashsplit import hash_split, normalize_text, row_id, split_point

TEXTS = [f"synthetic review {i} of film {i % 97}" for i in range(20_000)]


def test_same_text_and_seed_give_the_same_split_in_any_order():
    first = [hash_split(t, 13, 0.1, 0.1) for t in TEXTS[:2000]]
    again = [hash_split(t, 13, 0.1, 0.1) for t in reversed(TEXTS[:2000])][::-1]
    assert first == again
    assert split_point("a film", 13) == split_point("a film", 13)
    assert 0 <= split_point("a film", 13) < 1


def test_duplicates_after_normalisation_share_a_split():
    variants = ["A  great\tFilm", "a great film", " A GREAT FILM ", "Ａ great ﬁlm".replace("ﬁ", "fi")]
    assert {normalize_text(v) for v in variants} == {"a great film"}
    for seed in range(50):
        assert len({hash_split(v, seed, 0.2, 0.3) for v in variants}) == 1


def test_fractions_within_two_points_on_20k_texts():
    for seed, val, test in ((13, 0.1, 0.1), (1, 0.2, 0.05), (7, 0.3, 0.25)):
        counts = Counter(hash_split(t, seed, val, test) for t in TEXTS)
        assert abs(counts["validation"] / len(TEXTS) - val) < 0.02, (seed, counts)
        assert abs(counts["test"] / len(TEXTS) - test) < 0.02, (seed, counts)
        assert sum(counts.values()) == len(TEXTS)


def test_seed_changes_the_partition_and_zero_fraction_never_chooses():
    a = [hash_split(t, 1, 0.1, 0.1) for t in TEXTS[:1000]]
    b = [hash_split(t, 2, 0.1, 0.1) for t in TEXTS[:1000]]
    assert a != b
    assert "validation" not in {hash_split(t, 1, 0.0, 0.2) for t in TEXTS[:1000]}
    with pytest.raises(ValueError, match="fractions"):
        hash_split("x", 1, 0.6, 0.5)


def test_row_id_is_stable_nonnegative_and_label_aware():
    assert row_id("a", "pos") == row_id("a", "pos")
    assert row_id("a", "pos") != row_id("a", "neg")
    assert row_id("a", ["B-X"]) != row_id("a", ["O"])
    assert 0 <= row_id("x", 1.5) < 2 ** 63
    assert len({row_id(t, "l") for t in TEXTS}) == len(TEXTS)

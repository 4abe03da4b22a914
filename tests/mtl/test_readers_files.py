"""mtl.readers on user files: CSV, JSONL, Parquet, CoNLL, hf_disk; column mappings, multi-label cells,
explicit split files, the split rules and the errors that name the field."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mtl.config import DataSpec, TaskSpec
from mtl.readers import DataError, dedup, read_conll, read_task, stratified_split

DATA = DataSpec(validation_fraction=0.2, test_fraction=0.2)


def task(kind: str, **source) -> TaskSpec:
    return TaskSpec(name="t", kind=kind, source=source)


def texts(td, split):
    return sorted(r["text"] for r in td.splits[split])


def all_rows(td):
    return sorted((r["text"], json.dumps(r["label"])) for s in td.splits.values() for r in s)


REVIEWS = [(f"review number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(20)]


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"id": range(20), "body": [t for t, _ in REVIEWS], "y": [y for _, y in REVIEWS]}).to_csv(
        path, index=False)
    td = read_task(task("sequence_classification", type="csv", path=str(path),
                        columns={"text": "body", "label": "y"}), DATA, seed=1)
    assert td.labels == ["neg", "pos"]
    assert all_rows(td) == sorted((t, json.dumps(y)) for t, y in REVIEWS)
    # stratified: each label's 10 rows cut 2 / 2 / 6
    for split, n in (("validation", 2), ("test", 2), ("train", 6)):
        assert td.label_counts(split) == {"neg": n, "pos": n}
        assert sorted(r["idx"] for r in td.splits[split]) == list(range(2 * n))
    assert td.stats == {"read": 20, "duplicates_dropped": 0}


def test_jsonl_regression_and_dedup(tmp_path):
    path = tmp_path / "scores.jsonl"
    lines = [{"sentence": f"text {i}", "score": i / 10} for i in range(10)]
    lines += [{"sentence": "text 3", "score": 9.9}, {"sentence": "no score", "score": None}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    td = read_task(task("regression", type="jsonl", path=str(path),
                        columns={"text": "sentence", "label": "score"}), DATA, seed=1)
    assert td.labels == []
    rows = {r["text"]: r["label"] for s in td.splits.values() for r in s}
    assert rows == {f"text {i}": i / 10 for i in range(10)}  # first "text 3" kept, None dropped
    assert all(isinstance(v, float) for v in rows.values())
    assert td.stats == {"read": 11, "duplicates_dropped": 1}
    assert [len(td.splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]


def test_parquet_multi_label_with_separator(tmp_path):
    path = tmp_path / "tags.parquet"
    df = pd.DataFrame({
        "doc": [f"doc {i}" for i in range(10)],
        "tags": ["a;b", "b", "a", "c;a;b", "b", "a;b", "b", "a", "c;a;b", "b"],
    })
    df.to_parquet(path)
    td = read_task(task("multi_label", type="parquet", path=str(path), columns={"text": "doc", "label": "tags"}),
                   DATA, seed=0)
    assert td.labels == ["a", "b", "c"]
    rows = {r["text"]: r["label"] for s in td.splits.values() for r in s}
    assert rows["doc 0"] == ["a", "b"] and rows["doc 3"] == ["c", "a", "b"] and rows["doc 1"] == ["b"]
    assert td.label_counts("train") and sum(len(v) for v in td.splits.values()) == 10


def test_multi_label_custom_separator_in_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,label\nfirst,a|b\nsecond,b\nthird,a\nfourth,a|b\nfifth,b\n")
    td = read_task(task("multi_label", type="csv", train=str(path), validation=str(path), test=str(path),
                        label_separator="|", dedup=False), DATA, seed=0)
    assert [r["label"] for r in td.splits["test"]] == [["a", "b"], ["b"], ["a"], ["a", "b"], ["b"]]


def test_parquet_token_lists(tmp_path):
    path = tmp_path / "ner.parquet"
    pd.DataFrame({"words": [["New", "York", "is", "big"]] * 1 + [["Go", "home"]],
                  "bio": [["B-LOC", "I-LOC", "O", "O"], ["O", "O"]]}).to_parquet(path)
    td = read_task(task("token_classification", type="parquet", train=str(path), validation=str(path),
                        test=str(path), columns={"tokens": "words", "tags": "bio"}), DATA, seed=0)
    assert td.splits["validation"][0]["text"] == "New York is big"
    assert td.splits["validation"][0]["label"] == ["B-LOC", "I-LOC", "O", "O"]
    assert td.labels == ["O", "B-LOC", "I-LOC"]
    assert td.label_counts("test") == {"B-LOC": 1}


CONLL = """-DOCSTART- O

John\tB-PER
Smith\tI-PER
lives\tO
in\tO
Paris\tB-LOC


Acme NNP B-ORG
hired O
Jane\tB-PER
Doe\tI-PER
Doe\tI-PER
at\tO
IBM\tB-ORG
"""


def test_conll_blank_lines_and_extra_columns(tmp_path):
    path = tmp_path / "ner.conll"
    path.write_text(CONLL)  # the last sentence has no trailing blank line
    assert read_conll(str(path)) == [
        {"text": "John Smith lives in Paris", "label": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
        {"text": "Acme hired Jane Doe Doe at IBM", "label": ["B-ORG", "O", "B-PER", "I-PER", "I-PER", "O", "B-ORG"]},
    ]


def test_conll_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("John\tB-PER\nlonely\n")
    with pytest.raises(DataError, match=r"bad\.conll:2: expected 'token<TAB>tag'"):
        read_conll(str(path))


def test_explicit_split_files_are_kept(tmp_path):
    paths = {}
    for split, n in (("train", 8), ("validation", 3), ("test", 4)):
        paths[split] = tmp_path / f"{split}.conll"
        paths[split].write_text("\n\n".join(f"{split}\tO\nword{i}\tB-X" for i in range(n)) + "\n")
    td = read_task(task("token_classification", type="conll", **{k: str(v) for k, v in paths.items()}),
                   DATA, seed=3)
    assert texts(td, "train") == sorted(f"train word{i}" for i in range(8))
    assert texts(td, "validation") == sorted(f"validation word{i}" for i in range(3))
    assert texts(td, "test") == sorted(f"test word{i}" for i in range(4))
    assert td.labels == ["O", "B-X"]
    assert td.label_counts("train") == {"B-X": 8}


def test_train_file_only_is_split(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(20)))
    td = read_task(task("sequence_classification", type="jsonl", train=str(path)), DATA, seed=0)
    assert [len(td.splits[s]) for s in ("train", "validation", "test")] == [12, 4, 4]
    assert sorted(t for s in td.splits for t in texts(td, s)) == sorted(f"t{i}" for i in range(20))


def test_hf_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = {"sentence": [f"s{i}" for i in range(10)], "y": [["x", "y"][i % 2] for i in range(10)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    td = read_task(task("sequence_classification", type="hf_disk", path=str(tmp_path / "one"),
                        columns={"text": "sentence", "label": "y"}), DATA, seed=0)
    assert sorted((r["text"], r["label"]) for s in td.splits.values() for r in s) == sorted(
        zip(rows["sentence"], rows["y"]))
    assert [len(td.splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a b", "c"], "label": ["p", "q"]}),
        "validation": datasets.Dataset.from_dict({"text": ["d"], "label": ["q"]}),
        "test": datasets.Dataset.from_dict({"text": ["e f"], "label": ["p"]}),
    })
    dd.save_to_disk(str(tmp_path / "dict"))
    td = read_task(task("sequence_classification", type="hf_disk", path=str(tmp_path / "dict")), DATA, seed=0)
    assert {s: [(r["text"], r["label"]) for r in td.splits[s]] for s in td.splits} == {
        "train": [("a b", "p"), ("c", "q")], "validation": [("d", "q")], "test": [("e f", "p")]}


def test_wrong_column_names_the_field(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("body,y\nnice,pos\n")
    with pytest.raises(DataError) as err:
        read_task(task("sequence_classification", type="csv", path=str(path), columns={"text": "content"}),
                  DATA, seed=0, where="tasks.0.source")
    assert str(err.value) == f"tasks.0.source.columns.text: column 'content' is not in {path} (it has ['body', 'y'])"


def test_label_errors_name_the_task(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "LOC"]}) + "\n")
    with pytest.raises(DataError, match="tags must be BIO .* found 'LOC'"):
        read_task(task("token_classification", type="jsonl", train=str(path), validation=str(path),
                       test=str(path)), DATA, seed=0)
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(DataError, match="a row has 2 tokens but 1 tags"):
        read_task(task("token_classification", type="jsonl", path=str(path)), DATA, seed=0)


def test_too_few_rows_for_a_split(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("text,label\none,a\ntwo,b\n")
    with pytest.raises(DataError, match="split 'validation' is empty"):
        read_task(task("sequence_classification", type="csv", path=str(path)), DATA, seed=0,
                  where="tasks.2.source")


def test_max_examples_caps_each_split(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(1000)))
    spec = TaskSpec(name="t", kind="sequence_classification", max_examples=100,
                    source={"type": "jsonl", "path": str(path)})
    td = read_task(spec, DATA, seed=0)
    # train capped at 100; validation and test at max(50, 100 // 4) = 50
    assert [len(td.splits[s]) for s in ("train", "validation", "test")] == [100, 50, 50]
    assert [r["idx"] for r in td.splits["test"]] == list(range(50))


# ------------------------------------------------------------------ stratified_split and dedup

def _rows(n_a: int, n_b: int) -> list[dict]:
    return [{"text": f"a{i}", "label": "a"} for i in range(n_a)] + [{"text": f"b{i}", "label": "b"} for i in range(n_b)]


def test_stratified_split_shares_seed_and_partition():
    rows = _rows(300, 100)
    fr = {"validation": 0.1, "test": 0.2}
    one = stratified_split(rows, "sequence_classification", fr, seed=5)
    counts = {s: (sum(r["label"] == "a" for r in v), sum(r["label"] == "b" for r in v)) for s, v in one.items()}
    assert counts == {"validation": (30, 10), "test": (60, 20), "train": (210, 70)}
    assert sorted(r["text"] for v in one.values() for r in v) == sorted(r["text"] for r in rows)
    again = stratified_split(rows, "sequence_classification", fr, seed=5)
    assert {s: [r["text"] for r in v] for s, v in one.items()} == {s: [r["text"] for r in v] for s, v in again.items()}
    other = stratified_split(rows, "sequence_classification", fr, seed=6)
    assert {r["text"] for r in one["test"]} != {r["text"] for r in other["test"]}


def test_dedup_keeps_first():
    rows = [{"text": "x", "label": 1}, {"text": "y", "label": 2}, {"text": "x", "label": 3}]
    assert dedup(rows) == ([{"text": "x", "label": 1}, {"text": "y", "label": 2}], 1)


@pytest.mark.parametrize("bad,needle", [
    ("broken \ud83d half of an emoji", "row 3: the text contains a lone surrogate U+D83D"),
    ("\u200b\u200b", "row 3: the text has no visible character"),
])
def test_a_text_the_model_cannot_take_is_an_error_naming_the_row(tmp_path, bad, needle):
    """JSON escapes can carry a lone surrogate, which would crash tokenization mid-run; a row with
    nothing visible would train on an empty input. Both are refused when the file is read."""
    path = tmp_path / "rows.jsonl"
    lines = [{"text": f"fine text {i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    lines[2]["text"] = bad
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError) as err:
        read_task(task("sequence_classification", type="jsonl", path=str(path)), DATA, seed=1)
    assert needle in str(err.value) and "rows.jsonl" in str(err.value) and "source" in str(err.value)


def test_conll_space_separated_whitespace_separators_and_trailing_tabs(tmp_path):
    """Space-separated ``token tag`` lines, separator lines holding only spaces/tabs, and a trailing
    tab after the tag (which the tab-split reader turned into an empty tag) all parse the same."""
    path = tmp_path / "mixed.conll"
    path.write_text("Paris\tB-LOC\t\nis O\n  \t \nJohn  B-PER \r\nSmith\tI-PER\n\t\nruns\tO\n")
    assert read_conll(str(path)) == [
        {"text": "Paris is", "label": ["B-LOC", "O"]},
        {"text": "John Smith", "label": ["B-PER", "I-PER"]},
        {"text": "runs", "label": ["O"]},
    ]


def test_labels_from_the_config_are_kept_in_order(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": [t for t, _ in REVIEWS], "label": [y for _, y in REVIEWS]}).to_csv(path, index=False)
    td = read_task(task("sequence_classification", type="csv", path=str(path), labels=["pos", "neg", "meh"]),
                   DATA, seed=1)
    assert td.labels == ["pos", "neg", "meh"]
    assert td.unseen("test") == {}
    td.labels = ["pos"]
    assert td.unseen("train") == {"neg": 6}
    assert td.size("train") == 12 and len(list(td.rows("train"))) == 12

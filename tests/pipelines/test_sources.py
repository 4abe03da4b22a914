"""pipelines/sources.py on a real local Ray and a real S3-compatible server (moto, on loopback):
file sources are read where they lie (a glob, a folder, a list, s3://), split by a hash of the
text, labelled by a Ray Data pass, and tokenized with exactly the rows read."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl.config import config_from_dict
from mtl.hashsplit import hash_split, row_id
from mtl.readers import SPLITS, DataError, TaskData
from pipelines.data import COLUMNS, build_datasets, dataset_key, read_tasks, summarize
from pipelines.sources import RayTaskData, plain_row, plan_source

SEED = 5
FRACTIONS = {"validation_fraction": 0.2, "test_fraction": 0.2}
WORDS = ["film", "plot", "cast", "score", "scene", "story", "ending", "actor"]


def review(i: int) -> tuple[str, str]:
    label = ["pos", "neg", "meh"][i % 3]
    return f"review {i} of the {WORDS[i % 8]} was {label} {WORDS[(i * 3) % 8]}", label


def expected_split(text: str) -> str:
    return hash_split(text, SEED, FRACTIONS["validation_fraction"], FRACTIONS["test_fraction"])


def by_split(datasets: dict[str, object]) -> dict[str, list[dict]]:
    """The rows of the three splits' datasets, read in one Ray Data execution (a union)."""
    tagged = [ds.add_column("split", lambda t, s=s: pa.array([s] * t.num_rows), batch_format="pyarrow")
              for s, ds in datasets.items()]
    out: dict[str, list[dict]] = {s: [] for s in datasets}
    for row in tagged[0].union(*tagged[1:]).take_all():
        out[row.pop("split")].append(row)
    return out


def split_texts(td) -> dict[str, list[str]]:
    rows = by_split({s: td.dataset(s) for s in SPLITS})
    return {s: sorted(plain_row(r)["text"] for r in rows[s]) for s in SPLITS}


def config(tasks: list[dict], encoder) -> object:
    return config_from_dict({"seed": SEED, "model": {"encoder": str(encoder), "max_length": 16},
                             "data": {**FRACTIONS, "tokenize_batch_size": 64}, "tasks": tasks})


# ---------------------------------------------------------------- local files


@pytest.fixture(scope="module")
def local(tmp_path_factory, ray_session, tiny_encoder):
    """Five tasks in one config, each a different way of naming files; read once."""
    root = tmp_path_factory.mktemp("sources")
    # a glob over JSONL parts (a hidden part is skipped); 90 rows, capped to 20 train rows
    (root / "jsonl").mkdir()
    for part in range(3):
        lines = [json.dumps({"text": review(i)[0], "label": review(i)[1]}) for i in range(part * 30, part * 30 + 30)]
        (root / "jsonl" / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "jsonl" / ".part-9.jsonl").write_text(json.dumps({"text": "hidden", "label": "pos"}) + "\n")
    # a folder of Parquet parts (a _SUCCESS marker and a README are skipped); 120 rows, 2 duplicates
    (root / "parquet").mkdir()
    for part in range(2):
        rows = [review(i) for i in range(100 + part * 60, 160 + part * 60)]
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows], "extra": [1] * 60}),
                       root / "parquet" / f"part-{part}.parquet")
    pq.write_table(pa.table({"text": [review(100)[0].upper(), review(101)[0]], "label": ["pos", "neg"],
                             "extra": [0, 0]}), root / "parquet" / "part-2.parquet")
    (root / "parquet" / "_SUCCESS").write_text("")
    (root / "parquet" / "README.txt").write_text("not data")
    # a list of two CSV files with mapped columns (and a column the task does not use)
    csvs = []
    for part in range(2):
        path = root / f"reviews-{part}.csv"
        rows = [review(i) for i in range(300 + part * 40, 340 + part * 40)]
        path.write_text("id,body,y\n" + "".join(f"{i},{t},{y}\n" for i, (t, y) in enumerate(rows)))
        csvs.append(str(path))
    # CoNLL split files: space-separated lines, whitespace-only separators, a tab-separated file
    conll = {
        "train": "Paris B-city\nis O\nnice O\n   \nRome B-city\n\t \nNew B-city\nYork I-city\nrocks O\n",
        "validation": "Oslo\tB-city\nsleeps\tO\n\nLima\tB-city\n",
        "test": "-DOCSTART- O\n\nKyiv B-city\nwakes O\n \t\nBern B-new\n",
    }
    for split, text in conll.items():
        (root / f"cities.{split}.conll").write_text(text)
    # multi-label CSV with a configured label list that lacks one evaluation label ("rare")
    multi = root / "multi.csv"
    multi.write_text("text,label\n" + "".join(
        f"item {i} tagged,{'a|b' if i % 2 else 'b'}{'|rare' if i % 7 == 0 else ''}\n" for i in range(60)))
    tasks = [
        {"name": "globbed", "kind": "sequence_classification", "max_examples": 20,
         "source": {"type": "jsonl", "path": str(root / "jsonl" / "part-*.jsonl")}},
        {"name": "folder", "kind": "sequence_classification", "source": {"type": "parquet", "path": str(root / "parquet")}},
        {"name": "listed", "kind": "sequence_classification",
         "source": {"type": "csv", "path": csvs, "columns": {"text": "body", "label": "y"}}},
        {"name": "cities", "kind": "token_classification",
         "source": {"type": "conll", **{s: str(root / f"cities.{s}.conll") for s in SPLITS}}},
        {"name": "multi", "kind": "multi_label",
         "source": {"type": "csv", "path": str(multi), "label_separator": "|", "labels": ["b", "a", "never"]}},
    ]
    cfg = config(tasks, tiny_encoder)
    return cfg, read_tasks(cfg), root


def test_every_file_source_is_a_ray_task_and_the_driver_holds_no_rows(local):
    cfg, data, _ = local
    assert all(isinstance(data[t], RayTaskData) for t in cfg.task_names)
    with pytest.raises(DataError, match="read where they lie"):
        data["folder"].splits["train"]


def test_folder_of_parquet_parts_split_by_the_text_hash(local):
    _, data, _ = local
    td = data["folder"]
    texts = [review(i)[0] for i in range(100, 220)] + [review(100)[0].upper(), review(101)[0]]
    want = Counter(expected_split(t) for t in texts)
    assert {s: td.size(s) for s in SPLITS} == dict(want) == {"train": 70, "validation": 29, "test": 23}
    assert td.labels == ["meh", "neg", "pos"]
    assert td.stats == {"read": 122}
    rows = by_split({s: td.dataset(s) for s in SPLITS})
    got = {s: sorted(r["text"] for r in rows[s]) for s in SPLITS}
    for s in SPLITS:
        assert got[s] == sorted(t for t in texts if expected_split(t) == s)
    # the duplicates (one differing only in case) sit in their original's split, never in two
    assert {review(100)[0], review(100)[0].upper()} <= set(got[expected_split(review(100)[0])])
    assert sum(review(101)[0] == t for t in got[expected_split(review(101)[0])]) == 2
    assert all(int(r["idx"]) == row_id(r["text"], r["label"]) for s in SPLITS for r in rows[s])


def test_glob_skips_hidden_parts_and_caps_by_the_smallest_ids(local):
    _, data, _ = local
    td = data["globbed"]
    rows = [review(i) for i in range(90)]
    by_split = {s: [(t, y) for t, y in rows if expected_split(t) == s] for s in SPLITS}
    assert [len(by_split[s]) for s in SPLITS] == [50, 24, 16]  # train capped to max_examples 20
    assert {s: td.size(s) for s in SPLITS} == {"train": 20, "validation": 24, "test": 16}
    kept = sorted(by_split["train"], key=lambda r: row_id(*r))[:20]
    got = split_texts(td)
    assert got["train"] == sorted(t for t, _ in kept)
    assert got["test"] == sorted(t for t, _ in by_split["test"])
    assert td.label_counts("train") == dict(sorted(Counter(y for _, y in kept).items(), key=lambda kv: (-kv[1], kv[0])))
    assert "hidden" not in got["train"] + got["validation"] + got["test"]


def test_csv_list_with_column_mapping(local):
    _, data, _ = local
    td = data["listed"]
    texts = [review(i)[0] for i in range(300, 380)]
    assert {s: td.size(s) for s in SPLITS} == dict(Counter(expected_split(t) for t in texts)) == {
        "train": 53, "validation": 13, "test": 14}
    got = split_texts(td)
    assert sorted(got["train"] + got["validation"] + got["test"]) == sorted(texts)
    assert td.labels == ["meh", "neg", "pos"]


def test_conll_split_files_kept_with_space_and_whitespace_separators(local):
    _, data, _ = local
    td = data["cities"]
    assert {s: td.size(s) for s in SPLITS} == {"train": 3, "validation": 2, "test": 2}
    assert sorted((r["text"], tuple(r["label"])) for r in td.rows("train")) == [
        ("New York rocks", ("B-city", "I-city", "O")), ("Paris is nice", ("B-city", "O", "O")),
        ("Rome", ("B-city",))]
    assert split_texts(td)["validation"] == ["Lima", "Oslo sleeps"]
    assert td.labels == ["O", "B-city", "I-city"]  # the train split's tags
    assert td.unseen("test") == {"B-new": 1}  # counted, not a crash
    assert td.label_counts("train") == {"B-city": 3}


def test_configured_labels_and_unseen_evaluation_labels(local):
    cfg, data, _ = local
    td = data["multi"]
    assert td.labels == ["b", "a", "never"]
    rare = sum(td.unseen(s).get("rare", 0) for s in SPLITS)
    assert rare == 9  # items 0, 7, ..., 56
    report = summarize(cfg, data)
    assert "not in the labels (skipped when encoding): rare" in report
    assert ("multi (multi_label, source csv): train " in report
            and "; 60 in all; read 60 where they lie, split by a hash of the text" in report)


def test_tokenized_datasets_hold_exactly_the_rows_read(local, tiny_encoder):
    cfg, data, _ = local
    datasets = build_datasets(cfg, data, tokenizer_dir=str(tiny_encoder))
    assert set(datasets) == {dataset_key(t, s) for t in cfg.task_names for s in SPLITS}
    raw = by_split({s: data["multi"].dataset(s) for s in SPLITS})
    tokenized = by_split({s: datasets[dataset_key("multi", s)] for s in SPLITS})
    for s in SPLITS:
        assert sorted(int(r["idx"]) for r in tokenized[s]) == sorted(int(r["idx"]) for r in raw[s])
        assert len(tokenized[s]) == data["multi"].size(s)
        assert set(tokenized[s][0]) == set(COLUMNS)
        for r in tokenized[s]:  # labels in the configured order b, a, never; "rare" skipped
            names = {n for n in plain_row(next(x for x in raw[s] if x["idx"] == r["idx"]))["label"]}
            assert r["labels"].tolist() == [float("b" in names), float("a" in names), 0.0]


# ---------------------------------------------------------------- errors, before and inside Ray


def test_plan_errors_name_the_field_before_ray(tmp_path):
    (tmp_path / "a.csv").write_text("body,y\nx,1\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    cfg = config_from_dict({"tasks": [
        {"name": "a", "kind": "sequence_classification",
         "source": {"type": "csv", "path": str(tmp_path / "*.csv"), "columns": {"text": "body"}}},
        {"name": "b", "kind": "sequence_classification", "source": {"type": "csv", "path": str(tmp_path / "empty")}},
        {"name": "c", "kind": "sequence_classification", "source": {"type": "jsonl", "path": str(tmp_path / "x*.jsonl")}},
    ]})
    with pytest.raises(DataError) as err:
        plan_source(cfg.tasks[0], "tasks.0.source")
    assert str(err.value) == (f"tasks.0.source.columns.label: column 'label' is not in {tmp_path}/*.csv "
                              "(it has ['body', 'y'])")
    with pytest.raises(DataError, match=r"tasks\.1\.source\.path: folder .*empty holds no csv file \(\.csv"):
        plan_source(cfg.tasks[1], "tasks.1.source")
    with pytest.raises(DataError, match=r"tasks\.2\.source\.path: no file matches .*x\*\.jsonl"):
        plan_source(cfg.tasks[2], "tasks.2.source")


def test_a_bad_row_read_by_a_worker_is_a_plain_data_error(tmp_path, ray_session, tiny_encoder):
    (tmp_path / "bad.conll").write_text("Paris B-city\nis O\n\nRome X-city\n")
    cfg = config([{"name": "t", "kind": "token_classification",
                   "source": {"type": "conll", "path": str(tmp_path / "bad.conll")}}], tiny_encoder)
    with pytest.raises(DataError) as err:
        read_tasks(cfg)
    assert str(err.value) == "tasks.0.source: tags must be BIO (O, B-X, I-X); found 'X-city'"


def test_a_latin1_csv_is_read_with_its_encoding(tmp_path, ray_session, tiny_encoder):
    """``encoding: latin-1``: the accented texts come through as written (the tweets corpus in
    DATA.md is latin-1); a codec Python does not know is refused naming the field."""
    texts = [f"café crème n° {i} était {'très bon' if i % 2 else 'à éviter'}" for i in range(40)]
    path = tmp_path / "tweets.csv"
    path.write_bytes(("sentiment,confidence,text\n" + "".join(
        f"{'positive' if i % 2 else 'negative'},0.5,{t}\n" for i, t in enumerate(texts))).encode("latin-1"))
    task = {"name": "tweets", "kind": "sequence_classification",
            "source": {"type": "csv", "path": str(path), "encoding": "latin-1",
                       "columns": {"text": "text", "label": "sentiment"}}}
    cfg = config([task], tiny_encoder)
    assert cfg.tasks[0].source.encoding == "iso8859-1"
    td = read_tasks(cfg)["tweets"]
    got = split_texts(td)
    assert sorted(got["train"] + got["validation"] + got["test"]) == sorted(texts)
    assert td.labels == ["negative", "positive"]
    with pytest.raises(ValueError, match=r"tasks\.0\.source\.encoding[\s\S]*unknown text encoding 'latin-9000'"):
        config([{**task, "source": {**task["source"], "encoding": "latin-9000"}}], tiny_encoder)


# ---------------------------------------------------------------- s3:// on a real S3-compatible server


@pytest.fixture(scope="module")
def s3_parquet(s3_server):
    """A bucket on the session's S3 server (moto on 127.0.0.1) holding a Parquet input in two parts."""
    from pyarrow import fs

    uri = s3_server("mtl-data", "reviews")
    s3, root = fs.FileSystem.from_uri(uri)
    rows = [review(i) for i in range(400)]
    for part in range(2):
        chunk = rows[part * 200:(part + 1) * 200]
        pq.write_table(pa.table({"sentence": [t for t, _ in chunk], "stars": [y for _, y in chunk]}),
                       f"{root}/part-{part}.parquet", filesystem=s3)
    return uri, rows


def test_parquet_on_s3_read_split_labelled_and_tokenized(s3_parquet, ray_session, tiny_encoder):
    uri, rows = s3_parquet
    cfg = config([{"name": "stars", "kind": "sequence_classification",
                   "source": {"type": "parquet", "path": uri, "columns": {"text": "sentence", "label": "stars"}}}],
                 tiny_encoder)
    data = read_tasks(cfg)
    td = data["stars"]
    assert isinstance(td, RayTaskData) and not isinstance(td.splits, list)
    want = Counter(expected_split(t) for t, _ in rows)
    assert {s: td.size(s) for s in SPLITS} == dict(want) == {"train": 235, "validation": 90, "test": 75}
    assert td.labels == ["meh", "neg", "pos"]
    texts = split_texts(td)
    assert sum(len(v) for v in texts.values()) == len({t for v in texts.values() for t in v}) == 400  # disjoint
    for s in SPLITS:
        assert texts[s] == sorted(t for t, _ in rows if expected_split(t) == s)
    datasets = build_datasets(cfg, data, tokenizer_dir=str(tiny_encoder))
    tokenized = by_split({s: datasets[dataset_key("stars", s)].select_columns(["idx", "labels"]) for s in SPLITS})
    assert {s: len(tokenized[s]) for s in SPLITS} == {s: td.size(s) for s in SPLITS}


def test_driver_held_tasks_keep_their_api():
    td = TaskData("t", "sequence_classification", ["a"], {"train": [{"idx": 0, "text": "x", "label": "b"}]})
    assert td.size("train") == 1 and list(td.rows("train"))[0]["text"] == "x"
    assert td.unseen("train") == {"b": 1}


# ---------------------------------------------------------------- a shared input


def test_a_shared_file_input_is_one_read_with_a_label_per_task(tmp_path, ray_session, tiny_encoder):
    """A JSONL of tokens, tags and a sentence label read as one input by a tagger and a classifier:
    a row missing a label is dropped for both, both tasks have the same rows in the same splits
    (split by the hash of the joined tokens), their exact label lists and counts, and the input's
    tokenized rows carry both tasks' labels."""
    from pipelines.data import input_key

    path = tmp_path / "joint.jsonl"
    lines = []
    for i in range(60):
        text, label = review(i)
        words = text.split()
        tags = ["B-num" if w.isdigit() else "O" for w in words]
        lines.append({"tokens": words, "tags": tags, "mood": None if i == 7 else label})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = config([{"name": "mood", "kind": "sequence_classification", "input": "joint",
                   "source": {"type": "jsonl", "path": str(path), "columns": {"label": "mood"}}},
                  {"name": "nums", "kind": "token_classification", "input": "joint",
                   "source": {"type": "jsonl", "path": str(path)}}], tiny_encoder)
    data = read_tasks(cfg)
    mood, nums = data["mood"], data["nums"]
    assert isinstance(mood, RayTaskData) and mood.input == nums.input == "joint"
    want = {s: sorted(" ".join(x["tokens"]) for x in lines if x["mood"] is not None
                      and expected_split(" ".join(x["tokens"])) == s) for s in SPLITS}
    assert split_texts(mood) == split_texts(nums) == want
    assert mood.labels == ["meh", "neg", "pos"] and nums.labels == ["O", "B-num"]
    assert {s: mood.size(s) for s in SPLITS} == {s: nums.size(s) for s in SPLITS} == {s: len(want[s]) for s in SPLITS}
    assert sum(mood.label_counts("train").values()) == len(want["train"])
    assert nums.label_counts("train") == {"B-num": len(want["train"])}
    datasets = build_datasets(cfg, data, tokenizer_dir=str(tiny_encoder))
    shared = by_split({s: datasets[input_key("joint", s)] for s in SPLITS})
    alone = by_split({s: datasets[dataset_key("mood", s)] for s in SPLITS})
    for s in SPLITS:
        a = sorted(shared[s], key=lambda r: int(r["idx"]))
        b = sorted(alone[s], key=lambda r: int(r["idx"]))
        assert [int(r["idx"]) for r in a] == [int(r["idx"]) for r in b] and len(a) == len(want[s])
        assert all(int(x["labels.mood"]) == int(y["labels"]) for x, y in zip(a, b))
        assert all(int((r["labels.nums"] == 1).sum()) == 1 for r in a)  # one B-num per row

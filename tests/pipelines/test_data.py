"""pipelines/data.py on a real local Ray: every task and split becomes a tokenized, label-aligned
Ray Dataset with exactly the rows read, equal to a direct ``encode_batch``."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from mtl.encoding import encode_batch
from mtl.readers import SPLITS
from mtl.tasks import IGNORE_INDEX, make_kind
from pipelines.data import COLUMNS, build_datasets, dataset_key, run_data, summarize, task_infos


@pytest.fixture(scope="module")
def materialized(ray_session, quick_data, tiny_encoder):
    cfg, data = quick_data
    datasets = build_datasets(cfg, data, tokenizer_dir=str(tiny_encoder))
    rows = {}
    for key, ds in datasets.items():
        got = ds.take_all()
        rows[key] = sorted(got, key=lambda r: int(r["idx"]))
    return cfg, data, datasets, rows


def test_every_task_and_split_has_exactly_the_rows_read(materialized):
    cfg, data, datasets, rows = materialized
    assert set(datasets) == {dataset_key(t, s) for t in cfg.task_names for s in SPLITS}
    assert dataset_key("slots", "validation") == "slots.validation"
    for t in cfg.task_names:
        for s in SPLITS:
            key = dataset_key(t, s)
            assert [int(r["idx"]) for r in rows[key]] == list(range(len(data[t].splits[s]))), key
            assert sorted(datasets[key].columns()) == sorted(COLUMNS)
    # the quick config's caps: train max_examples, validation and test a quarter (at least 50)
    for t in cfg.tasks:
        cap = t.max_examples
        assert len(rows[dataset_key(t.name, "train")]) == cap
        assert len(rows[dataset_key(t.name, "test")]) == len(rows[dataset_key(t.name, "validation")]) == max(50, cap // 4)


def test_shapes_and_dtypes(materialized):
    cfg, _, _, rows = materialized
    for t in cfg.tasks:
        length = cfg.max_length(t)
        row = rows[dataset_key(t.name, "train")][0]
        assert set(row) == set(COLUMNS)
        assert row["input_ids"].shape == row["attention_mask"].shape == (length,)
        assert row["input_ids"].dtype == row["attention_mask"].dtype == np.int64
        if t.kind == "token_classification":
            assert row["labels"].shape == (length,) and row["labels"].dtype == np.int64
            assert (row["labels"][row["attention_mask"] == 0] == IGNORE_INDEX).all()
            assert row["labels"][0] == IGNORE_INDEX  # [CLS]
        else:
            assert np.ndim(row["labels"]) == 0 and np.asarray(row["labels"]).dtype == np.int64


def test_rows_equal_a_direct_encode(materialized, tiny_encoder):
    cfg, data, _, rows = materialized
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder))
    for info in task_infos(cfg, data):
        kind = make_kind(info.kind, info.labels)
        for s in SPLITS:
            src = data[info.name].splits[s]
            want = encode_batch(tokenizer, kind, [r["text"] for r in src], [r["label"] for r in src], info.max_length)
            got = rows[dataset_key(info.name, s)]
            for col in ("input_ids", "attention_mask", "labels"):
                stacked = np.stack([np.asarray(r[col]) for r in got])
                assert stacked.dtype == want[col].dtype, (info.name, s, col)
                np.testing.assert_array_equal(stacked, want[col], err_msg=f"{info.name}.{s}.{col}")


def test_token_labels_hold_every_slot_tag(materialized):
    _, data, _, rows = materialized
    labels = data["slots"].labels
    src = data["slots"].splits["validation"]
    for raw, row in zip(src, rows["slots.validation"]):
        kept = row["labels"][row["labels"] != IGNORE_INDEX]
        # words past max_length are cut; the ones kept are the first words' tags, in order
        assert [labels[i] for i in kept] == raw["label"][: len(kept)]
    cut = sum(len(r["label"]) > int((row["labels"] != IGNORE_INDEX).sum()) for r, row in
              zip(src, rows["slots.validation"]))
    assert cut <= 2  # ATIS sentences fit in 48 tokens, nearly all


def test_summarize_and_run_data_without_tokenizing(quick_data, capsys):
    cfg, data = quick_data
    caps = {t.name: (t.max_examples, max(50, t.max_examples // 4)) for t in cfg.tasks}
    text = summarize(cfg, data)
    n, e = caps["intent"]
    assert text.splitlines()[0] == (
        f"intent (sequence_classification, source atis): train {n:,}, validation {e:,}, test {e:,}; "
        f"{n + 2 * e:,} in all; read 5,871, 0 exact duplicate texts dropped")
    n, e = caps["topic"]
    assert (f"topic (sequence_classification, source bbc): train {n:,}, validation {e:,}, test {e:,}; "
            f"{n + 2 * e:,} in all; read 2,225, 100 exact duplicate texts dropped") in text
    assert "read 12,808, 56 exact duplicate texts dropped" in text
    assert "  labels: 2" in text and "(BIO tags; counts are entities)" in text
    result = run_data(cfg, tokenize=False)
    assert result == {t: {"train": n, "validation": e, "test": e} for t, (n, e) in caps.items()}
    assert text in capsys.readouterr().out


@pytest.fixture(scope="module")
def shared_atis(ray_session, tiny_encoder):
    """The quick config with intent and slots as one input (``input: atis``), tokenized."""
    from conftest import QUICK_CONFIG

    from mtl.config import load_config
    from pipelines.data import read_tasks

    cfg = load_config(QUICK_CONFIG, ["tasks.0.input=atis", "tasks.1.input=atis"])
    data = read_tasks(cfg)
    datasets = build_datasets(cfg, data, tokenizer_dir=str(tiny_encoder))
    rows = {key: sorted(ds.take_all(), key=lambda r: int(r["idx"])) for key, ds in datasets.items()
            if key.startswith(("input.", "intent.", "slots."))}
    return cfg, data, datasets, rows


def test_a_shared_input_is_tokenized_once_with_each_tasks_labels(shared_atis, quick_data):
    """``input.atis.<split>``: one row per sentence with input_ids, attention_mask and
    ``labels.intent`` / ``labels.slots``, equal row for row to the per-task datasets (which stay,
    for evaluation) and to what each task reads alone."""
    from pipelines.data import input_key, train_key

    cfg, data, datasets, rows = shared_atis
    assert cfg.inputs == {"atis": ["intent", "slots"], "sentiment": ["sentiment"], "topic": ["topic"]}
    assert (train_key(cfg, "atis"), train_key(cfg, "topic")) == ("input.atis.train", "topic.train")
    assert set(datasets) == {dataset_key(t, s) for t in cfg.task_names for s in SPLITS} | {
        input_key("atis", s) for s in SPLITS}
    assert sorted(datasets["input.atis.train"].columns()) == sorted(
        ["idx", "input_ids", "attention_mask", "labels.intent", "labels.slots"])
    _, alone = quick_data  # the same config without the shared input
    for s in SPLITS:
        shared = rows[input_key("atis", s)]
        assert len(shared) == len(alone["intent"].splits[s]) == len(data["slots"].splits[s])
        for t in ("intent", "slots"):
            assert data[t].splits[s] == alone[t].splits[s] and data[t].input == "atis"
            per_task = rows[dataset_key(t, s)]
            for a, b in zip(shared, per_task):
                assert int(a["idx"]) == int(b["idx"])
                np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
                np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])
                np.testing.assert_array_equal(a[f"labels.{t}"], b["labels"])

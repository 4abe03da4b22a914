"""mtl.predictor: one encoder pass answers every task asked for, each in its kind's shape."""

from __future__ import annotations

import pytest
import torch
from conftest import roundtrip
from transformers import AutoTokenizer

from mtl.encoding import tokenize_words
from mtl.model import MultiTaskModel, TaskInfo
from mtl.predictor import Predictor

TASKS = [
    TaskInfo("intent", "sequence_classification", ["a", "b", "c"], 24),
    TaskInfo("slots", "token_classification", ["O", "B-X", "I-X"], 24),
    TaskInfo("tags", "multi_label", ["p", "q"], 24),
    TaskInfo("score", "regression", [], 24),
]


@pytest.fixture(scope="module")
def predictor(tiny_encoder):
    model = MultiTaskModel.from_encoder(tiny_encoder, TASKS, seed=1)
    return Predictor(model, AutoTokenizer.from_pretrained(str(tiny_encoder)), device="cpu")


def test_answers_per_kind(predictor):
    texts = ["fly to boston", "what's the  cheapest fare from denver to st. louis"]
    out = predictor.predict(texts)
    assert len(out) == 2 and all(set(o) == {"intent", "slots", "tags", "score"} for o in out)
    for text, o in zip(texts, out):
        assert o["intent"]["label"] in ("a", "b", "c") and 0 < o["intent"]["score"] <= 1
        assert "top_k" not in o["intent"]
        assert len(o["slots"]["tags"]) == len(text.split())
        assert all(t in ("O", "B-X", "I-X") for t in o["slots"]["tags"])
        for ent in o["slots"]["entities"]:
            assert text[ent["start"]:ent["end"]] == ent["text"] and ent["type"] == "X"
        assert all(x["label"] in ("p", "q") and x["score"] > 0.5 for x in o["tags"]["labels"])
        assert isinstance(o["score"]["value"], float)


def test_matches_the_model_and_batching_does_not_change_answers(predictor):
    texts = ["fly to boston", "a much longer sentence about flights from denver to st. louis on monday"]
    alone = predictor.predict(texts[:1])[0]
    batched = predictor.predict(texts)[0]
    assert alone["intent"]["label"] == batched["intent"]["label"]
    assert alone["intent"]["score"] == pytest.approx(batched["intent"]["score"], abs=1e-5)
    assert alone["score"]["value"] == pytest.approx(batched["score"]["value"], abs=1e-5)
    assert alone["slots"]["tags"] == batched["slots"]["tags"]
    enc = tokenize_words(predictor.tokenizer, [texts[0].split()], 24, padding="longest")
    with torch.inference_mode():
        logits = predictor.model(torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"]))
    assert alone["score"]["value"] == pytest.approx(float(logits["score"][0, 0]), abs=1e-6)
    assert alone["intent"]["score"] == pytest.approx(float(torch.softmax(logits["intent"][0], -1).max()), abs=1e-6)


def test_length_buckets_split_by_length_and_keep_answers_and_order(predictor):
    """Mixed lengths run as sub-batches of similar length (longest ≤ 1.5× shortest), in the
    caller's order, with the answers of one padded batch (scores to float noise)."""
    texts = ["fly", "a much longer sentence about flights from denver to st. louis on monday morning",
             "to boston", "cheap fares please", "show me every morning flight from oakland to dallas fort worth"]
    assert predictor.length_buckets  # the default on CPU
    enc = tokenize_words(predictor.tokenizer, [t.split() for t in texts], 24, padding="longest")
    mask = torch.tensor(enc["attention_mask"])
    groups = predictor._groups(mask)
    lengths = mask.sum(1)
    assert sorted(i for g in groups for i in g.tolist()) == list(range(len(texts)))
    assert len(groups) > 1
    for g in groups:
        assert lengths[g].max() <= 1.5 * lengths[g].min()
    bucketed = predictor.predict(texts)
    predictor.length_buckets = False
    try:
        assert len(predictor._groups(mask)) == 1
        padded = predictor.predict(texts)
    finally:
        predictor.length_buckets = True
    for a, b in zip(bucketed, padded):
        assert a["intent"]["label"] == b["intent"]["label"]
        assert a["intent"]["score"] == pytest.approx(b["intent"]["score"], abs=1e-5)
        assert a["score"]["value"] == pytest.approx(b["score"]["value"], abs=1e-5)
        assert a["slots"]["tags"] == b["slots"]["tags"]
        assert [x["label"] for x in a["tags"]["labels"]] == [x["label"] for x in b["tags"]["labels"]]


def test_top_k_and_task_subset(predictor):
    [o] = predictor.predict(["book a flight"], tasks=["intent"], top_k=2)
    assert set(o) == {"intent"}
    top = o["intent"]["top_k"]
    assert len(top) == 2 and top[0]["label"] == o["intent"]["label"]
    assert top[0]["score"] >= top[1]["score"] and top[0]["label"] != top[1]["label"]
    [o] = predictor.predict(["book a flight"], tasks=["intent"], top_k=10)
    assert len(o["intent"]["top_k"]) == 3
    assert sum(x["score"] for x in o["intent"]["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_unknown_task_and_empty_input(predictor):
    with pytest.raises(KeyError) as err:
        predictor.predict(["x"], tasks=["intent", "sentiment"])
    msg = str(err.value)
    assert "['sentiment']" in msg and "['intent', 'slots', 'tags', 'score']" in msg
    assert predictor.predict([]) == []
    assert predictor.describe()[1] == {"name": "slots", "kind": "token_classification", "labels": ["O", "B-X", "I-X"]}


def test_long_text_is_truncated(predictor):
    text = " ".join(["boston"] * 40)  # 40 words, 42 tokens with specials: past max_length 24
    [o] = predictor.predict([text], tasks=["slots", "intent"])
    assert len(o["slots"]["tags"]) == 22  # words past the cut get no tag
    assert o["intent"]["label"] in ("a", "b", "c")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_load_from_artifact(tiny_artifact, quick_data):
    cfg, _ = quick_data
    p = Predictor.load(tiny_artifact, device="cpu")
    assert p.task_names == ["intent", "slots", "sentiment", "topic"]
    assert p.max_length == max(cfg.max_length(t) for t in cfg.tasks)  # the longest task's
    [o] = p.predict(["show me flights from boston to denver"], tasks=["sentiment", "topic"], top_k=2)
    assert o["sentiment"]["label"] in ("fresh", "rotten") and len(o["sentiment"]["top_k"]) == 2
    assert o["topic"]["label"] in ("business", "entertainment", "politics", "sports", "tech")
    q = Predictor.load(tiny_artifact, device="cpu", quantize=True)
    [o] = q.predict(["show me flights"], tasks=["slots"])
    assert len(o["slots"]["tags"]) == 3


def test_reading_only_the_words_before_the_cut_gives_the_full_tokenization(predictor):
    """The predictor tokenizes a long text's first ``length`` words only: ids, mask and word ids are
    those of tokenizing every word, also when words before the cut give no token (then the row is
    tokenized again whole), and the answers are those of the whole text."""
    zw = "\u200b"
    texts = [" ".join(["boston"] * 300),                                  # 300 words: cut at 24
             " ".join([zw] * 30 + ["fly", "to", "denver"] * 10),          # 30 tokenless words first
             "a " + " ".join([zw, "b"] * 20),                             # tokenless words between
             "fly to boston", " ".join(["x"] * 23) + " " + zw + " y z"]  # around the cut
    words = [t.split() for t in texts]
    for length in (8, 24):
        full = tokenize_words(predictor.tokenizer, words, length, padding="longest")
        got = predictor._tokenize(words, length)
        assert got["input_ids"] == full["input_ids"] and got["attention_mask"] == full["attention_mask"]
        assert [got.word_ids(i) for i in range(len(texts))] == [full.word_ids(i) for i in range(len(texts))]
    out = predictor.predict(texts)
    for text, o in zip(texts, out):  # alone, a text is padded less: scores agree to float rounding
        assert o == roundtrip(predictor.predict([text])[0])
    assert len(out[1]["slots"]["tags"]) == 30 + 22  # 30 "O" for the tokenless words, then 22 tokens' words


def test_words_without_subwords_keep_tags_aligned(predictor):
    """A word the tokenizer drops entirely (zero-width space, a control character, a lone combining
    mark) still gets its tag ("O"), so tags stay one per word and entity spans point at the right
    words. Before the fix such a word had no tag and every later tag shifted one word left."""
    text = "fly \u200b to \x01 boston \u0301 tomorrow"
    [o] = predictor.predict([text], tasks=["slots"])
    words = text.split()
    assert len(o["slots"]["tags"]) == len(words) == 7
    assert [o["slots"]["tags"][i] for i in (1, 3, 5)] == ["O", "O", "O"]
    [alone] = predictor.predict(["fly to boston tomorrow"], tasks=["slots"])
    assert [o["slots"]["tags"][i] for i in (0, 2, 4, 6)] == alone["slots"]["tags"]
    for ent in o["slots"]["entities"]:
        assert text[ent["start"]:ent["end"]] == ent["text"]
        assert not {"\u200b", "\x01", "\u0301"} & set(ent["text"])


def test_invalid_text_is_refused_naming_its_index_and_neighbours_are_answered(predictor):
    from mtl.predictor import PredictionError, RowError

    texts = ["fly to boston", "bad \ud800 text", "\u200b\ufeff", "a fine film"]
    with pytest.raises(PredictionError) as err:
        predictor.predict(texts, tasks=["intent"])
    msg = str(err.value)
    assert "texts[1]" in msg and "lone surrogate U+D800" in msg and "texts[2]" in msg
    assert "\ud800" not in msg and "bad" not in msg  # the text itself is never echoed
    assert [e.index for e in err.value.errors] == [1, 2] and all(e.input_fault for e in err.value.errors)
    # the good rows were answered anyway, the same as alone
    assert err.value.answers[0] == predictor.predict(["fly to boston"], tasks=["intent"])[0]
    assert err.value.answers[3] == predictor.predict(["a fine film"], tasks=["intent"])[0]
    out = predictor.predict(texts, tasks=["intent"], errors="return")
    assert isinstance(out[1], RowError) and isinstance(out[2], RowError)
    assert out[0] == err.value.answers[0] and out[3] == err.value.answers[3]


def test_a_failing_row_is_split_out_of_the_batch(tiny_encoder, poisoned_model):
    """The pass over all rows fails because of one row: the batch is bisected, only that row gets
    an error (an input fault: the model answers a probe text), every other row its normal answer."""
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    model = MultiTaskModel.from_encoder(tiny_encoder, TASKS, seed=1)
    clean = Predictor(model, tok, device="cpu", length_buckets=False)
    poison = tok.convert_tokens_to_ids("denver")
    p = Predictor(poisoned_model(model, poison), tok, device="cpu", length_buckets=False)
    texts = [f"flight number {i} to boston" for i in range(7)]
    texts.insert(5, "fly to denver")
    out = p.predict(texts, errors="return")
    from mtl.predictor import RowError

    assert [i for i, o in enumerate(out) if isinstance(o, RowError)] == [5]
    assert out[5].input_fault and "texts[5]" in str(out[5]) and "IndexError" in str(out[5])
    want = clean.predict([t for i, t in enumerate(texts) if i != 5])
    assert [o for i, o in enumerate(out) if i != 5] == want
    # 8 rows, one bad: 1 full pass + bisection (2 + 2 + 2 halves) + 1 probe = 8 passes, not one per row
    assert p.model.calls == 8


def test_a_broken_model_is_a_server_fault_not_the_inputs(tiny_encoder, poisoned_model):
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    model = MultiTaskModel.from_encoder(tiny_encoder, TASKS, seed=1)
    p = Predictor(poisoned_model(model, tok.cls_token_id, RuntimeError), tok, device="cpu")
    out = p.predict(["fly to boston", "a fine film"], errors="return")
    assert [o.input_fault for o in out] == [False, False]
    assert "server" in str(out[0])


def test_pyfunc_answers_good_rows_beside_a_bad_one(tiny_artifact):
    """The MLflow pyfunc's predict: a bad row gets an ``error`` and no answers; its neighbours get
    the predictor's answers (the registered-model round trip is tests/pipelines/test_run_job.py)."""
    import json

    import pandas as pd

    from mtl.pyfunc_model import MultiTaskPyfunc

    model = MultiTaskPyfunc()
    model.predictor = Predictor.load(tiny_artifact, device="cpu")
    texts = ["fly to boston", "\u200b\ufeff", "a dull film"]
    out = model.predict(None, pd.DataFrame({"text": texts}), params={"tasks": "intent,topic"})
    assert list(out.columns) == ["intent", "topic", "error"]
    assert out["error"].isna().tolist() == [True, False, True] and out["intent"].isna().tolist() == [False, True, False]
    assert out["error"][1].startswith("texts[1] has no visible character")
    # a list input can carry what a pandas string column cannot: a lone surrogate
    listed = model.predict(None, ["fly to boston", "bad \ud800"], params={"tasks": ["intent"]})
    assert listed["error"].isna().tolist() == [True, False]
    assert listed["error"][1].startswith("texts[1] contains a lone surrogate")
    for i in (0, 2):
        [want] = model.predictor.predict([texts[i]], ["intent", "topic"])
        for t in ("intent", "topic"):  # padded beside another text: last float digits may move
            got = json.loads(out[t][i])
            assert got["label"] == want[t]["label"] and got["score"] == pytest.approx(want[t]["score"], abs=1e-5)


def test_each_task_reads_up_to_its_own_max_length(tiny_encoder):
    """A sentence task with max_length 8 beside a token task with 24: the short task's answer for a
    long text is the model's answer on the text cut at 8 tokens, as training and evaluation cut
    it (before, every task read up to the longest task's length). Texts within 8 tokens need no
    second pass."""
    from mtl.evaluation import evaluate_rows

    tasks = [TaskInfo("short", "sequence_classification", ["a", "b", "c"], 8),
             TaskInfo("slots", "token_classification", ["O", "B-X", "I-X"], 24)]
    model = MultiTaskModel.from_encoder(tiny_encoder, tasks, seed=3)
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    p = Predictor(model, tok, device="cpu")
    long_text = "show me the cheapest flights from boston to denver on monday morning please"
    [o] = p.predict([long_text])
    enc = tokenize_words(tok, [long_text.split()], 8, padding="longest")
    with torch.inference_mode():
        logits = model(torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"]), ["short"])["short"][0]
    probs = torch.softmax(logits, -1)
    assert o["short"]["label"] == "abc"[int(probs.argmax())]
    assert o["short"]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert len(o["slots"]["tags"]) == len(long_text.split())  # the token task still reads 24 tokens
    [short_only] = Predictor(model, tok, device="cpu").predict([long_text], ["short"])
    assert short_only["short"] == o["short"]
    preds, _ = evaluate_rows(model, tok, model.kinds["short"], "short", [{"text": long_text, "label": "a"}],
                             8, 4, torch.device("cpu"))
    assert preds == [model.kinds["short"].index[o["short"]["label"]]]


def test_served_answers_give_the_metrics_evaluate_reports(tiny_artifact, quick_data):
    """The test sets through Predictor.predict (what Serve runs) give, per task, the same metrics
    as mtl.evaluation.test_report (what `mtl-ray evaluate` and training report)."""
    from mtl.evaluation import test_report

    _, data = quick_data
    p = Predictor.load(tiny_artifact, device="cpu")
    rows = {t: d.splits["test"][:80] for t, d in data.items()}
    report = test_report(p.model, p.tokenizer, rows, batch_size=32)
    for task, task_rows in rows.items():
        kind = p.model.kinds[task]
        answers = p.predict([r["text"] for r in task_rows], [task])
        if kind.name == "token_classification":
            preds = [a[task]["tags"] for a in answers]
            refs = [r["label"][:len(pr)] for r, pr in zip(task_rows, preds)]  # words past the cut: no tag
        else:  # label indices, as the evaluation gathers them
            preds = [kind.index[a[task]["label"]] for a in answers]
            refs = [kind.index[r["label"]] for r in task_rows]
        assert kind.metrics(preds, refs) == pytest.approx(report[task]["metrics"], abs=1e-9), task


@pytest.fixture(scope="module")
def onnx_artifact(tiny_artifact, tmp_path_factory):
    """A copy of the tiny artifact (the ONNX graphs are cached inside it)."""
    import shutil

    dst = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(tiny_artifact, dst)
    return dst


def test_onnx_backend_gives_the_torch_answers(onnx_artifact, quick_data):
    """fp32 ONNX Runtime: the same labels and tags as torch on every text, scores within 1e-4; the
    graph is exported once and reused."""
    pytest.importorskip("onnxruntime")
    _, data = quick_data
    texts = [r["text"] for d in data.values() for r in d.splits["test"][:25]] + ["fly to boston", "x " * 200]
    torch_p = Predictor.load(onnx_artifact, device="cpu")
    onnx_p = Predictor.load(onnx_artifact, device="cpu", backend="onnx")
    graphs = sorted((onnx_artifact / "onnx").glob("*.fp32.onnx"))
    assert len(graphs) == 1
    import onnx

    ops = {n.op_type for n in onnx.load(str(graphs[0])).graph.node}
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization"} <= ops  # ONNX Runtime's fusions applied
    want, got = torch_p.predict(texts), onnx_p.predict(texts)
    for w, g in zip(want, got):
        assert set(w) == set(g) == {"intent", "slots", "sentiment", "topic"}
        for task in w:
            if "label" in w[task]:
                assert g[task]["label"] == w[task]["label"]
                assert g[task]["score"] == pytest.approx(w[task]["score"], abs=1e-4)
            else:
                assert g[task]["tags"] == w[task]["tags"]
                assert [(e["start"], e["end"], e["type"]) for e in g[task]["entities"]] == \
                       [(e["start"], e["end"], e["type"]) for e in w[task]["entities"]]
    mtime = graphs[0].stat().st_mtime_ns
    Predictor.load(onnx_artifact, device="cpu", backend="onnx")
    assert graphs[0].stat().st_mtime_ns == mtime  # cached, not exported again


def test_onnx_export_falls_back_to_the_plain_graph_when_fusion_fails(tiny_artifact, tmp_path, monkeypatch):
    """The fusions are an optimisation: where they cannot be applied the plain (dynamo) graph is
    exported, logged, and gives the same answers."""
    pytest.importorskip("onnxruntime")
    import shutil

    import onnx

    from mtl import onnx_backend

    def unfusable(model, path):
        raise RuntimeError("no attention fused")

    monkeypatch.setattr(onnx_backend, "_export_fused", unfusable)
    artifact = tmp_path / "model"
    shutil.copytree(tiny_artifact, artifact)
    texts = ["show me flights from boston to denver", "a dull film", "shares fell sharply"]
    plain = Predictor.load(artifact, device="cpu", backend="onnx")
    (graph,) = (artifact / "onnx").glob("*.fp32.onnx")
    assert "Attention" not in {n.op_type for n in onnx.load(str(graph)).graph.node}
    want = Predictor.load(artifact, device="cpu").predict(texts)
    for w, g in zip(want, plain.predict(texts)):
        assert g["intent"]["label"] == w["intent"]["label"]
        assert g["topic"]["score"] == pytest.approx(w["topic"]["score"], abs=1e-4)


def test_onnx_int8_runs_and_mostly_agrees(onnx_artifact):
    pytest.importorskip("onnxruntime")
    texts = ["show me flights from boston to denver", "a dull film", "shares fell", "book a table for two"] * 4
    q = Predictor.load(onnx_artifact, device="cpu", backend="onnx", quantize=True)
    assert sorted(p.name.split(".", 1)[1] for p in (onnx_artifact / "onnx").glob("*.onnx")) == ["fp32.onnx", "int8.onnx"]
    out = q.predict(texts)
    assert len(out) == len(texts) and all(set(o) == {"intent", "slots", "sentiment", "topic"} for o in out)
    assert all(len(o["slots"]["tags"]) == len(t.split()) for o, t in zip(out, texts))
    with pytest.raises(ValueError, match="CPU only"):
        Predictor.load(onnx_artifact, device="meta", backend="onnx")


def test_report_counts_labels_the_model_never_saw(tiny_artifact, quick_data):
    """An evaluation row whose label is outside the model's list is skipped by the metrics and
    counted in the report (never a KeyError)."""
    from mtl.evaluation import test_report

    _, data = quick_data
    p = Predictor.load(tiny_artifact, device="cpu")
    known = list(data["topic"].rows("test"))[:6]
    rows = known + [{"text": "a brand new kind of story", "label": "science"}] * 2
    report = test_report(p.model, p.tokenizer, {"topic": rows}, batch_size=4)["topic"]
    assert report["unseen_labels"] == {"science": 2}
    assert report["n"] == 8
    assert sum(report["confusion"][i][j] for i in range(5) for j in range(5)) == 6
    plain = test_report(p.model, p.tokenizer, {"topic": known}, batch_size=4)["topic"]
    assert "unseen_labels" not in plain and plain["metrics"] == report["metrics"]

"""The four task kinds: label encoding, exact losses, metrics on hand-made examples, decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl.tasks import IGNORE_INDEX, KINDS, make_kind
from mtl.tasks.token import bio_spans, first_subword_labels


def test_registry():
    assert sorted(KINDS) == ["multi_label", "regression", "sequence_classification", "token_classification"]
    assert {n: KINDS[n].primary_metric for n in KINDS} == {
        "multi_label": "micro_f1", "regression": "pearson",
        "sequence_classification": "accuracy", "token_classification": "f1"}
    with pytest.raises(ValueError, match="unknown task kind 'ner'"):
        make_kind("ner", [])


@pytest.mark.parametrize("kind, labels, shape", [
    ("sequence_classification", ["a", "b", "c"], (4, 3)),
    ("multi_label", ["a", "b"], (4, 2)),
    ("regression", [], (4, 1)),
])
def test_sentence_heads(kind, labels, shape):
    k = make_kind(kind, labels)
    torch.manual_seed(0)
    head = k.build_head(8, 0.0, "mean")
    hidden = torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4)
    out = head(hidden, mask)
    assert out.shape == shape
    # mean pooling ignores padded positions
    hidden2 = hidden.clone()
    hidden2[:, 3:] = 100.0
    assert torch.allclose(head(hidden2, mask), out)
    cls = k.build_head(8, 0.0, "cls")
    cls.load_state_dict(head.state_dict())
    assert torch.allclose(cls(hidden, mask), cls.out(hidden[:, 0]))


# ------------------------------------------------------------------ sequence classification

def test_sequence_encode_and_loss():
    k = make_kind("sequence_classification", ["a", "b"])
    labels = k.encode_labels(["b", "a", "b"], [], 8)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1]
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    loss = k.loss(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)
    assert k.loss(torch.zeros(3, 2), torch.tensor([0, 1, 1])).item() == pytest.approx(math.log(2), rel=1e-6)
    # a label outside the list (first met at evaluation) is skipped and counted, never a crash
    assert k.encode_labels(["c", "a", "c"], [], 8).tolist() == [IGNORE_INDEX, 0, IGNORE_INDEX]
    assert k.unseen == {"c": 2}


def test_unseen_labels_are_skipped_and_counted_by_every_kind():
    seq = make_kind("sequence_classification", ["a", "b"])
    labels = torch.tensor(seq.encode_labels(["z", "b", "a"], [], 8))
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    assert seq.gather(logits, labels) == ([1, 1], [1, 0])  # the "z" row is left out of the metrics
    assert seq.loss(logits, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[1:], labels[1:]).item())
    only_unseen = torch.tensor(seq.encode_labels(["z"], [], 8))
    assert seq.loss(logits[:1], only_unseen).item() == 0.0  # not NaN
    assert seq.unseen == {"z": 2}
    multi = make_kind("multi_label", ["x", "y"])
    assert multi.encode_labels([["x", "w"], ["w"]], [], 8).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert multi.unseen == {"w": 2}
    tok = make_kind("token_classification", ["O", "B-A", "I-A"])
    out = tok.encode_labels([["B-A", "B-NEW", "O"]], [[None, 0, 1, 2, None]], 6)
    assert out.tolist() == [[IGNORE_INDEX, 1, IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX]]
    assert tok.unseen == {"B-NEW": 1}


def test_sequence_metrics_known_answers():
    k = make_kind("sequence_classification", ["a", "b", "c", "never"])
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = k.metrics(preds, refs)
    # F1: a 0.5 (P 1/2, R 1/2), b 0.8 (P 2/3, R 1), c 2/3 (P 1, R 1/2); "never" is left out
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    rep = k.report(preds, refs)
    assert set(rep) == {"a", "b", "c"}
    assert rep["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert k.confusion(preds, refs).tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # a prediction of a label with no reference still counts in macro-F1 (F1 0)
    assert k.metrics([3, 0], [0, 0])["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_sequence_gather_and_decode():
    k = make_kind("sequence_classification", ["a", "b", "c"])
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert k.gather(logits, torch.tensor([1, 2])) == ([1, 0], [1, 2])
    out = k.decode(logits[0], [], [], [], "x", top_k=1)
    p = torch.softmax(logits[0], -1)
    assert out == {"label": "b", "score": pytest.approx(float(p[1]))}
    out = k.decode(logits[0], [], [], [], "x", top_k=5)  # capped at the number of labels
    assert [x["label"] for x in out["top_k"]] == ["b", "c", "a"]
    assert sum(x["score"] for x in out["top_k"]) == pytest.approx(1.0)


# ------------------------------------------------------------------ multi-label

def test_multi_label_encode_loss_metrics():
    k = make_kind("multi_label", ["x", "y", "z", "w"])
    enc = k.encode_labels([["x"], ["x", "y"], []], [], 8)
    assert enc.dtype == np.float32
    assert enc.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert k.loss(torch.zeros(3, 4), torch.as_tensor(enc)).item() == pytest.approx(math.log(2), rel=1e-6)
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0], [-5.0, 5.0, 5.0, -5.0], [-5.0, -5.0, -5.0, -5.0]])
    preds, refs = k.gather(logits, torch.as_tensor(enc))
    assert preds == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    m = k.metrics(preds, refs)
    # x: tp 1 fn 1 -> F1 2/3; y: tp 1 -> 1; z: fp 1 -> 0; w: absent, left out of macro
    # micro: tp 2, fp 1, fn 1 -> 4/6
    assert m == pytest.approx({"micro_f1": 2 / 3, "macro_f1": (2 / 3 + 1 + 0) / 3, "subset_accuracy": 2 / 3})
    rep = k.report(preds, refs)
    assert set(rep) == {"x", "y", "z"}
    assert rep["x"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert rep["z"]["support"] == 0 and rep["z"]["precision"] == 0.0


def test_multi_label_decode():
    k = make_kind("multi_label", ["x", "y", "z"])
    out = k.decode(torch.tensor([1.0, -1.0, 3.0]), [], [], [], "t", 1)
    assert [x["label"] for x in out["labels"]] == ["z", "x"]  # above 0.5, most probable first
    assert out["labels"][0]["score"] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert k.decode(torch.tensor([-1.0, -1.0, -1.0]), [], [], [], "t", 1) == {"labels": []}


# ------------------------------------------------------------------ regression

def test_regression():
    k = make_kind("regression", ["ignored"])
    assert k.labels == [] and k.num_outputs == 1
    assert k.encode_labels(["1.5", 2], [], 8).tolist() == [1.5, 2.0]
    assert k.loss(torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)
    preds, refs = k.gather(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 5.0]))
    assert (preds, refs) == ([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    m = k.metrics(preds, refs)
    # deviations (-1, 0, 1) and (-5/3, -2/3, 7/3): covariance sum 4, sums of squares 2 and 78/9
    assert m["mse"] == pytest.approx(4 / 3)
    assert m["pearson"] == pytest.approx(4 / math.sqrt(2 * 78 / 9))
    assert k.metrics([2.0, 2.0], [1.0, 3.0]) == {"mse": 1.0, "pearson": 0.0}  # constant prediction
    assert k.decode(torch.tensor([0.25]), [], [], [], "t", 1) == {"value": 0.25}


# ------------------------------------------------------------------ token classification

def test_first_subword_labels():
    assert first_subword_labels([3, 5], [None, 0, 0, 1, None, None]) == [-100, 3, -100, 5, -100, -100]
    assert first_subword_labels([7], [None, 0, 0, 0, None]) == [-100, 7, -100, -100, -100]


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["O", "I-LOC", "I-LOC", "O"], [("LOC", 1, 3)]),  # I- after O starts an entity
    (["B-A", "B-A", "I-A"], [("A", 0, 1), ("A", 1, 3)]),  # adjacent entities of one type
    (["B-A", "I-B", "I-B"], [("A", 0, 1), ("B", 1, 3)]),  # I- of another type starts a new one
    (["O", "O", "B-X", "I-X"], [("X", 2, 4)]),  # entity at the end
    (["B-X"], [("X", 0, 1)]),
    (["O", "O"], []),
    ([], []),
    (["B-fromloc.city_name", "I-fromloc.city_name"], [("fromloc.city_name", 0, 2)]),
])
def test_bio_spans(tags, spans):
    assert bio_spans(tags) == spans


def test_token_encode_and_loss():
    k = make_kind("token_classification", ["O", "B-X", "I-X"])
    enc = k.encode_labels([["B-X", "O"], ["O"]], [[None, 0, 0, 1, None], [None, 0, None]], 6)
    assert enc.dtype == np.int64
    assert enc.tolist() == [[-100, 1, -100, 0, -100, -100], [-100, 0, -100, -100, -100, -100]]
    logits = torch.zeros(1, 3, 3)
    logits[0, 0] = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    logits[0, 1] = torch.tensor([50.0, -50.0, 0.0])  # ignored position: would dominate the loss
    logits[0, 2] = torch.log(torch.tensor([0.2, 0.2, 0.6]))
    loss = k.loss(logits, torch.tensor([[1, IGNORE_INDEX, 2]]))
    assert loss.item() == pytest.approx((math.log(4) + math.log(1 / 0.6)) / 2, rel=1e-6)


def test_seqeval_metrics_known_answers():
    k = make_kind("token_classification", ["O", "B-PER", "I-PER", "B-LOC"])
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "B-PER"]]
    # reference entities 3, predicted 3, correct 2
    assert k.metrics(preds, refs) == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    preds = [["B-PER", "O", "O", "O"], ["B-LOC", "O"]]  # PER span cut short: wrong
    assert k.metrics(preds, refs) == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4})
    rep = k.report(preds, refs)
    assert rep["LOC"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert rep["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert k.metrics([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_token_gather_skips_ignored_positions():
    k = make_kind("token_classification", ["O", "B-X", "I-X"])
    labels = torch.tensor([[-100, 1, -100, 2, 0, -100]])
    logits = torch.full((1, 6, 3), -5.0)
    for pos, tag in enumerate([0, 1, 0, 0, 0, 2]):
        logits[0, pos, tag] = 5.0
    preds, refs = k.gather(logits, labels)
    assert refs == [["B-X", "I-X", "O"]]
    assert preds == [["B-X", "O", "O"]]


def test_token_decode_spans():
    k = make_kind("token_classification", ["O", "B-LOC", "I-LOC"])
    text = "fly  to new york"
    words, spans = text.split(), [(0, 3), (5, 7), (8, 11), (12, 16)]
    word_ids = [None, 0, 1, 2, 2, 3, None]  # "new" has two subwords; the second is not read
    gold = [0, 0, 0, 1, 0, 2, 0]  # per position: [CLS] fly to new ##w york [SEP]
    logits = torch.nn.functional.one_hot(torch.tensor(gold), 3).float() * 10
    logits[4] = torch.tensor([0.0, 0.0, 10.0])  # a later subword saying I-LOC changes nothing
    out = k.decode(logits, words, spans, word_ids, text, 1)
    assert out["tags"] == ["O", "O", "B-LOC", "I-LOC"]
    [ent] = out["entities"]
    assert (ent["type"], ent["text"], ent["start"], ent["end"]) == ("LOC", "new york", 8, 16)
    assert ent["score"] == pytest.approx(torch.softmax(torch.tensor([0.0, 10.0, 0.0]), -1)[1].item())

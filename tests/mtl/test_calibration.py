"""mtl.calibration: temperature scaling fits the temperature that made the scores over-confident,
lowers ECE, changes no label; the predictor applies the manifest's temperature."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtl.calibration import (
    Events,
    calibrate,
    confidences,
    ece,
    ece_floor,
    fit_temperature,
    reliability,
)


def _overconfident(n: int = 4000, classes: int = 4, true_t: float = 3.0, seed: int = 0) -> Events:
    """Labels drawn from softmax(z); the model reports z * true_t (over-confident by true_t)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return Events(z * true_t, y)


def test_fit_recovers_the_over_confidence_and_lowers_ece():
    ev = _overconfident()
    t = fit_temperature(ev)
    assert t == pytest.approx(3.0, rel=0.1)
    before, after = ece(*confidences(ev)), ece(*confidences(ev, t))
    assert before > 0.1 and after < 0.3 * before
    # no label changes: argmax of logits / T is argmax of logits
    assert torch.equal((ev.logits / t).argmax(-1), ev.logits.argmax(-1))


def test_multilabel_events_fit_per_label_sigmoids():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3000, 3, generator=g) * 2
    y = torch.bernoulli(torch.sigmoid(z), generator=g)
    ev = Events(z * 2.5, y, multi=True)
    t = fit_temperature(ev)
    assert t == pytest.approx(2.5, rel=0.1)
    assert ece(*confidences(ev, t)) < 0.5 * ece(*confidences(ev))


def test_ece_by_hand():
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    # bin (0.933, 1.0]: |0.5 - 0.95| * 2/4; bin (0.533, 0.6]: |1.0 - 0.55| * 2/4
    assert ece(conf, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert [b["n"] for b in reliability(conf, correct)] == [2, 2]


def test_ece_floor_is_what_a_perfectly_calibrated_model_scores_on_a_split_this_size():
    """Outcomes drawn right with probability their confidence: their ECE sits near the floor, an
    over-confident model's far above it, and the floor shrinks as the split grows (about 1/sqrt(n))."""
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, 900)
    floor = ece_floor(conf)
    assert 0.01 < floor < 0.05
    honest = [ece(conf, rng.random(900) < conf) for _ in range(50)]
    assert 0.5 * floor < float(np.median(honest)) < 1.5 * floor
    assert ece(conf, rng.random(900) < conf - 0.15) > 4 * floor  # 15 points over-confident
    big = ece_floor(np.tile(conf, 16))
    assert 0.15 * floor < big < 0.4 * floor  # 16x the rows: about a quarter of the floor
    assert ece_floor(conf) == floor  # seeded
    assert ece_floor(np.array([])) == 0.0


def test_calibrate_sets_temperatures_and_the_predictor_uses_them(tiny_artifact, quick_data, tmp_path):
    """On the tiny model and the quick tasks: one temperature per scored task, stored in the saved
    manifest; the predictor's scores become softmax(logits / T) and the labels do not move."""
    from mtl.model import MultiTaskModel
    from mtl.predictor import Predictor

    _, data = quick_data
    model, tok = MultiTaskModel.load(tiny_artifact)
    val = {t: d.splits["validation"][:24] for t, d in data.items()}
    test = {t: d.splits["test"][:12] for t, d in data.items()}
    res = calibrate(model, tok, val, test, batch_size=32, plots=tmp_path)
    assert set(res) == {"intent", "slots", "sentiment", "topic"}
    for r in res.values():
        # the fit minimises validation NLL (ECE usually follows; on an untrained model it need not)
        assert 0.05 <= r["temperature"] <= 20 and r["validation_nll_after"] <= r["validation_nll_before"] + 1e-6
        assert (tmp_path / f"reliability_{list(res).pop()}.png").stat().st_size > 1000
    model.save(tmp_path / "calibrated", tok)
    manifest = json.loads((tmp_path / "calibrated" / "manifest.json").read_text())
    assert {t["name"]: t["temperature"] for t in manifest["tasks"]} == {t: r["temperature"] for t, r in res.items()}
    texts = ["show me flights from boston to denver", "a dull, lifeless film"]
    raw, cal = Predictor.load(tiny_artifact, device="cpu").predict(texts), \
        Predictor.load(tmp_path / "calibrated", device="cpu").predict(texts)
    for a, b in zip(raw, cal):
        assert a["intent"]["label"] == b["intent"]["label"] and a["slots"]["tags"] == b["slots"]["tags"]
    p = Predictor.load(tmp_path / "calibrated", device="cpu")
    [o] = p.predict(texts[:1], ["intent"])
    from mtl.encoding import tokenize_words

    enc = tokenize_words(p.tokenizer, [texts[0].split()], p.model.tasks["intent"].max_length, padding="longest")
    with torch.no_grad():
        z = p.model(torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"]), ["intent"])["intent"][0]
    assert o["intent"]["score"] == pytest.approx(float(torch.softmax(z / res["intent"]["temperature"], -1).max()), abs=1e-6)

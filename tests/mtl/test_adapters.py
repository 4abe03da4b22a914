"""Per-task LoRA adapters (mtl.adapters) on a tiny dropout-free BERT: the adapted task's own path,
every other task untouched bit for bit, the artifact round trip, training that moves only the
adapter and head, and the ONNX graph's parity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_engine import TASKS, make_arrays

from mtl.engine import Engine, EngineConfig
from mtl.model import MultiTaskModel, TaskInfo

LORA = {"type": "lora", "rank": 4, "alpha": 8.0, "layers": 1}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from conftest import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("lora-bert"), seed=0, dropout=0.0)


@pytest.fixture(scope="module")
def batch(encoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(encoder))
    enc = tok(["show me flights to boston tomorrow", "a dull and boring film", "cash"], padding=True,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def models(encoder, adapter=LORA):
    """The same encoder and heads twice: without and with an adapter on ``sentiment``."""
    tasks = [TASKS["sentiment"], TASKS["cities"]]
    plain = MultiTaskModel.from_encoder(encoder, tasks, seed=3).eval()
    adapted_tasks = [dataclasses.replace(TASKS["sentiment"], adapter=adapter), TASKS["cities"]]
    adapted = MultiTaskModel.from_encoder(encoder, adapted_tasks, seed=3).eval()
    adapted.heads.load_state_dict(plain.heads.state_dict())
    return plain, adapted


def randomise(model: MultiTaskModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_a_fresh_adapter_is_the_shared_path_and_a_trained_one_moves_only_its_task(encoder, batch):
    plain, adapted = models(encoder)
    assert sorted(adapted.adapters["sentiment"].lora) == ["1_query", "1_value"]  # the top layer of two
    with torch.no_grad():
        want, got = plain(*batch), adapted(*batch)
        assert torch.allclose(got["sentiment"], want["sentiment"], atol=1e-6)  # B = 0: no update yet
        randomise(adapted)
        moved = adapted(*batch)
        alone = adapted(*batch, ["cities"])
    assert not torch.allclose(moved["sentiment"], want["sentiment"], atol=1e-3)
    assert torch.equal(moved["cities"], want["cities"])  # the other task: bit for bit
    assert torch.equal(alone["cities"], want["cities"])
    assert [p.shape for p in adapted.adapters["sentiment"].lora["1_query"].parameters()] == [
        torch.Size([4, 32]), torch.Size([32, 4])]


def test_when_only_adapted_tasks_are_asked_the_shared_pass_stops_below_them(encoder, batch):
    """Nobody reads the shared pass's top when every task asked for has its own adapter: the layers
    from the lowest adapted one up run once (the adapter's own run), not twice, and the answers are
    those of the full pass, bit for bit."""
    from mtl.adapters import encoder_layers

    def layer_calls(model, *names):
        """``model``'s answers to ``names`` (all tasks when none) and how often each layer ran."""
        calls = [0] * len(encoder_layers(model.encoder))
        handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, layer in enumerate(encoder_layers(model.encoder))]
        try:
            with torch.no_grad():
                return model(*batch, list(names) or None), calls
        finally:
            for h in handles:
                h.remove()

    # layers adapted -> how often each of the 2 layers runs with cities asked too, and sentiment alone
    for layers, with_cities, alone_calls in ((1, [1, 2], [1, 1]), (2, [2, 2], [1, 1])):
        _, adapted = models(encoder, {**LORA, "layers": layers})
        randomise(adapted)
        both, calls = layer_calls(adapted)
        assert calls == with_cities  # cities reads the shared pass: it runs to the top
        alone, calls = layer_calls(adapted, "sentiment")
        # one run per layer: the shared pass stops at the adapter's first layer (at full depth it
        # does not run at all) and the adapter's own run does the rest
        assert calls == alone_calls
        assert torch.equal(alone["sentiment"], both["sentiment"])


def test_targets_all_updates_every_linear_map_of_the_layer_on_its_task_only(encoder, batch, tmp_path):
    """``targets: all``: LoRA on query, key, value, the attention output and both feed-forward maps;
    a fresh one is the shared path, a trained one moves its task only, and it survives the artifact."""
    from transformers import AutoTokenizer

    plain, adapted = models(encoder, {**LORA, "targets": "all"})
    lora = adapted.adapters["sentiment"].lora
    assert sorted(lora) == ["1_attention_output_dense", "1_attention_self_key", "1_attention_self_query",
                            "1_attention_self_value", "1_intermediate_dense", "1_output_dense"]
    # tiny BERT: hidden 32, feed-forward 64 (conftest): A is rank x in, B is out x rank
    assert [tuple(lora[k].A.shape) + tuple(lora[k].B.shape) for k in ("1_intermediate_dense", "1_output_dense")] == [
        (4, 32, 64, 4), (4, 64, 32, 4)]
    with torch.no_grad():
        want = plain(*batch)
        assert torch.allclose(adapted(*batch)["sentiment"], want["sentiment"], atol=1e-6)
        randomise(adapted)
        moved = adapted(*batch)
        lora["1_intermediate_dense"].B.zero_()  # the feed-forward maps' updates count too
        partial = adapted(*batch)
    assert not torch.allclose(moved["sentiment"], want["sentiment"], atol=1e-3)
    assert not torch.allclose(partial["sentiment"], moved["sentiment"], atol=1e-4)
    assert torch.equal(moved["cities"], want["cities"])
    adapted.save(tmp_path / "model", AutoTokenizer.from_pretrained(str(encoder)))
    loaded, _ = MultiTaskModel.load(tmp_path / "model")
    assert loaded.tasks["sentiment"].adapter["targets"] == "all"
    with torch.no_grad():
        assert torch.equal(loaded(*batch)["sentiment"], partial["sentiment"])
    with pytest.raises(ValueError, match="adapter targets must be 'qv' or 'all'"):
        models(encoder, {**LORA, "targets": "ffn"})


def test_adapters_survive_the_artifact_round_trip(encoder, batch, tmp_path):
    from transformers import AutoTokenizer

    _, adapted = models(encoder)
    randomise(adapted)
    adapted.save(tmp_path / "model", AutoTokenizer.from_pretrained(str(encoder)))
    assert (tmp_path / "model" / "adapters.safetensors").is_file()
    loaded, _ = MultiTaskModel.load(tmp_path / "model")
    assert loaded.tasks["sentiment"].adapter == LORA
    with torch.no_grad():
        a, b = adapted(*batch), loaded(*batch)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_training_with_an_adapter_on_a_frozen_model_moves_only_the_adapter_and_head(encoder):
    """add-task's setting: encoder and old heads frozen; the new task's adapter and head learn."""
    from transformers import AutoTokenizer

    arrays = make_arrays(AutoTokenizer.from_pretrained(str(encoder)), ["sentiment", "cities"])
    base = MultiTaskModel.from_encoder(encoder, [TASKS["cities"]], seed=3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = base.add_tasks([dataclasses.replace(TASKS["sentiment"], adapter={"type": "lora", "rank": 8, "alpha": 16.0, "layers": 2})], seed=5)
    model.freeze_except(["sentiment"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"adapters.sentiment.lora.{i}_{p}.{m}" for i in (0, 1) for p in ("query", "value")
                         for m in "AB"] + ["heads.sentiment.out.bias", "heads.sentiment.out.weight"]
    engine = Engine(model, {"sentiment": arrays["sentiment"]},
                    EngineConfig(max_steps=80, batch_size=16, lr=1e-2, head_lr=3e-2, warmup_ratio=0.0,
                                 eval_every=80, patience=None, seed=7), tasks=["sentiment"])
    metrics = engine.fit()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # encoder and the old head
    assert float(model.adapters["sentiment"].lora["1_value"].B.detach().abs().sum()) > 0  # it learned
    # 0.80 here; the head alone on this random frozen encoder reaches 0.73 in the same steps
    assert metrics["validation"]["sentiment"]["accuracy"] >= 0.75


def test_fsdp_with_an_adapter_is_refused_naming_the_field():
    from mtl.config import ConfigError, config_from_dict

    task = {"name": "a", "kind": "sequence_classification", "source": {"type": "bbc"}, "adapter": "lora"}
    assert config_from_dict({"tasks": [task]}).tasks[0].adapter.model_dump() == {
        "type": "lora", "rank": 8, "alpha": 16.0, "layers": 2, "targets": "qv"}
    with pytest.raises(ConfigError, match=r"tasks\.0\.adapter: a LoRA adapter needs train\.strategy: ddp"):
        config_from_dict({"train": {"strategy": "fsdp"}, "tasks": [task]})


def test_an_adapter_deeper_than_the_encoder_is_refused(encoder):
    with pytest.raises(ValueError, match=r"adapter layers must be 1\.\.2"):
        MultiTaskModel.from_encoder(encoder, [TaskInfo("s", "sequence_classification", ["a", "b"],
                                                       adapter={"type": "lora", "layers": 3})])


@pytest.mark.parametrize("targets", ["qv", "all"])
def test_onnx_graph_of_an_adapted_model_gives_the_torch_answers(encoder, batch, tmp_path, targets):
    pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer

    from mtl.onnx_backend import load_onnx

    _, adapted = models(encoder, {**LORA, "layers": 2, "targets": targets})
    randomise(adapted)
    adapted.save(tmp_path / "model", AutoTokenizer.from_pretrained(str(encoder)))
    model, _ = MultiTaskModel.load(tmp_path / "model")
    onnx_model = load_onnx(tmp_path / "model", model)
    with torch.no_grad():
        want = model(*batch)
    got = onnx_model(*batch, list(want))
    for t in want:
        assert torch.allclose(got[t], want[t], atol=1e-4), t

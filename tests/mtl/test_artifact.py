"""Acceptance check: the model artifact. Saved in this process, loaded in a fresh one, it gives the
same logits for every task kind; it holds no pickle; its manifest describes every task."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mtl.encoding import tokenize_words
from mtl.model import FORMAT, MultiTaskModel, TaskInfo, read_manifest

REPO = Path(__file__).resolve().parents[2]
TASKS = [
    TaskInfo("intent", "sequence_classification", ["atis_airfare", "atis_flight", "atis_airline"], 32),
    TaskInfo("slots", "token_classification", ["O", "B-toloc.city_name", "I-toloc.city_name"], 32),
    TaskInfo("tags", "multi_label", ["cheap", "direct"], 24, pooling="cls", head_dropout=0.3),
    TaskInfo("score", "regression", [], 16),
]
TEXTS = ["show me flights to san francisco", "cheapest fare", "is there a direct flight to new york tonight"]

LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from mtl.model import MultiTaskModel
    from mtl.encoding import tokenize_words
    torch.set_num_threads(1)
    artifact, inputs, out = sys.argv[1:4]
    model, tokenizer = MultiTaskModel.load(artifact)
    assert not model.training
    x = load_file(inputs)
    texts = open(inputs + ".txt").read().split("\\n")
    enc = tokenize_words(tokenizer, [t.split() for t in texts], 32, padding="longest")
    with torch.inference_mode():
        logits = model(x["input_ids"], x["attention_mask"])
    logits["tokenized_ids"] = torch.tensor(enc["input_ids"])
    save_file({k: v.contiguous() for k, v in logits.items()}, out)
    print("MODULES", sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow")))
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_encoder):
    model = MultiTaskModel.from_encoder(tiny_encoder, TASKS, seed=3).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder))
    path = model.save(tmp_path_factory.mktemp("artifact") / "model", tokenizer, extra={"run": "t"})
    return model, tokenizer, path


def test_fresh_process_gives_identical_logits(saved, tmp_path):
    model, tokenizer, path = saved
    enc = tokenize_words(tokenizer, [t.split() for t in TEXTS], 32, padding="longest")
    inputs = {"input_ids": torch.tensor(enc["input_ids"]), "attention_mask": torch.tensor(enc["attention_mask"])}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "inputs.safetensors.txt").write_text("\n".join(TEXTS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            expected = model(**inputs)
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODULES []" in proc.stdout  # loading needs neither Ray nor MLflow
    got = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(got.pop("tokenized_ids"), inputs["input_ids"])  # the saved tokenizer is the same
    assert set(got) == {t.name for t in TASKS}
    n = len(TEXTS)
    length = inputs["input_ids"].shape[1]
    assert expected["intent"].shape == (n, 3)
    assert expected["slots"].shape == (n, length, 3)
    assert expected["tags"].shape == (n, 2)
    assert expected["score"].shape == (n, 1)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype
        assert torch.equal(got[name], value), name


def test_in_process_load_matches_and_is_strict(saved, tmp_path):
    model, _, path = saved
    loaded, tok = MultiTaskModel.load(path)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert {n: (t.kind, t.labels, t.max_length, t.pooling, t.head_dropout) for n, t in loaded.tasks.items()} == {
        t.name: (t.kind, t.labels, t.max_length, t.pooling, t.head_dropout) for t in TASKS}
    assert loaded.heads["tags"].pooling == "cls"
    assert tok("new york")["input_ids"] == AutoTokenizer.from_pretrained(str(path / "tokenizer"))("new york")["input_ids"]


def test_artifact_has_no_pickle_and_a_manifest(saved):
    _, _, path = saved
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], files
    assert {"manifest.json", "heads.safetensors", "encoder/config.json", "encoder/model.safetensors",
            "tokenizer/tokenizer.json"} <= set(files)
    for f in files:  # no pickle stream anywhere (pickle protocol 2+ starts with 0x80)
        head = (path / f).read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == FORMAT == "mtl-ray/1"
    assert manifest["max_length"] == 32 and manifest["run"] == "t"
    assert [(t["name"], t["kind"], t["labels"]) for t in manifest["tasks"]] == [
        (t.name, t.kind, t.labels) for t in TASKS]
    heads = load_file(str(path / "heads.safetensors"))
    assert set(heads) == {f"{t.name}.out.{p}" for t in TASKS for p in ("weight", "bias")}
    assert heads["slots.out.weight"].shape == (3, 32)


def test_not_an_artifact(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not an mtl-ray model artifact"):
        read_manifest(tmp_path)
    _, _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "mtl-ray/0"}))
    with pytest.raises(ValueError, match="format 'mtl-ray/0', this version reads 'mtl-ray/1'"):
        read_manifest(tmp_path)


def test_a_relative_artifact_path_is_made_absolute(saved, monkeypatch):
    """A local artifact given relative to the caller's directory (``add-task --base runs/x/model``)
    comes back absolute: Ray workers and Serve replicas, which get the path, run elsewhere."""
    from mtl.registry import local_artifact

    _, _, path = saved
    monkeypatch.chdir(path.parent)
    got = local_artifact(path.name)
    assert got.is_absolute() and got == path.absolute()
    monkeypatch.chdir("/")
    assert (got / "manifest.json").exists()


def test_fetching_a_registered_model_leaves_mlflows_global_uris_alone(saved, tmp_path):
    """``local_artifact(models:/..., tracking_uri)`` reads that registry for this call only: it used
    to set MLflow's process-wide tracking and registry URIs, so a later lookup that relied on the
    defaults (another test's, or a user's) read the wrong database."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mtl.registry import local_artifact

    uri = f"sqlite:///{tmp_path}/registry.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-fetch")
    path = saved[2]
    client.create_model_version("tiny-fetch", source=str(path))
    client.set_registered_model_alias("tiny-fetch", "champion", "1")
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    got = local_artifact("models:/tiny-fetch@champion", uri, dst=str(tmp_path / "fetched"))
    assert read_manifest(got) == read_manifest(path)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before

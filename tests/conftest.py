"""Shared fixtures: a tiny randomly initialised BERT built at test time, small synthetic tasks,
and one local Ray per test session (Ray start-up costs seconds)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Object storage in tests is the S3-compatible server started below on 127.0.0.1 (moto). Dummy
# credentials are set before any Ray process starts, so Ray workers inherit them too, and no
# test can reach a real cloud account or its metadata service.
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_key] = _value


# sys.path as pytest left it after collecting (before any test ran: loading an MLflow pyfunc
# in-process puts the model's code folder first); tests/test_imports.py checks imports against it
SESSION_SYS_PATH: list[str] = []


def pytest_collection_finish(session):
    SESSION_SYS_PATH[:] = sys.path


def pytest_addoption(parser):
    parser.addoption("--run-extended", action="store_true",
                     help="also run the extended integration tests (minutes each: a fresh virtual "
                          "environment, the pipeline as a job on a `ray start` cluster)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-extended"):
        return
    skip = pytest.mark.skip(reason="extended integration test (minutes): pytest --run-extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def build_tiny_encoder(path: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A BERT with hidden 32, 2 layers, 2 heads, intermediate 64 and the MiniLM tokenizer,
    saved with save_pretrained (about 1 M parameters, mostly the embedding table)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mtl.packages import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (4 logical CPUs so Ray Data runs beside workers)."""
    from pipelines.ray_utils import init_ray

    ray = init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with a free port; yields a function making a bucket and
    returning ``s3://<bucket>/<prefix>?endpoint_override=...`` (pyarrow's options in the URI)."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    s3 = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                         allow_bucket_creation=True)

    def bucket_uri(bucket: str, prefix: str = "") -> str:
        s3.create_dir(bucket)
        return f"s3://{bucket}/{prefix}?{query}"

    yield bucket_uri
    server.stop()


QUICK_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"


@pytest.fixture(scope="session")
def quick_data():
    """The quick config's four embedded tasks, read and split (no Ray)."""
    from mtl.config import load_config
    from pipelines.data import read_tasks

    cfg = load_config(QUICK_CONFIG)
    return cfg, read_tasks(cfg)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_encoder, quick_data) -> Path:
    """An untrained tiny multi-task model with the four embedded tasks' label sets, saved as an artifact."""
    from transformers import AutoTokenizer

    from mtl.model import MultiTaskModel
    from pipelines.data import task_infos

    cfg, data = quick_data
    model = MultiTaskModel.from_encoder(tiny_encoder, task_infos(cfg, data), seed=0)
    path = tmp_path_factory.mktemp("artifact") / "model"
    model.save(path, AutoTokenizer.from_pretrained(str(tiny_encoder)))
    return path


class PoisonedModel:
    """Wraps a MultiTaskModel; its forward raises when the marked token id is in the batch, like a
    head or tokenizer edge case that breaks a whole pass. ``calls`` counts forward passes."""

    def __init__(self, model, poison_id: int, exc: type[Exception] = IndexError):
        self.inner, self.poison_id, self.exc, self.calls = model, poison_id, exc, 0
        self.tasks, self.kinds = model.tasks, model.kinds

    def parameters(self):
        return self.inner.parameters()

    def to(self, device):
        self.inner.to(device)
        return self

    def eval(self):
        self.inner.eval()
        return self

    def __call__(self, ids, mask, names):
        self.calls += 1
        if (ids == self.poison_id).any():
            raise self.exc("boom")
        return self.inner(ids, mask, names)


@pytest.fixture(scope="session")
def poisoned_model():
    return PoisonedModel


def roundtrip(obj):
    """``obj`` as it comes back through JSON, with every float matched to 1e-5 relative: labels,
    tags, spans and structure must be equal; scores may differ in the last float digits, since the
    replica's torch thread count (and so the order of sums) need not be the test process's."""
    def approx(x):
        if isinstance(x, float):
            return pytest.approx(x, rel=1e-5, abs=1e-7)
        if isinstance(x, dict):
            return {k: approx(v) for k, v in x.items()}
        if isinstance(x, list):
            return [approx(v) for v in x]
        return x
    return approx(json.loads(json.dumps(obj)))

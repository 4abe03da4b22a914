"""The trainer on a real local Ray with a tiny, dropout-free BERT and two learnable synthetic tasks.

Fits cost ~30 s each here (worker group start-up), so the module shares a handful of runs:
DDP×2 (with MLflow), FSDP×2, DDP×1 at the same global batch, and a run whose worker dies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mtl.config import config_from_dict

pytestmark = pytest.mark.slow

FILLER = ("the a flight show me list what is on for to and please i want need some info about "
          "today tomorrow morning evening cheap fast early late one two three").split()
POSITIVE = ["great", "excellent", "wonderful", "superb"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful"]
CITIES = [["boston"], ["denver"], ["dallas"], ["new", "york"], ["san", "francisco"], ["atlanta"]]
MAX_STEPS = 60
EVALS = [15, 30, 45, 60]


def _sentence(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def write_synthetic(root: Path, n: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """A keyword sentiment CSV (label decided by one keyword) and a CoNLL file of city BIO tags."""
    rng = random.Random(seed)
    csv_path, conll_path = root / "sentiment.csv", root / "cities.conll"
    lines = ["text,label"]
    for _ in range(n):
        words = _sentence(rng, rng.randint(4, 9))
        label = rng.choice(["pos", "neg"])
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        lines.append(f"{' '.join(words)},{label}")
    csv_path.write_text("\n".join(lines) + "\n")
    blocks = []
    for _ in range(n):
        words = _sentence(rng, rng.randint(3, 7))
        tags = ["O"] * len(words)
        for _ in range(rng.randint(1, 2)):
            city = rng.choice(CITIES)
            at = rng.randrange(len(words) + 1)
            words[at:at] = city
            tags[at:at] = ["B-city"] + ["I-city"] * (len(city) - 1)
        blocks.append("\n".join(f"{w}\t{t}" for w, t in zip(words, tags)))
    conll_path.write_text("\n\n".join(blocks) + "\n")
    return csv_path, conll_path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from conftest import build_tiny_encoder

    root = tmp_path_factory.mktemp("synth")
    csv_path, conll_path = write_synthetic(root)
    encoder = build_tiny_encoder(root / "encoder", seed=0, dropout=0.0)
    return root, csv_path, conll_path, encoder


def make_config(synth, tmp: Path, **train) -> object:
    root, csv_path, conll_path, encoder = synth
    raw = {
        "name": "synthetic",
        "output_dir": str(tmp / "runs"),
        "seed": 3,
        "model": {"encoder": str(encoder), "max_length": 24},
        "tasks": [
            {"name": "sentiment", "kind": "sequence_classification", "head_dropout": 0.0,
             "source": {"type": "csv", "path": str(csv_path)}},
            {"name": "cities", "kind": "token_classification", "head_dropout": 0.0,
             "source": {"type": "conll", "path": str(conll_path)}},
        ],
        "train": {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 16, "max_steps": MAX_STEPS,
                  "eval_every": 15, "lr": 3e-3, "head_lr": 3e-3, "warmup_ratio": 0.1,
                  "sampling": "round_robin", "patience": None, "seed": 7, "max_failures": 2, "log_every": 5,
                  **train},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "synthetic"},
    }
    return config_from_dict(raw)


def history(summary) -> list[dict]:
    """One record per evaluation, as the workers' engine kept it (``RunResult.history``)."""
    return summary.history


@pytest.fixture(scope="module")
def ddp2(synth, tmp_path_factory, ray_session):
    """2-worker DDP as configured by default: each worker streams its own shard of every task;
    each row a worker trained on is recorded under ``tmp/rows``."""
    import faults
    from ray import cloudpickle

    from pipelines.train import run_training

    cloudpickle.register_pickle_by_value(faults)  # workers cannot import the test folder
    tmp = tmp_path_factory.mktemp("ddp2")
    (tmp / "rows").mkdir()
    cfg = make_config(synth, tmp)
    assert cfg.train.data_sharding == "streaming"
    return cfg, run_training(cfg, callbacks=[faults.RecordRows(str(tmp / "rows"))]), tmp


@pytest.fixture(scope="module")
def ddp1(synth, tmp_path_factory, ray_session):
    from pipelines.train import run_training

    tmp = tmp_path_factory.mktemp("ddp1")
    cfg = make_config(synth, tmp, num_workers=1, cpus_per_worker=1, data_sharding="replicated")
    return cfg, run_training(cfg), tmp


def test_ddp_two_workers_learns(ddp2):
    cfg, summary, _ = ddp2
    hist = history(summary)
    assert [h["step"] for h in hist] == EVALS
    for task in ("sentiment", "cities"):
        assert hist[-1][f"train/loss/{task}"] < 0.7 * hist[0][f"train/loss/{task}"], task
    # chance is 0.5 for the keyword task and ~0 entity F1 for the tagger
    assert summary.test_metrics["sentiment"]["accuracy"] >= 0.9
    assert summary.test_metrics["cities"]["f1"] >= 0.8
    assert summary.steps == MAX_STEPS


def epoch_rows(rows_dir: Path, task: str, world: int = 2) -> list[list[int]]:
    """Each rank's training-row ids of the first epoch of ``task`` (``faults.RecordRows``' files)."""
    out = []
    for rank in range(world):
        drawn = (rows_dir / f"rank{rank}-{task}.txt").read_text().split()
        out.append([int(x.split(":")[1]) for x in drawn if x.startswith("0:")])
    return out


def check_shards_cover_the_split(shards: list[list[int]], train_ids: list[int]) -> None:
    """Equal shards that share no row and together are the whole split (but for the ``n mod world``
    rows an equal split leaves out). Ids are a hash of text and label, so exact duplicate rows share
    one: compared as multisets."""
    from collections import Counter

    n, world = len(train_ids), len(shards)
    assert [len(s) for s in shards] == [n // world] * world
    union = sum((Counter(s) for s in shards), Counter())
    assert not union - Counter(train_ids), "a row trained more often than the split holds it"
    assert sum(union.values()) == n - n % world


def test_streamed_shards_are_disjoint_and_cover_the_split(ddp2):
    """Over the first epoch of each task the two workers' training rows share nothing and
    together are the whole training split."""
    from pipelines.data import read_tasks

    cfg, summary, tmp = ddp2
    data = read_tasks(cfg)
    for task in ("sentiment", "cities"):
        check_shards_cover_the_split(epoch_rows(tmp / "rows", task), [r["idx"] for r in data[task].rows("train")])


@pytest.mark.extended  # the 2-worker FSDP fit is about 140 s; keeps make test near its 15-minute budget: .ci/run runs it
def test_one_and_two_workers_agree_at_same_global_batch(ddp1, fsdp2_run):
    """``data_sharding: replicated``: 1 DDP worker and 2 FSDP workers take the same global batches
    (each worker takes rows[rank::2] of the same batch): over the first 30 steps the per-task
    window losses agree to 1e-3 (sentence task) and 1e-2 (tagger) relative. Exact equality is not
    expected: the tagger's loss is a mean over each worker's tokens rather than over the global
    batch's, and all-reduce sums in another order; training then amplifies the difference (seen:
    2e-4 at step 15, 3e-3 at step 60), so later windows are not compared. FSDP shards parameters,
    not the arithmetic. (Streamed shards differ by worker count, so they are not compared here.)"""
    h1, h2 = history(ddp1[1]), history(fsdp2_run)
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == EVALS
    for a, b in zip(h1[:2], h2[:2]):
        assert a["train/loss/sentiment"] == pytest.approx(b["train/loss/sentiment"], rel=1e-3)
        assert a["train/loss/cities"] == pytest.approx(b["train/loss/cities"], rel=1e-2)
    assert ddp1[1].test_metrics["sentiment"]["accuracy"] >= 0.9


def test_seeded_first_losses_are_pinned(ddp1):
    """A silent change of numerics (init, data order, sampling, loss, schedule) changes these
    numbers. Pinned on torch 2.13.0+cpu, one worker, one thread."""
    hist = history(ddp1[1])
    assert hist[0]["train/loss/sentiment"] == pytest.approx(PINNED["sentiment"], rel=1e-5)
    assert hist[0]["train/loss/cities"] == pytest.approx(PINNED["cities"], rel=1e-5)


def test_engine_alone_gives_the_pinned_losses(synth, tmp_path):
    """The same first window without Ray: the engine in this process on the rows Ray Data would
    tokenize (``pipelines.data.Tokenize``), so the Ray glue adds nothing to the numerics."""
    import torch

    from benchmarks.common import tokenize_arrays
    from mtl.engine import Engine, EngineConfig
    from mtl.model import MultiTaskModel
    from pipelines.data import read_tasks, task_infos

    cfg = make_config(synth, tmp_path, num_workers=1)
    data = read_tasks(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = MultiTaskModel.from_encoder(synth[3], task_infos(cfg, data), seed=cfg.train.seed)
        engine = Engine(model, tokenize_arrays(cfg, data),
                        EngineConfig.from_train(cfg.train, task_weights={t.name: t.weight for t in cfg.tasks}))
        for _ in range(cfg.train.eval_every):
            engine.train_step()
        window = engine.end_window()
    finally:
        torch.set_num_threads(threads)
    for task in PINNED:
        assert window[f"train/loss/{task}"] == pytest.approx(PINNED[task], rel=1e-5)


# Re-pinned when the schedule became transformers' get_linear_schedule_with_warmup: its warm-up
# starts at lr 0 (step/warmup) where the hand-written one started at 1/warmup ((step+1)/warmup),
# so the first 6 steps take smaller steps. The old values (0.7082652524113655, 0.5266492090054921)
# were reproduced to 1e-8 by the engine with the old schedule swapped in.
# Re-pinned again when file sources moved to Ray Data reads (issue 13): a single path is now split
# by a hash of each text instead of a seeded stratified shuffle, and rows carry a hash idx (the
# arrays' order), so the training split and the batch order changed; the engine did not. The values
# before that change: (0.7333222031593323, 0.572321640593665).
PINNED = {"sentiment": 0.6829265281558037, "cities": 0.5983226427010128}


@pytest.fixture(scope="module")
def fsdp2_run(synth, tmp_path_factory, ray_session):
    from pipelines.train import run_training

    cfg = make_config(synth, tmp_path_factory.mktemp("fsdp2"), strategy="fsdp", data_sharding="replicated")
    return run_training(cfg)


@pytest.mark.extended  # shares the FSDP fit above (the engine's FSDP tests stay in make test)
def test_fsdp_two_workers_learns(fsdp2_run):
    from mtl.model import MultiTaskModel

    summary = fsdp2_run
    hist = history(summary)
    assert hist[-1]["train/loss/sentiment"] < 0.7 * hist[0]["train/loss/sentiment"]
    assert summary.test_metrics["sentiment"]["accuracy"] >= 0.9
    # the FSDP checkpoint is a plain artifact
    model, _ = MultiTaskModel.load(summary.model_dir)
    assert set(model.heads) == {"sentiment", "cities"}


def test_mlflow_run_holds_params_curves_reports_plots_and_model(ddp2):
    from mlflow.tracking import MlflowClient

    cfg, summary, tmp = ddp2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003"
    assert run.data.params["tasks.1.kind"] == "token_classification"
    curve = client.get_metric_history(run.info.run_id, "val/sentiment/accuracy")
    assert sorted(m.step for m in curve) == EVALS
    assert run.data.metrics["test/cities/f1"] == pytest.approx(summary.test_metrics["cities"]["f1"])
    # the training-loss curve has a point every log_every=5 steps (mean since the previous point);
    # weighted by how often round_robin drew the task, the points of steps 1-15 give exactly the
    # evaluation window's mean loss that the run's history holds for step 15
    from mtl.sampling import TaskSampler

    sampler = TaskSampler(["sentiment", "cities"], [1, 1], "round_robin")
    hist = history(summary)
    for task in ("sentiment", "cities"):
        points = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"train/loss/{task}")}
        assert sorted(points) == list(range(5, MAX_STEPS + 1, 5)), task
        drawn = {end: sum(task in sampler.tasks_for_step(s) for s in range(end - 5, end)) for end in (5, 10, 15)}
        window = sum(points[e] * n for e, n in drawn.items()) / sum(drawn.values())
        assert window == pytest.approx(hist[0][f"train/loss/{task}"], rel=1e-6), task
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"reports", "plots", "model_card.md", "config.yaml"} <= files
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    # confusion matrix for the sentence task (the token task has entity reports, no matrix), and a
    # reliability diagram per calibrated task
    assert plots == {"plots/confusion_sentiment.png", "plots/reliability_sentiment.png",
                     "plots/reliability_cities.png"}
    for task in ("sentiment", "cities"):  # temperature fitted on validation, ECE before/after on test
        cal = summary.calibration[task]
        assert run.data.metrics[f"calibration/{task}/temperature"] == pytest.approx(cal["temperature"])
        assert run.data.metrics[f"calibration/{task}/test_ece_after"] == pytest.approx(cal["test_ece_after"])
        assert run.data.metrics[f"calibration/{task}/test_ece_floor"] == pytest.approx(cal["test_ece_floor"])
        assert 0 <= cal["test_ece_floor"] < 0.5  # 0 only where every confidence is 1
        assert cal["validation_nll_after"] <= cal["validation_nll_before"] + 1e-6
    manifest = json.loads((Path(summary.model_dir) / "manifest.json").read_text())
    assert {t["name"]: t["temperature"] for t in manifest["tasks"]} == \
        {t: c["temperature"] for t, c in summary.calibration.items()}
    reports = {f.path for f in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/sentiment.json", "reports/cities.json", "reports/cities.txt"} <= reports
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    local = mlflow.artifacts.download_artifacts(artifact_uri=summary.model_uri, dst_path=str(tmp / "dl"))
    assert list(Path(local).rglob("manifest.json")), "the logged model carries the artifact"


def test_workers_that_take_every_cpu_are_refused_at_once(synth, tmp_path, ray_session):
    """2 workers × 2 CPUs on the tests' 4-CPU Ray leave nothing for Ray Data's tokenize tasks: the
    run used to wait forever; now it is refused before any worker starts, naming the settings."""
    from pipelines.ray_utils import ResourceError
    from pipelines.train import run_training

    cfg = make_config(synth, tmp_path, cpus_per_worker=2)
    with pytest.raises(ResourceError) as err:
        run_training(cfg)
    msg = str(err.value)
    assert "needs 5 CPUs" in msg and "the Ray cluster has 4" in msg
    assert "train.cpus_per_worker" in msg and "data.cpus" in msg
    assert not list((tmp_path / "runs").rglob("train-*")), "nothing was started"


def test_killed_worker_resumes_from_last_checkpoint_in_object_storage(synth, tmp_path, ray_session, s3_server,
                                                                      ddp2):
    """``output_dir`` in object storage (S3 on 127.0.0.1): the workers write checkpoints there.
    Rank 1 dies at step 20; the last checkpoint is step 15; the group restarts from it, read back
    from S3, and finishes. Reported steps run 15, 30, 45, 60 once each: nothing before step 15 is
    redone. The run folder in S3 then holds the model, the summary and the checkpoints, and the
    model serves from its URI."""
    import faults
    from ray import cloudpickle

    from mtl import storage
    from mtl.predictor import Predictor
    from mtl.registry import local_artifact
    from pipelines.train import run_training

    cloudpickle.register_pickle_by_value(faults)  # workers cannot import the test folder
    flag = tmp_path / "crashed"
    cfg = make_config(synth, tmp_path)
    cfg.output_dir = s3_server("mtl-runs", "runs")
    summary = run_training(cfg, callbacks=[faults.CrashOnce(20, str(flag))])
    assert flag.read_text() == "20", "the worker did die"
    steps = [h["step"] for h in history(summary)]
    assert steps == EVALS
    assert summary.steps == MAX_STEPS
    # the example counter continued from the checkpoint: as many rows as the run that never died
    assert history(summary)[-1]["examples"] == history(ddp2[1])[-1]["examples"]

    assert summary.run_dir.startswith("s3://mtl-runs/runs/synthetic/train-")
    assert summary.model_dir == storage.join(summary.run_dir, "model")
    checkpoints = storage.list_dirs(storage.join(summary.run_dir, "ray"), "checkpoint_")
    assert len(checkpoints) == 2  # CheckpointConfig keeps the best and the latest
    remote = json.loads(storage.read_text(storage.join(summary.run_dir, "summary.json")))
    assert remote["test_metrics"] == summary.test_metrics
    assert storage.read_text(storage.join(summary.run_dir, "mlflow_run_id")) == summary.mlflow_run_id
    predictor = Predictor.load(local_artifact(summary.model_dir))
    assert set(predictor.model.tasks) == {"sentiment", "cities"}
    assert predictor.predict(["a truly excellent day"], ["sentiment"])[0]["sentiment"]["label"] in ("pos", "neg")


@pytest.mark.extended  # about 130 s (two fits); keeps make test under its 15-minute budget: .ci/run runs it
def test_early_stop_keeps_best_and_a_stopped_run_resumes(synth, tmp_path, ray_session):
    """With a learning rate of ~0 the objective never improves: patience 1 stops at the second
    evaluation and the kept model is the first one's. `--resume` then continues that run from its
    last checkpoint (step 30) to max_steps without redoing steps."""
    from mtl.model import read_manifest
    from pipelines.train import run_training

    cfg = make_config(synth, tmp_path, lr=1e-12, head_lr=1e-12, patience=1, num_workers=1)  # DDP: other tests
    first = run_training(cfg)
    assert [h["step"] for h in history(first)] == [15, 30]
    assert first.stopped_early is True and first.best_step == 15
    assert read_manifest(first.model_dir)["step"] == 15

    cfg.train.patience = None
    resumed = run_training(cfg, resume=True)
    assert resumed.run_dir == first.run_dir
    assert [h["step"] for h in history(resumed)] == EVALS
    assert resumed.steps == MAX_STEPS


@pytest.mark.extended  # about 160 s here (two fits, two publishes): opt-in, .ci/run runs it
def test_a_stopped_run_in_object_storage_resumes_on_a_new_machine(synth, tmp_path, ray_session, s3_server):
    """``--resume`` with ``output_dir`` in S3 (moto on 127.0.0.1) needs nothing but the bucket: the
    run stops on patience at step 30, the driver's staging folder is deleted (a new cluster), and the
    resumed run finds the run folder by listing the bucket, continues the same MLflow run and Ray
    Train run from the last checkpoint read back from S3, and trains steps 45 and 60 only."""
    import shutil

    from mtl import storage
    from mtl.storage import RunFolder
    from pipelines.train import run_training

    cfg = make_config(synth, tmp_path, lr=1e-12, head_lr=1e-12, patience=1, num_workers=1)
    cfg.output_dir = s3_server("mtl-resume", "runs")
    first = run_training(cfg)
    assert [h["step"] for h in history(first)] == [15, 30] and first.run_dir.startswith("s3://mtl-resume/")
    shutil.rmtree(RunFolder.staged(first.run_dir, cfg.name).local)

    cfg.train.patience = None
    resumed = run_training(cfg, resume=True)
    assert (resumed.run_dir, resumed.mlflow_run_id) == (first.run_dir, first.mlflow_run_id)
    assert [h["step"] for h in history(resumed)] == EVALS and resumed.steps == MAX_STEPS
    assert json.loads(storage.read_text(storage.join(resumed.run_dir, "summary.json")))["steps"] == MAX_STEPS


# ---------------------------------------------------------------- a shared input


def write_shared(root: Path, n: int = 400, seed: int = 1) -> Path:
    """One JSONL of sentences that both tasks label: tokens, city BIO tags and a keyword sentiment."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = _sentence(rng, rng.randint(3, 7))
        tags = ["O"] * len(words)
        city = rng.choice(CITIES)
        at = rng.randrange(len(words) + 1)
        words[at:at] = city
        tags[at:at] = ["B-city"] + ["I-city"] * (len(city) - 1)
        label = rng.choice(["pos", "neg"])
        at = rng.randrange(len(words) + 1)
        words.insert(at, rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        tags.insert(at, "O")
        lines.append(json.dumps({"tokens": words, "tags": tags, "sentiment": label}))
    path = root / "shared.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_shared_config(synth, tmp: Path, **train) -> object:
    """``make_config``'s two tasks labelling the same sentences: one input, ``synth``."""
    path = str(write_shared(tmp))
    raw = make_config(synth, tmp, **train).to_dict()
    raw["tasks"][0].update(input="synth", source={"type": "jsonl", "path": path, "columns": {"label": "sentiment"}})
    raw["tasks"][1].update(input="synth", source={"type": "jsonl", "path": path})
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def shared2(synth, tmp_path_factory, ray_session):
    """2 DDP workers streaming their shards of the shared input's training split, grouped by length
    (``train.group_by_length``); rank 1 dies at step 20 and the group resumes from the checkpoint of
    step 15."""
    import faults
    from ray import cloudpickle

    from pipelines.train import run_training

    cloudpickle.register_pickle_by_value(faults)
    tmp = tmp_path_factory.mktemp("shared2")
    cfg = make_shared_config(synth, tmp, group_by_length=True)
    assert cfg.train.data_sharding == "streaming" and cfg.train.group_by_length and cfg.inputs == {"synth": ["sentiment", "cities"]}
    return cfg, run_training(cfg, callbacks=[faults.CrashOnce(20, str(tmp / "crashed"))]), tmp


@pytest.mark.extended  # about 90-130 s (a 2-worker fit with a killed worker); the engine-level shared-input tests stay in make test: .ci/run runs it
def test_a_shared_input_streamed_learns_both_tasks_and_resumes(shared2):
    """One encoder pass per batch for both heads, streamed over 2 workers: both tasks learn to the
    floors of ``test_ddp_two_workers_learns``; the worker that died at step 20 resumed from step 15
    without redoing a reported step."""
    cfg, summary, tmp = shared2
    assert (tmp / "crashed").read_text() == "20"
    hist = history(summary)
    assert [h["step"] for h in hist] == EVALS and summary.steps == MAX_STEPS
    for task in ("sentiment", "cities"):
        assert hist[-1][f"train/loss/{task}"] < 0.7 * hist[0][f"train/loss/{task}"], task
    assert summary.test_metrics["sentiment"]["accuracy"] >= 0.9
    assert summary.test_metrics["cities"]["f1"] >= 0.8


@pytest.mark.extended  # about 45 s; keeps make test near its 15-minute budget: .ci/run runs it
def test_a_shared_input_replicated_gives_the_engines_losses(synth, tmp_path, ray_session):
    """``data_sharding: replicated``, 1 worker: the run's first window equals the engine alone on the
    arrays of ``TokenizeInput`` (``benchmarks.common.tokenize_arrays``), to 1e-5 as the pinned
    losses above: Ray Data and the glue add nothing to a shared input's numerics."""
    import torch

    from benchmarks.common import tokenize_arrays
    from mtl.engine import Engine, EngineConfig
    from mtl.model import MultiTaskModel
    from pipelines.data import read_tasks, task_infos
    from pipelines.train import run_training

    cfg = make_shared_config(synth, tmp_path, num_workers=1, data_sharding="replicated", max_steps=15)
    ray_window = history(run_training(cfg))[0]
    data = read_tasks(cfg)
    arrays = tokenize_arrays(cfg, data)
    assert set(arrays["synth"]["train"]) == {"idx", "input_ids", "attention_mask", "labels.sentiment", "labels.cities"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = MultiTaskModel.from_encoder(synth[3], task_infos(cfg, data), seed=cfg.train.seed)
        engine = Engine(model, arrays, EngineConfig.from_train(cfg.train, task_weights={t.name: t.weight for t in cfg.tasks}),
                        inputs=cfg.inputs)
        for _ in range(cfg.train.eval_every):
            engine.train_step()
        window = engine.end_window()
    finally:
        torch.set_num_threads(threads)
    assert engine.consumed == {"synth": 15}
    for task in ("sentiment", "cities"):
        assert ray_window[f"train/loss/{task}"] == pytest.approx(window[f"train/loss/{task}"], rel=1e-5)


def test_a_streamed_shard_grouped_by_length_keeps_its_rows_and_batch_count(ray_session):
    """``train.group_by_length`` on the streaming path: a worker's epoch from a real Ray Data shard
    has the same rows and the same number of batches (ranks stay in step), every column moved with
    its row, and far fewer computed tokens once each batch is trimmed to its longest row."""
    import numpy as np
    import ray

    from pipelines.sharding import _epochs

    n, width = 300, 24
    lengths = np.random.default_rng(0).integers(2, width + 1, size=n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ds = ray.data.from_items([{"idx": i, "input_ids": mask[i] * 5, "attention_mask": mask[i], "labels": i % 2}
                              for i in range(n)])
    shard = ds.iterator()
    plain = list(_epochs(shard, 8, 64, 13, 0, 0)(0))
    grouped = list(_epochs(shard, 8, 64, 13, 0, 0, group_by_length=True)(0))
    assert len(grouped) == len(plain) == 38  # ceil(300 / 8)
    assert sorted(np.concatenate([b["idx"] for b in grouped]).tolist()) == list(range(n))
    for b in grouped:
        assert np.array_equal(b["attention_mask"], mask[b["idx"]]) and np.array_equal(b["labels"], b["idx"] % 2)

    def computed(batches):
        return sum(len(b["idx"]) * int(b["attention_mask"].sum(1).max()) for b in batches)

    assert computed(grouped) < 0.7 * computed(plain)

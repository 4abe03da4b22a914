"""tune/sweep.py on a real local Ray and MLflow on SQLite, with the tiny encoder and two ATIS tasks,
driven the way ``mtl-ray tune`` drives it (``pipelines.tuning.run_tune``: this project's trainer
factory, then publishing): ASHA stops weak trials, one MLflow child run per trial (none left
RUNNING), the champion is the best trial, an interrupted sweep resumes without running its finished
trials again, an Optuna search runs, and a sweep whose output_dir is in S3 (moto) keeps everything
there and resumes from the bucket alone."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mtl.config import config_from_dict

pytestmark = pytest.mark.slow


def small_config(tmp: Path, encoder: Path, name: str, tune: dict | None = None, train: dict | None = None):
    raw = {
        "name": name,
        "output_dir": str(tmp / "runs"),
        "seed": 7,
        "model": {"encoder": str(encoder), "max_length": 32},
        "tasks": [
            {"name": "intent", "kind": "sequence_classification",
             "source": {"type": "atis", "field": "intent"}, "max_examples": 120},
            {"name": "slots", "kind": "token_classification",
             "source": {"type": "atis", "field": "slots"}, "max_examples": 120},
        ],
        "train": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 8, "max_steps": 16, "eval_every": 2,
                  "sampling": "round_robin", "patience": None, "eval_batch_size": 64, "use_gpu": False,
                  "warmup_ratio": 0.0, **(train or {})},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": name, "registered_model": name},
        "tune": {"num_samples": 4, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2,
                 "space": {"lr": [1e-4, 5e-2], "task_weights": True}, **(tune or {})},
    }
    return config_from_dict(raw)


def _client(cfg):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import absolute_tracking_uri

    uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client, cfg, stage: str | None = None):
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    filt = f"tags.`mtl_ray.stage` = '{stage}'" if stage else ""
    return client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000)


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_encoder, tmp_path_factory):
    from pipelines.tuning import run_tune

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = small_config(tmp, tiny_encoder, "sweep-test", tune={"search": "optuna"})
    return cfg, run_tune(cfg)


def test_asha_stopped_a_trial_before_the_budget(sweep):
    cfg, out = sweep
    table = out.sweep.table
    budget = 8  # ceil(16 / 2) evaluations
    assert out.sweep.trials == len(table) == 4
    assert table["iterations"].max() == budget  # at least one trial ran its whole budget
    assert (table["iterations"] < budget).sum() >= 1  # ... and ASHA cut at least one short
    assert out.sweep.trials_stopped_early == int(table["stopped_early"].sum()) >= 1
    assert (table.loc[table["stopped_early"], "iterations"] < budget).all()
    # iterations come from Tune's own records, not from the table's arithmetic
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(Path(out.run_dir) / "trials"))
    iters = {t.trial_id: t.last_result["training_iteration"] for t in analysis.trials}
    assert iters == dict(zip(table["trial_id"], table["iterations"]))
    # weights on the simplex, scaled to the number of tasks
    lam = table[["lambda/intent", "lambda/slots"]].to_numpy()
    assert (lam > 0).all() and abs(lam.sum(1) - 2).max() < 1e-6


def test_mlflow_holds_one_parent_and_a_child_per_trial(sweep):
    cfg, out = sweep
    client = _client(cfg)
    parents = _runs(client, cfg, "sweep")
    children = _runs(client, cfg, "trial")
    assert [p.info.run_id for p in parents] == [out.mlflow_run_id]
    assert len(children) == 4 == len(_runs(client, cfg)) - 1
    assert all(c.data.tags["mlflow.parentRunId"] == out.mlflow_run_id for c in children)
    statuses = {c.data.tags["mtl_ray.trial_id"]: c.info.status for c in children}
    assert set(statuses) == set(out.sweep.table["trial_id"])
    assert "RUNNING" not in statuses.values() and parents[0].info.status == "FINISHED"
    table = out.sweep.table.set_index("trial_id")
    for c in children:
        tid = c.data.tags["mtl_ray.trial_id"]
        # ASHA-stopped trials are KILLED, the others FINISHED
        assert c.info.status == ("KILLED" if table.loc[tid, "stopped_early"] else "FINISHED"), tid
        # the child holds the trial's params and its per-task curves
        assert float(c.data.params["trial.lr"]) == pytest.approx(table.loc[tid, "lr"], rel=1e-6)
        assert float(c.data.params["trial.lambda.slots"]) == pytest.approx(table.loc[tid, "lambda/slots"], abs=1e-5)
        curve = client.get_metric_history(c.info.run_id, "val/intent/accuracy")
        # a stopped trial's workers may log an evaluation or two more before the trial is killed
        assert len(curve) >= table.loc[tid, "iterations"]
        if not table.loc[tid, "stopped_early"]:
            assert len(curve) == 8
        # one point per evaluation, at steps 2, 4, ... (a trial ASHA stopped at its first rung has one)
        steps = [m.step for m in sorted(curve, key=lambda m: m.step)]
        assert steps == list(range(2, 2 * len(steps) + 1, 2))
        assert client.get_metric_history(c.info.run_id, "train/loss/slots")


def test_champion_is_the_best_trial(sweep):
    cfg, out = sweep
    client = _client(cfg)
    mv = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    assert str(mv.version) == str(out.registered_version)
    assert mv.run_id == out.mlflow_run_id
    # the trial behind the champion has the highest objective of all child runs (MLflow's own records)
    best_by_run = {}
    for c in _runs(client, cfg, "trial"):
        hist = client.get_metric_history(c.info.run_id, "objective")
        best_by_run[c.info.run_id] = max(m.value for m in hist)
    winner = max(best_by_run, key=best_by_run.get)
    assert mv.tags["mtl_ray.trial_run_id"] == winner
    assert best_by_run[winner] == pytest.approx(out.sweep.best["objective"], abs=1e-9)
    assert float(mv.tags["mtl_ray.validation_objective"]) == pytest.approx(best_by_run[winner], abs=1e-5)
    winner_run = client.get_run(winner)
    parent = client.get_run(out.mlflow_run_id)
    assert parent.data.params["best.lr"] == str(out.sweep.best["lr"])
    assert float(winner_run.data.params["trial.lr"]) == pytest.approx(out.sweep.best["lr"], rel=1e-6)
    assert parent.data.metrics["best_objective"] == pytest.approx(best_by_run[winner])
    assert set(out.test_metrics) == {"intent", "slots"}
    assert parent.data.metrics["test/intent/accuracy"] == pytest.approx(out.test_metrics["intent"]["accuracy"])
    # the copied model is the best checkpoint: its manifest holds the config's tasks with the data's
    # labels, and the step and validation metrics of the best trial's best evaluation
    import json

    from pipelines.data import read_tasks, task_infos

    manifest = json.loads((Path(out.model_dir) / "manifest.json").read_text())
    infos = {i.name: i for i in task_infos(cfg, read_tasks(cfg))}
    assert [(t["name"], t["kind"]) for t in manifest["tasks"]] == [("intent", "sequence_classification"),
                                                                    ("slots", "token_classification")]
    for t in manifest["tasks"]:
        assert t["labels"] == infos[t["name"]].labels and len(t["labels"]) > 1
    assert "O" in manifest["tasks"][1]["labels"]
    assert manifest["step"] == out.sweep.best["best_step"]
    best_row = out.sweep.table.set_index("trial_id").loc[out.sweep.best["trial_id"]]
    assert manifest["validation"]["intent"]["accuracy"] == pytest.approx(best_row["val/intent/accuracy"])
    assert manifest["validation"]["slots"]["f1"] == pytest.approx(best_row["val/slots/f1"])


def test_parent_holds_the_table_plot_and_model(sweep):
    cfg, out = sweep
    client = _client(cfg)
    parent = out.mlflow_run_id
    files = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert files == {"sweep/sweep_table.csv", "sweep/sweep.png"}
    import pandas as pd

    local = client.download_artifacts(parent, "sweep/sweep_table.csv")
    csv = pd.read_csv(local)
    assert len(csv) == 4 and {"trial_id", "lr", "lambda/intent", "objective", "iterations",
                              "stopped_early", "val/slots/f1"} <= set(csv.columns)
    png = Path(client.download_artifacts(parent, "sweep/sweep.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top = {a.path for a in client.list_artifacts(parent)}
    assert {"model_card.md", "reports", "plots", "summary.json"} <= top
    # the model is an MLflow logged model of the parent run, the one the registry points at
    model_id = out.model_uri.rsplit("/", 1)[-1]
    assert client.get_logged_model(model_id).source_run_id == parent
    mv = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    assert mv.source == out.model_uri


def test_the_sweep_returns_the_result_training_returns(sweep):
    """``run_tune`` gives the ``RunResult`` ``run_training`` gives (mode "sweep", the winner's common
    fields) with the sweep's own record; summary.json (folder and parent run) is its summary, with the
    sweep's keys at the top level and no trial table."""
    import json

    cfg, out = sweep
    best, table = out.sweep.best, out.sweep.table
    assert out.mode == "sweep" and out.history == [] and out.steps is None
    assert (out.best_objective, out.best_step) == (best["objective"], best["best_step"])
    assert out.model_dir == str(Path(out.run_dir) / "model") and Path(out.run_dir).name.startswith("sweep-")
    assert out.stopped_early is bool(table.set_index("trial_id").loc[best["trial_id"], "patience_stop"])
    assert out.sweep.best_checkpoint and Path(out.sweep.best_checkpoint).exists()
    assert (out.sweep.max_t, out.sweep.max_concurrent_trials, out.sweep.errors) == (8, 2, 0)
    assert out.sweep.equal_weights is None  # tune.compare_equal is off here
    assert set(out.calibration) == {"intent", "slots"} and out.wall_s >= out.fit_s > 0
    saved = json.loads((Path(out.run_dir) / "summary.json").read_text())
    assert saved == json.loads(json.dumps(out.summary(), default=str))
    assert "table" not in saved and "history" not in saved and "sweep" not in saved
    assert {"best", "test_metrics", "calibration", "model_dir", "best_checkpoint", "model_uri", "registered_version",
            "parent_run_id", "sweep_dir", "trials", "errors", "max_t", "max_concurrent_trials", "equal_weights",
            "wall_s", "mode"} <= set(saved)
    assert (saved["sweep_dir"], saved["parent_run_id"], saved["trials"]) == (out.run_dir, out.mlflow_run_id, 4)
    assert saved["trials_stopped_early"] == int(table["stopped_early"].sum())
    logged = _client(cfg).download_artifacts(out.mlflow_run_id, "summary.json")
    assert json.loads(Path(logged).read_text()) == saved


def _interrupt_after_first_trial(marker: Path):
    """A Tune callback that sends the driver SIGINT (Ctrl-C) once a trial has finished: Tune saves
    its state and stops, leaving the other trial unfinished. Tune saves the callbacks with the
    experiment and restores them on resume, so a marker file makes it fire only once."""
    from ray import tune as ray_tune

    class Interrupt(ray_tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not marker.exists():
                marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGINT)

    return Interrupt()


def _held_back(inner, marker: Path):
    """A trainer factory around ``inner`` that holds the second trial's first attempt back until
    ``marker`` exists (the first trial finished and the driver got Ctrl-C): the order in which the
    trials finish is fixed, whatever the machine's speed. A local class, so Ray pickles it by value."""
    import time

    class HeldBack:
        def __call__(self, trial):
            if trial.run_name.endswith("_00001-1"):  # trial 1, attempt 1
                while not marker.exists():
                    time.sleep(0.2)
            return inner(trial)

    return HeldBack()


@pytest.mark.extended  # about 150 s (a sweep, killed, resumed): .ci/run runs it; keeps make test near 15 min
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, tiny_encoder, tmp_path):
    import pandas as pd

    from pipelines.data import read_tasks
    from pipelines.tuning import TrialTrainer, run_tune
    from tune.sweep import SweepInterrupted, run_sweep

    cfg = small_config(tmp_path, tiny_encoder, "resume-test",
                       tune={"num_samples": 2, "max_concurrent": 2, "compare_equal": True},
                       train={"max_steps": 6})
    marker = tmp_path / "interrupted"
    with pytest.raises(SweepInterrupted):
        run_sweep(cfg, _held_back(TrialTrainer(read_tasks(cfg)), marker),
                  callbacks=[_interrupt_after_first_trial(marker)])
    sweep_dirs = list((tmp_path / "runs" / "resume-test").glob("sweep-*"))
    assert len(sweep_dirs) == 1
    starts = sweep_dirs[0] / "starts"
    first = {d.name: sorted(p.name for p in d.iterdir()) for d in starts.iterdir()}
    client = _client(cfg)
    assert all(r.info.status != "RUNNING" for r in _runs(client, cfg))
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sweep_dirs[0] / "trials"))
    before = {t.trial_id: (t.status, dict(t.last_result)) for t in analysis.trials}
    done = [tid for tid, (status, _) in before.items() if status == "TERMINATED"]
    assert len(before) == 2 and done == [marker.read_text()] and done[0].endswith("_00000")
    best_before = analysis.trial_dataframes[done[0]]["objective"].max()

    out = run_tune(cfg, resume=True)
    assert out.run_dir == str(sweep_dirs[0]) and out.sweep.trials == 2
    after = {d.name: sorted(p.name for p in d.iterdir()) for d in starts.iterdir()}
    table = out.sweep.table.set_index("trial_id")
    # the finished trial was not started again and kept its results
    assert after[done[0]] == first[done[0]] == ["1"]
    assert table.loc[done[0], "iterations"] == before[done[0]][1]["training_iteration"]
    assert table.loc[done[0], "objective"] == pytest.approx(best_before)
    # the other one ran (again) to the end
    other = next(t for t in before if t != done[0])
    assert len(after[other]) >= 1 and table.loc[other, "iterations"] >= 1
    # MLflow: one parent, one child per trial (+ the equal-weights trial), nothing left open
    runs = _runs(client, cfg)
    assert len(_runs(client, cfg, "sweep")) == 1 and len(_runs(client, cfg, "trial")) == 2
    assert len(_runs(client, cfg, "equal_weights")) == 1 and len(runs) == 4
    assert all(r.info.status == "FINISHED" or r.info.status == "KILLED" for r in runs)
    assert _runs(client, cfg, "sweep")[0].info.status == "FINISHED"
    # the equal-weights comparison: λ = 1 for both tasks at the best trial's lr
    eq = out.sweep.equal_weights
    assert eq is not None and eq["lr"] == pytest.approx(out.sweep.best["lr"])
    eq_run = _runs(client, cfg, "equal_weights")[0]
    assert float(eq_run.data.params["trial.lambda.intent"]) == pytest.approx(1.0)
    assert float(eq_run.data.params["trial.lambda.slots"]) == pytest.approx(1.0)
    assert eq["best_minus_equal"] == pytest.approx(out.sweep.best["objective"] - eq["objective"])
    assert isinstance(out.sweep.table, pd.DataFrame)


def test_the_module_sweep_searched_with_optuna(sweep):
    """``tune.search: optuna`` (the module's sweep; random search is the resume test's): Tune saved
    Optuna's searcher with the experiment, and the trials' lrs are Optuna's draws within bounds."""
    _, out = sweep
    table = out.sweep.table
    assert table["lr"].between(1e-4, 5e-2).all() and table["lr"].nunique() == len(table)
    states = list((Path(out.run_dir) / "trials").glob("searcher-state-*"))
    assert states and b"optuna" in states[0].read_bytes().lower()


# about 250 s here (2 trials, publishing, then a resume that publishes again): opt-in, .ci/run runs it
@pytest.mark.extended
def test_a_sweep_in_object_storage_publishes_there_and_resumes_from_the_bucket(ray_session, tiny_encoder, tmp_path,
                                                                               s3_server):
    """``output_dir`` in S3 (moto on 127.0.0.1), 2 trials of 3 evaluations: Tune's experiment, the
    trials' Ray Train checkpoints and start markers, the winner's model, summary.json, table and plot
    all land in the bucket; the model serves from its URI and is the champion's. Then, as on a new
    cluster (the driver's staging folder deleted), ``--resume`` finds the sweep by listing the bucket,
    restores Tune's state from it and runs no trial again."""
    import json
    import shutil

    from ray.tune import ExperimentAnalysis

    from mtl import storage
    from mtl.predictor import Predictor
    from mtl.registry import local_artifact
    from pipelines.tracking import absolute_tracking_uri
    from pipelines.tuning import run_tune
    from tune.sweep import sweep_folder

    cfg = small_config(tmp_path, tiny_encoder, "s3-sweep", tune={"num_samples": 2, "max_concurrent": 2},
                       train={"max_steps": 6})
    cfg.output_dir = s3_server("mtl-sweeps", "runs")
    out = run_tune(cfg)
    root = out.run_dir
    assert root.startswith("s3://mtl-sweeps/runs/s3-sweep/sweep-") and root.endswith(cfg.output_dir.partition("?")[2])
    assert {"mlflow_run_id", "summary.json", "sweep_table.csv", "sweep.png"} <= set(storage.list_files(root))
    # Tune's experiment state, readable from the bucket alone
    path, fs = storage.ray_storage(storage.join(root, "trials"))
    trials = ExperimentAnalysis(path, storage_filesystem=fs).trials
    assert sorted(t.trial_id for t in trials) == sorted(out.sweep.table["trial_id"])
    assert all(t.status == "TERMINATED" for t in trials)
    starts = {t: storage.list_files(storage.join(root, "starts", t))
              for t in storage.list_dirs(storage.join(root, "starts"))}
    assert starts == {t.trial_id: ["1"] for t in trials}
    # the best checkpoint is a URI in the sweep's train/ folder; the model beside it is its copy
    assert out.sweep.best_checkpoint.startswith(root.partition("?")[0] + "/train/")
    assert storage.exists(storage.join(out.sweep.best_checkpoint, "model", "manifest.json"))
    assert out.model_dir == storage.join(root, "model")
    manifest = json.loads(storage.read_text(storage.join(out.model_dir, "manifest.json")))
    assert manifest["step"] == out.sweep.best["best_step"]
    assert json.loads(storage.read_text(storage.join(root, "summary.json"))) == json.loads(
        json.dumps(out.summary(), default=str))
    predictor = Predictor.load(local_artifact(out.model_dir, dst=str(tmp_path / "cache")))
    assert set(predictor.model.tasks) == {"intent", "slots"}
    assert "label" in predictor.predict(["show me flights from boston to denver"], ["intent"])[0]["intent"]
    # the champion is the model logged from that folder, tagged with the sweep
    client = _client(cfg)
    mv = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    assert (str(mv.version), mv.source, mv.run_id) == (str(out.registered_version), out.model_uri, out.mlflow_run_id)
    assert mv.tags["mtl_ray.sweep"] == storage.name(root)
    logged = local_artifact(out.model_uri, tracking_uri=absolute_tracking_uri(cfg.mlflow.tracking_uri),
                            dst=str(tmp_path / "logged"))
    assert json.loads((logged / "manifest.json").read_text()) == manifest

    shutil.rmtree(sweep_folder(cfg, resume=True).local)  # a new cluster: nothing of the sweep on this machine
    found = sweep_folder(cfg, resume=True)
    assert found.remote == root and (found.local / "mlflow_run_id").read_text() == out.mlflow_run_id
    again = run_tune(cfg, resume=True)
    assert again.run_dir == root and again.mlflow_run_id == out.mlflow_run_id
    assert (again.sweep.best["trial_id"], again.sweep.best["objective"]) == (out.sweep.best["trial_id"],
                                                                            out.sweep.best["objective"])
    restarted = {t: storage.list_files(storage.join(root, "starts", t)) for t in starts}
    assert restarted == starts, "no trial ran again"

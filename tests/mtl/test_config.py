"""mtl.config: valid configs load, overrides apply, and every error names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtl.config import ConfigError, apply_overrides, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICK = CONFIGS / "quick.yaml"
FULL = CONFIGS / "atis_sentiment_news.yaml"


def write(tmp_path: Path, raw, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def csv_task(path: str, **extra) -> dict:
    return {"name": "reviews", "kind": "sequence_classification",
            "source": {"type": "csv", "path": path, **extra}}


def test_quick_config_loads_with_its_values():
    cfg = load_config(QUICK)
    assert cfg.task_names == ["intent", "slots", "sentiment", "topic"]
    assert [t.kind for t in cfg.tasks] == ["sequence_classification", "token_classification",
                                           "sequence_classification", "sequence_classification"]
    assert cfg.tasks[1].source.type == "atis" and cfg.tasks[1].source.field == "slots"
    assert cfg.model.max_length == 48
    raw = yaml.safe_load(QUICK.read_text())
    assert cfg.max_length(cfg.task("topic")) == raw["tasks"][3]["max_length"] != cfg.model.max_length
    assert cfg.max_length(cfg.task("intent")) == 48  # no per-task value: the model's
    assert cfg.task("topic").max_examples == raw["tasks"][3]["max_examples"]
    assert cfg.train.max_steps == raw["train"]["max_steps"]
    assert cfg.train.sampling == raw["train"]["sampling"]
    assert cfg.tune is not None and cfg.tune.num_samples == raw["tune"]["num_samples"]
    # ATIS keeps its published split as is (no dedup); the other sources dedup by default
    assert cfg.task("intent").source.dedup is False
    assert cfg.task("sentiment").source.dedup is True


def test_full_config_loads_with_its_values():
    cfg = load_config(FULL)
    raw = yaml.safe_load(FULL.read_text())  # the validated config carries the file's values
    assert cfg.name == raw["name"] == "atis-sentiment-news"
    assert [(t.name, t.kind, t.source.type) for t in cfg.tasks] == [
        ("intent", "sequence_classification", "atis"), ("slots", "token_classification", "atis"),
        ("sentiment", "sequence_classification", "rotten_tomatoes"), ("topic", "sequence_classification", "bbc")]
    assert [cfg.max_length(t) for t in cfg.tasks] == [
        t.get("max_length", raw["model"]["max_length"]) for t in raw["tasks"]]
    assert cfg.train.max_steps == raw["train"]["max_steps"]
    assert cfg.train.lr == raw["train"]["lr"] and cfg.train.head_lr == raw["train"]["head_lr"]
    assert cfg.tune.search == raw["tune"]["search"]
    assert cfg.tune.space.lr == tuple(raw["tune"]["space"]["lr"])
    assert cfg.task_names == [t["name"] for t in raw["tasks"]]
    assert cfg.to_dict()["tasks"][3]["source"]["type"] == "bbc"
    assert cfg.data.validation_fraction == cfg.data.test_fraction == 0.1


def test_overrides_are_typed_and_index_lists():
    cfg = load_config(QUICK, ["train.max_steps=5", "tasks.0.weight=2", "train.lr=3e-4",
                              "train.use_gpu=false", "tasks.3.source.dedup=false"])
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    assert cfg.tasks[0].weight == 2.0
    assert cfg.tasks[1].weight == 1.0
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.use_gpu is False
    assert cfg.tasks[3].source.dedup is False


def test_override_creates_missing_sections_and_leaves_input_alone():
    raw = {"tasks": [{"name": "a"}]}
    out = apply_overrides(raw, ["tune.num_samples=3", "tasks.0.name=b"])
    assert out == {"tasks": [{"name": "b"}], "tune": {"num_samples": 3}}
    assert raw == {"tasks": [{"name": "a"}]}  # a deep copy


@pytest.mark.parametrize("override, message", [
    ("tasks.9.weight=2", "'9' is not an index of tasks"),
    ("tasks.first.weight=2", "'first' is not an index of tasks"),
    ("train.max_steps", "expected key.sub=value"),
    ("train.max_steps.x=1", "train.max_steps is not a mapping"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(QUICK, [override])


def test_override_value_is_validated_and_named():
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, ["train.max_steps=0"])
    assert f"{QUICK}: train.max_steps: Input should be greater than or equal to 1" in str(err.value)


def test_unknown_task_kind_names_file_and_field(tmp_path):
    path = write(tmp_path, {"tasks": [{"name": "t", "kind": "ner", "source": {"type": "atis", "field": "slots"}}]})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: tasks.0.kind: Input should be ")
    assert "'token_classification'" in msg


def test_unknown_key_names_file_and_field(tmp_path):
    path = write(tmp_path, {"tasks": [{"name": "t", "kind": "sequence_classification", "colour": "red",
                                       "source": {"type": "bbc"}}],
                            "trian": {"max_steps": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert f"{path}: tasks.0.colour: Extra inputs are not permitted" in lines
    assert f"{path}: trian: Extra inputs are not permitted" in lines


def test_missing_csv_file_names_file_and_field(tmp_path):
    path = write(tmp_path, {"tasks": [csv_task("nowhere/reviews.csv")]})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: tasks.0.source.path: file not found: nowhere/reviews.csv"


def test_missing_validation_file_names_its_field(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\n")
    task = {"name": "r", "kind": "sequence_classification",
            "source": {"type": "csv", "train": "train.csv", "validation": "val.csv"}}
    path = write(tmp_path, {"tasks": [task]})
    with pytest.raises(ConfigError, match=r"tasks\.0\.source\.validation: file not found: val\.csv"):
        load_config(path)


def test_csv_source_without_a_path(tmp_path):
    path = write(tmp_path, {"tasks": [{"name": "r", "kind": "sequence_classification",
                                       "source": {"type": "csv"}}]})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: tasks.0.source: " in str(err.value)
    assert "source.path (or source.train) is required for type 'csv'" in str(err.value)


def test_relative_data_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "reviews.csv").write_text("text,label\na,x\n")
    path = write(sub, {"tasks": [csv_task("reviews.csv")]})
    monkeypatch.chdir(tmp_path)  # reviews.csv is not in the working directory
    cfg = load_config(path)
    assert Path(cfg.tasks[0].source.path) == sub / "reviews.csv"


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "tasks: [\n  - name: a\n  kind: b: c\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: not valid YAML")


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_duplicate_task_names(tmp_path):
    task = {"name": "topic", "kind": "sequence_classification", "source": {"type": "bbc"}}
    path = write(tmp_path, {"tasks": [task, dict(task)]})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: tasks: " in str(err.value)
    assert "duplicate task name(s) ['topic']" in str(err.value)


def test_no_tasks(tmp_path):
    with pytest.raises(ConfigError, match="at least one task is required"):
        load_config(write(tmp_path, {"tasks": []}))
    with pytest.raises(ConfigError, match=r": tasks: Field required"):
        load_config(write(tmp_path, {"name": "x"}))


@pytest.mark.parametrize("objective", ["nope.accuracy", "accuracy", "max"])
def test_bad_objective(objective):
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, [f"train.objective={objective}"])
    assert str(err.value).startswith(f"{QUICK}: train.objective: '{objective}': use 'mean' or '<task>.<metric>'")


@pytest.mark.parametrize("objective, message", [
    ("intent.f1_typo", "task 'intent' (sequence_classification) has no metric 'f1_typo'; use one of accuracy, macro_f1"),
    ("slots.accuracy", "task 'slots' (token_classification) has no metric 'accuracy'; use one of precision, recall, f1"),
])
def test_objective_metric_must_exist_for_the_task_kind(objective, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, [f"train.objective={objective}"])
    assert str(err.value) == f"{QUICK}: train.objective: '{objective}': {message}, or 'mean'"


@pytest.mark.parametrize("objective", ["mean", "slots.f1", "intent.accuracy", "topic.macro_f1", "slots.recall"])
def test_good_objective(objective):
    assert load_config(QUICK, [f"train.objective={objective}"]).train.objective == objective


def test_every_kinds_metric_names_are_what_its_metrics_return():
    """The names the objective check accepts are the keys the kind's ``metrics()`` really reports."""
    from mtl.tasks import KINDS

    samples = {"sequence_classification": ([0, 1], [0, 0]), "token_classification": ([["O", "B-x"]], [["O", "B-x"]]),
               "multi_label": ([[0, 1]], [[1, 1]]), "regression": ([0.1, 0.5, 0.2], [0.0, 1.0, 0.3])}
    for name, cls in KINDS.items():
        kind = cls(["x", "y"] if name != "token_classification" else ["O", "B-x", "I-x"])
        if name == "regression":
            kind = cls([])
        assert tuple(kind.metrics(*samples[name])) == cls.metric_names, name
        assert cls.primary_metric in cls.metric_names


def _rule_errors(tmp_path, **sections) -> list[str]:
    """Load the quick config with ``sections`` merged in; the error's lines (none when it loads)."""
    raw = yaml.safe_load(QUICK.read_text())
    for key, value in sections.items():
        raw[key] = [{**t, **value.get(t["name"], {})} for t in raw["tasks"]] if key == "tasks" else {**(raw.get(key) or {}), **value}
    path = write(tmp_path, raw)
    try:
        load_config(path)
    except ConfigError as err:
        return [line.removeprefix(f"{path}: ") for line in str(err).splitlines()]
    return []


@pytest.mark.parametrize("train, field", [
    ({"comm_hook": "fp16", "num_workers": 1}, "train.comm_hook: 'fp16' compresses the all-reduce between workers"),
    ({"comm_hook": "bf16", "num_workers": 2, "strategy": "fsdp"}, "train.comm_hook: 'bf16' is a DDP gradient hook"),
])
def test_comm_hook_needs_ddp_with_several_workers(tmp_path, train, field):
    errors = _rule_errors(tmp_path, train=train)
    assert len(errors) == 1 and errors[0].startswith(field)


def test_comm_hook_with_ddp_workers_loads(tmp_path):
    assert _rule_errors(tmp_path, train={"comm_hook": "fp16", "num_workers": 2}) == []


def test_uncertainty_weighting_refuses_static_and_tuned_weights(tmp_path):
    errors = _rule_errors(tmp_path, train={"weighting": "uncertainty"}, tasks={"slots": {"weight": 2.0}})
    assert [e.split(":")[0] for e in errors] == ["tasks.1.weight", "tune.space.task_weights"]
    assert "uncertainty learns the task weights" in errors[0]
    assert "override λ, so a λ search has no effect" in errors[1]
    assert _rule_errors(tmp_path, train={"weighting": "uncertainty"}, tune={"space": {"task_weights": False}}) == []


@pytest.mark.parametrize("train, field", [
    ({"grad_accum": 2}, "train.grad_accum"),
    ({"precision": "fp16"}, "train.precision"),
    ({"strategy": "fsdp"}, "train.strategy"),
    ({"sampling": "round_robin"}, "train.sampling"),
])
def test_pcgrad_limits(tmp_path, train, field):
    errors = _rule_errors(tmp_path, train={"weighting": "pcgrad", "sampling": "joint", **train})
    assert len(errors) == 1 and errors[0].startswith(f"{field}: train.weighting: pcgrad "), errors


def test_pcgrad_with_joint_ddp_loads(tmp_path):
    assert _rule_errors(tmp_path, train={"weighting": "pcgrad", "sampling": "joint", "precision": "bf16"}) == []


def test_batch_size_must_split_over_workers_and_accumulation(tmp_path):
    errors = _rule_errors(tmp_path, train={"batch_size": 10, "num_workers": 2, "grad_accum": 2})
    assert errors == ["train.batch_size: 10 must be a multiple of train.num_workers × train.grad_accum (2 × 2)"]


def test_search_space_rules_name_their_field(tmp_path):
    errors = _rule_errors(tmp_path, train={"num_workers": 2},
                          tune={"space": {"lr": [1e-3, 1e-5], "batch_size": [16, 9],
                                                    "warmup_ratio": [0.1, 1.5], "temperature": [0.0]}})
    assert [e.split(":")[0] for e in errors] == ["tune.space.lr", "tune.space.batch_size",
                                                 "tune.space.warmup_ratio", "tune.space.temperature"]


def test_rules_also_guard_a_config_changed_in_code():
    from mtl.config import check_config

    cfg = load_config(QUICK)
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"comm_hook": "fp16"})})
    with pytest.raises(ConfigError, match="<config>: train.comm_hook: "):
        check_config(bad)


@pytest.mark.parametrize("source, field", [
    ({"type": "atis"}, "source.field is required"),
    ({"type": "csv", "path": "x", "columns": {"txt": "body"}}, "unknown reader name(s) ['txt']"),
    ({"type": "sql", "path": "x"}, "tasks.0.source.type: Input should be"),
])
def test_bad_sources(source, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"tasks": [{"name": "t", "kind": "sequence_classification", "source": source}]},
                         "x.yaml")
    assert str(err.value).startswith("x.yaml: tasks.0.source")
    assert field in str(err.value)


def test_bad_task_name_and_weight():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"tasks": [{"name": "1 bad", "kind": "regression", "weight": 0,
                                     "source": {"type": "bbc"}}]}, "x.yaml")
    lines = str(err.value).splitlines()
    assert any(line.startswith("x.yaml: tasks.0.name: String should match pattern") for line in lines)
    assert "x.yaml: tasks.0.weight: Input should be greater than 0" in lines


def atis_pair(**slots) -> list[dict]:
    """ATIS intent and slots sharing the input ``atis``; ``slots`` overrides the second task."""
    return [{"name": "intent", "kind": "sequence_classification", "input": "atis",
             "source": {"type": "atis", "field": "intent"}},
            {"name": "slots", "kind": "token_classification", "input": "atis",
             "source": {"type": "atis", "field": "slots"}, **slots}]


def test_tasks_sharing_an_input_form_one_input():
    cfg = config_from_dict({"tasks": [*atis_pair(), {"name": "topic", "kind": "sequence_classification",
                                                    "source": {"type": "bbc"}}]})
    assert cfg.inputs == {"atis": ["intent", "slots"], "topic": ["topic"]}
    assert [t.input for t in cfg.tasks] == ["atis", "atis", None]
    assert load_config(QUICK).inputs == {t: [t] for t in ("intent", "slots", "sentiment", "topic")}


@pytest.mark.parametrize("tasks, message", [
    (atis_pair(source={"type": "atis", "field": "slots", "dedup": True}),
     "tasks.1.input: 'atis': source differs from tasks.0 (dedup True vs False); tasks of one input read "
     "the same rows and differ only in what they label"),
    (atis_pair(max_length=32),
     "tasks.1.input: 'atis': max_length 32 differs from tasks.0 (128); tasks of one input are tokenized "
     "once, at one length"),
    (atis_pair(max_examples=100),
     "tasks.1.input: 'atis': max_examples 100 differs from tasks.0 (None); tasks of one input are capped once"),
    (atis_pair(input="slots"),
     "tasks.1.input: 'slots' is also a task name; name the shared input differently"),
    (atis_pair(input=None),
     "tasks.0.input: 'atis' is this task's alone; an input is shared by two tasks or more (remove it, or "
     "give another task the same input)"),
    ([{"name": n, "kind": "sequence_classification", "input": "news", "source": {"type": "bbc"}} for n in "ab"],
     "tasks.0.input: source type 'bbc' cannot be shared (its rows carry one label); shared inputs read "
     "atis, csv, jsonl, parquet"),
    ([{"name": n, "kind": "sequence_classification", "input": "r",
       "source": {"type": "csv", "path": f"{n}.csv", "columns": {"label": n}}} for n in "ab"],
     "tasks.1.input: 'r': source differs from tasks.0 (path 'b.csv' vs 'a.csv'); tasks of one input read "
     "the same rows and differ only in what they label"),
])
def test_a_shared_input_must_read_the_same_rows(tasks, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"tasks": tasks})
    assert f"<config>: {message}" in str(err.value).splitlines()


def test_a_shared_file_input_differs_only_in_its_label_columns():
    tasks = [{"name": n, "kind": "sequence_classification", "input": "r",
              "source": {"type": "csv", "path": "r.csv", "columns": {"label": n, "text": "body"},
                         **({"labels": ["x", "y"]} if n == "a" else {})}} for n in "ab"]
    assert config_from_dict({"tasks": tasks}).inputs == {"r": ["a", "b"]}
    tasks[1]["source"]["columns"]["text"] = "title"
    with pytest.raises(ConfigError, match=r"tasks\.1\.input: 'r': source differs from tasks\.0 \(columns"):
        config_from_dict({"tasks": tasks})

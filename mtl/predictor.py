"""In-process predictions from a model artifact: what evaluation, Serve and the MLflow pyfunc share.

One encoder pass per batch of texts serves every task asked for; each task's kind decodes its head.
Texts longer than the model's ``max_length`` tokens are truncated: words past the cut get no slot
tags, and sentence tasks see only the first ``max_length`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtl.encoding import split_words, tokenize_words
from mtl.model import MultiTaskModel


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
        self.max_length = max_length or max(t.max_length for t in model.tasks.values())
        # On CPU, compute grows with padded tokens, so a batch is run as sub-batches of similar length
        # (a 12-token query does not pay for a 128-token article beside it). On GPUs one padded
        # launch is usually cheaper than several small ones: off by default there.
        self.length_buckets = self.device.type == "cpu" if length_buckets is None else length_buckets

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, quantize: bool = False,
             max_length: int | None = None, length_buckets: bool | None = None) -> Predictor:
        device = torch.device(device) if device is not None else pick_device()
        model, tokenizer = MultiTaskModel.load(path, "cpu")
        if quantize:
            if device.type != "cpu":
                raise ValueError("int8 dynamic quantization runs on CPU only")
            model = quantize_dynamic_int8(model)
        return cls(model, tokenizer, max_length, device, length_buckets)

    @property
    def task_names(self) -> list[str]:
        return list(self.model.tasks)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "kind": t.kind, "labels": t.labels} for t in self.model.tasks.values()]

    @torch.inference_mode()
    def predict(self, texts: list[str], tasks: list[str] | None = None, top_k: int = 1) -> list[dict[str, Any]]:
        """Per text, ``{task: answer}``; the answer's shape is the task kind's (see ``decode``)."""
        names = list(tasks) if tasks else self.task_names
        unknown = [n for n in names if n not in self.model.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this model has {self.task_names}")
        if not texts:
            return []
        split = [split_words(t) for t in texts]
        enc = tokenize_words(self.tokenizer, [w for w, _ in split], self.max_length, padding="longest")
        ids = torch.as_tensor(enc["input_ids"])
        mask = torch.as_tensor(enc["attention_mask"])
        rows: list[dict[str, torch.Tensor] | None] = [None] * len(texts)  # per text: task -> its logits
        for group in self._groups(mask):
            width = int(mask[group].sum(1).max())  # right padding: real tokens come first
            logits = self.model(ids[group, :width].to(self.device), mask[group, :width].to(self.device), names)
            logits = {name: v.cpu() for name, v in logits.items()}
            for j, i in enumerate(group.tolist()):
                rows[i] = {name: logits[name][j] for name in names}
        out = []
        for i, text in enumerate(texts):
            words, spans = split[i]
            word_ids = enc.word_ids(i)
            out.append({
                name: self.model.kinds[name].decode(rows[i][name], words, spans, word_ids, text, top_k)
                for name in names
            })
        return out

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

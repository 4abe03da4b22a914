"""Temperature scaling: scores users can threshold.

A fine-tuned encoder's softmax scores are over-confident: "route to a human below 0.7" does not
mean 70 %. One temperature ``T`` per task (fitted on the validation split by minimising the
negative log-likelihood of ``logits / T``) fixes most of it without changing any label: argmax,
and a sigmoid's side of 0.5, are the same for every ``T > 0``. The predictor divides each task's
logits by its ``TaskInfo.temperature`` (stored in the manifest) before decoding.

What is calibrated, per kind: sequence classification (softmax over labels); token classification
(softmax at each word's first subword, as tags and entity scores are read); multi-label (each
label's sigmoid as a yes/no event). Regression has no scores.

Expected calibration error (ECE, 15 equal-width confidence bins): the mean |accuracy - confidence|
over bins, weighted by how many predictions fall in each. On a finite split ECE is never 0, even for
a perfectly calibrated model: ``ece_floor`` is what such a model, with the same confidences, scores
on a split of this size (the mean over simulated outcomes). An ECE at or under its floor is as
calibrated as the split can show; halving it from there measures noise, not calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtl.tasks.token import IGNORE_INDEX

CALIBRATED_KINDS = ("sequence_classification", "token_classification", "multi_label")
BINS = 15


@dataclass
class Events:
    """What calibration needs of one task on one split: ``logits`` [N, C] and, per row, the index of
    the correct class (softmax kinds) or a 0/1 target per column (``multi``: multi-label)."""

    logits: torch.Tensor
    targets: torch.Tensor
    multi: bool = False


def events_from_batches(kind_name: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Events:
    """``(logits, labels)`` batches as the model and the kind's ``encode_labels`` give them, flattened:
    token tasks keep only the positions that carry a label (first subwords)."""
    logits = [lg.float().cpu() for lg, _ in batches]
    labels = [lb.cpu() for _, lb in batches]
    if kind_name == "token_classification":
        flat_l = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in logits])
        flat_y = torch.cat([lb.reshape(-1) for lb in labels])
        keep = flat_y != IGNORE_INDEX
        return Events(flat_l[keep], flat_y[keep])
    if kind_name == "multi_label":
        return Events(torch.cat(logits), torch.cat(labels).float(), multi=True)
    y = torch.cat(labels).long()
    keep = y != IGNORE_INDEX  # a label outside the list (``TaskKind.unseen``)
    return Events(torch.cat(logits)[keep], y[keep])


def nll(events: Events, temperature: float | torch.Tensor) -> torch.Tensor:
    z = events.logits / temperature
    if events.multi:
        return F.binary_cross_entropy_with_logits(z, events.targets)
    return F.cross_entropy(z, events.targets)


def fit_temperature(events: Events, max_iter: int = 200) -> float:
    """The ``T`` in [0.05, 20] that minimises the NLL of ``logits / T`` (L-BFGS on log T)."""
    if len(events.logits) == 0:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(events, log_t.clamp(np.log(0.05), np.log(20.0)).exp())
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(np.log(0.05), np.log(20.0)).exp())


def confidences(events: Events, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(confidence of each prediction, whether it was right): the top softmax probability and
    argmax == target; multi-label: each label's probability of its predicted side and its truth."""
    z = events.logits / temperature
    if events.multi:
        p = torch.sigmoid(z).reshape(-1)
        predicted = p >= 0.5
        conf = torch.where(predicted, p, 1 - p)
        return conf.numpy(), (predicted == events.targets.reshape(-1).bool()).numpy()
    probs = torch.softmax(z, -1)
    conf, pred = probs.max(-1)
    return conf.numpy(), (pred == events.targets).numpy()


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins."""
    if len(conf) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def ece_floor(conf: np.ndarray, bins: int = BINS, draws: int = 200, seed: int = 0) -> float:
    """The mean ECE of a perfectly calibrated model with confidences ``conf``: each prediction is
    right with probability its confidence (outcomes drawn ``draws`` times, seeded)."""
    if len(conf) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(conf, rng.random(len(conf)) < conf, bins) for _ in range(draws)]))


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, count, mean confidence and accuracy (the diagram's data)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "n": int((which == b).sum()),
             "confidence": float(conf[which == b].mean()), "accuracy": float(correct[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def reliability_diagram(task: str, before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                        temperature: float, path: str | Path) -> Path:
    """A PNG: accuracy against confidence per bin, before and after scaling, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for (conf, correct), name in ((before, "T = 1"), (after, f"T = {temperature:.2f}")):
        pts = reliability(conf, correct)
        ax.plot([p["confidence"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                label=f"{name}: ECE {ece(conf, correct):.3f}")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"{task}: reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def task_events(model, tokenizer, task: str, rows: list[dict[str, Any]], batch_size: int = 128) -> Events:
    """``task``'s logits and targets on reader rows (tokenized at the task's own max_length), in
    batches of rows of similar length (events are a set: their order does not matter)."""
    from mtl.encoding import encode_batch
    from mtl.evaluation import batches_by_length

    kind, info = model.kinds[task], model.tasks[task]
    device = next(model.parameters()).device
    model.eval()
    arrays = encode_batch(tokenizer, kind, [r["text"] for r in rows], [r["label"] for r in rows], info.max_length)
    batches = [(model(ids, mask, [task])[task], labels)
               for ids, mask, labels in batches_by_length(arrays, batch_size, device)]
    return events_from_batches(kind.name, batches)


def calibrate(model, tokenizer, validation: dict[str, list[dict]], test: dict[str, list[dict]] | None = None,
              batch_size: int = 128, plots: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Fit each scored task's temperature on ``validation`` and set it on ``model.tasks[t]``; per
    task: temperature and ECE before/after on validation (and on ``test`` when given, with the
    ECE a perfectly calibrated model would show there, ``test_ece_floor``); with
    ``plots``, a reliability diagram ``<plots>/reliability_<task>.png`` on test (else validation)."""
    out = {}
    for task, rows in validation.items():
        if model.tasks[task].kind not in CALIBRATED_KINDS:
            continue
        val = task_events(model, tokenizer, task, rows, batch_size)
        t = fit_temperature(val)
        res: dict[str, Any] = {"temperature": t, "validation_ece_before": ece(*confidences(val)),
                               "validation_ece_after": ece(*confidences(val, t)), "validation_n": len(val.logits),
                               "validation_nll_before": float(nll(val, 1.0)), "validation_nll_after": float(nll(val, t))}
        shown = task_events(model, tokenizer, task, test[task], batch_size) if test and task in test else val
        before, after = confidences(shown), confidences(shown, t)  # once: for the ECEs and the diagram
        if shown is not val:
            res.update(test_ece_before=ece(*before), test_ece_after=ece(*after),
                       test_ece_floor=ece_floor(after[0]), test_n=len(shown.logits))
        if plots is not None:
            res["plot"] = str(reliability_diagram(task, before, after, t, Path(plots) / f"reliability_{task}.png"))
        model.tasks[task].temperature = t
        out[task] = res
    return out


def write_temperatures(artifact: str | Path, temperatures: dict[str, float]) -> None:
    """Set tasks' ``temperature`` in an artifact's manifest (the weights are left untouched)."""
    import json

    file = Path(artifact) / "manifest.json"
    manifest = json.loads(file.read_text())
    for task in manifest["tasks"]:
        if task["name"] in temperatures:
            task["temperature"] = float(temperatures[task["name"]])
    file.write_text(json.dumps(manifest, indent=2))

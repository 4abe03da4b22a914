"""How per-task losses combine into the one loss that is back-propagated.

    static       Σ λ_i L_i, λ from the config
    uncertainty  Σ exp(−s_i) L_i + s_i, s_i = log σ_i² learned (Kendall, Gal & Cipolla, 2018)
    dwa          Σ w_i L_i, w_i = K · softmax(r_i / T), r_i = L̄_i(t−1) / L̄_i(t−2) over the last two
                 evaluation windows (Liu, Johns & Davison, 2019); equal weights until two windows exist
    pcgrad       per-task gradients of the shared parameters, each projected off the others'
                 conflicting directions, then summed (Yu et al., 2020); see ``pcgrad_combine``
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LossWeighting(nn.Module):
    """Static λ, or learned log-variances (``uncertainty``), or DWA weights from loss history.

    It is an ``nn.Module`` so the learned log-variances are trained, all-reduced by DDP and saved
    with the model's training state."""

    def __init__(self, tasks: list[str], method: str = "static", static: dict[str, float] | None = None,
                 dwa_temperature: float = 2.0):
        super().__init__()
        self.tasks = list(tasks)
        self.method = method
        self.static = {t: float((static or {}).get(t, 1.0)) for t in tasks}
        self.dwa_temperature = dwa_temperature
        # shape [1], not a scalar: FSDP2's fully_shard refuses 0-dim parameters
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(1)) for t in tasks} if method == "uncertainty" else {}
        )
        self.history: list[dict[str, float]] = []  # window-mean loss per task (dwa)
        self.dwa = {t: 1.0 for t in tasks}

    def weights(self) -> dict[str, float]:
        """Current effective weight of each task's loss (for logging)."""
        if self.method == "uncertainty":
            return {t: float(torch.exp(-self.log_vars[t]).detach()) for t in self.tasks}
        if self.method == "dwa":
            return {t: self.static[t] * self.dwa[t] for t in self.tasks}
        return dict(self.static)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(losses.values())).device)
        for task, loss in losses.items():
            if self.method == "uncertainty":
                s = self.log_vars[task].squeeze(0)
                total = total + torch.exp(-s) * loss + s
            elif self.method == "dwa":
                total = total + self.static[task] * self.dwa[task] * loss
            else:
                total = total + self.static[task] * loss
        return total

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the scalar log-variances that checkpoints written before the [1] shape hold."""
        for key in [k for k in state_dict if k.startswith(f"{prefix}log_vars.")]:
            if state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def unused_parameters(self, used: list[str]) -> list[nn.Parameter]:
        return [p for t, p in self.log_vars.items() if t not in used]

    def end_window(self, mean_losses: dict[str, float]) -> None:
        """Record the last window's mean training loss per task and update the DWA weights."""
        self.history = (self.history + [dict(mean_losses)])[-2:]
        if self.method == "dwa":
            self.dwa = dwa_weights(self.history, self.tasks, self.dwa_temperature)

    def extra_state(self) -> dict:
        return {"history": self.history, "dwa": self.dwa}

    def load_extra_state(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.dwa = dict(state.get("dwa", self.dwa))


def dwa_weights(history: list[dict[str, float]], tasks: list[str], temperature: float) -> dict[str, float]:
    """w_i = K · exp(r_i/T) / Σ_j exp(r_j/T), r_i = L_i(t−1)/L_i(t−2); ones with fewer than two windows."""
    k = len(tasks)
    if len(history) < 2 or any(t not in history[-1] or t not in history[-2] for t in tasks):
        return {t: 1.0 for t in tasks}
    r = np.array([history[-1][t] / max(history[-2][t], 1e-12) for t in tasks])
    e = np.exp((r - r.max()) / temperature)
    w = k * e / e.sum()
    return {t: float(x) for t, x in zip(tasks, w)}


def pcgrad_combine(grads: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """PCGrad on flattened per-task gradients: for each g_i, in a seeded random order of the others,
    subtract its projection on g_j whenever g_i · g_j < 0; return Σ_i g_i'."""
    gen = torch.Generator().manual_seed(seed)
    projected = []
    for i, g in enumerate(grads):
        gi = g.clone()
        order = [j for j in torch.randperm(len(grads), generator=gen).tolist() if j != i]
        for j in order:
            gj = grads[j]
            dot = torch.dot(gi, gj)
            if dot < 0:
                gi = gi - dot / gj.dot(gj).clamp(min=1e-20) * gj
        projected.append(gi)
    return torch.stack(projected).sum(0)

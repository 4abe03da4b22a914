"""The multi-task model (one shared HF encoder, one head per task) and its artifact.

Artifact layout (a directory, no pickle; loadable without Ray or MLflow)::

    manifest.json        format version, max_length, and per task: name, kind, labels, head options
    encoder/             the encoder, save_pretrained (config.json + model.safetensors)
    tokenizer/           the fast tokenizer files
    heads.safetensors    every head's weights, keys "<task>.<param>"
    adapters.safetensors tasks with ``adapter: lora`` only: their LoRA matrices (mtl.adapters)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from mtl.adapters import TaskAdapter, capture_layer_inputs
from mtl.tasks import TaskKind, make_kind

FORMAT = "mtl-ray/1"
ADAPTERS_FILE = "adapters.safetensors"
hf_logging.disable_progress_bar()  # no per-load progress bars in worker and replica logs


@dataclass
class TaskInfo:
    """What the model needs to know of a task: enough to rebuild its head and decode it."""

    name: str
    kind: str
    labels: list[str]
    max_length: int = 128
    pooling: str = "mean"
    head_dropout: float = 0.1
    temperature: float = 1.0  # scores are softmax/sigmoid of logits / temperature (mtl.calibration)
    adapter: dict[str, Any] | None = None  # {"type": "lora", "rank", "alpha", "layers"} (mtl.adapters)

    def make_kind(self) -> TaskKind:
        return make_kind(self.kind, self.labels)


class MultiTaskModel(nn.Module):
    """Encoder run once per batch; heads run only for the tasks asked for."""

    def __init__(self, encoder: nn.Module, tasks: list[TaskInfo]):
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.kinds = {t.name: t.make_kind() for t in tasks}
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({
            t.name: self.kinds[t.name].build_head(hidden, t.head_dropout, t.pooling) for t in tasks
        })
        self.adapters = nn.ModuleDict({t.name: _adapter(encoder, t) for t in tasks if t.adapter})

    @classmethod
    def from_encoder(cls, encoder_dir: str | Path, tasks: list[TaskInfo], seed: int = 0) -> MultiTaskModel:
        """Pretrained encoder weights from ``encoder_dir``; heads initialised from ``seed``."""
        encoder = AutoModel.from_pretrained(str(encoder_dir), add_pooling_layer=False)
        torch.manual_seed(seed)
        return cls(encoder, tasks)

    def add_tasks(self, tasks: list[TaskInfo], seed: int = 0) -> MultiTaskModel:
        """Add one head per new task, initialised from ``seed``; the encoder, the existing heads and
        their ``TaskInfo`` (labels, temperature, max_length) are left as they are. A name this model
        already has is refused."""
        clash = [t.name for t in tasks if t.name in self.tasks]
        if clash:
            raise ValueError(f"task(s) {clash} already in this model (it has {list(self.tasks)})")
        hidden = self.encoder.config.hidden_size
        torch.manual_seed(seed)
        for t in tasks:
            self.tasks[t.name] = t
            self.kinds[t.name] = t.make_kind()
            self.heads[t.name] = self.kinds[t.name].build_head(hidden, t.head_dropout, t.pooling)
            if t.adapter:
                self.adapters[t.name] = _adapter(self.encoder, t)
        return self

    def freeze_except(self, tasks: list[str]) -> None:
        """Only the heads (and adapters) of ``tasks`` stay trainable: the encoder and every other
        head get ``requires_grad = False`` (optimizers and DDP then leave them alone)."""
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise KeyError(f"no head for task(s) {unknown}; this model has {list(self.heads)}")
        for p in self.parameters():
            p.requires_grad_(False)
        for t in tasks:
            for p in self.heads[t].parameters():
                p.requires_grad_(True)
            if t in self.adapters:
                for p in self.adapters[t].parameters():
                    p.requires_grad_(True)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, T, H]."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One shared encoder pass for every task asked for; a task with an adapter re-runs the
        top layers its adapter covers, from that pass's state below them."""
        names = tasks if tasks is not None else list(self.heads)
        adapted = [n for n in names if n in self.adapters]
        if not adapted:
            hidden = self.encode(input_ids, attention_mask)
            return {name: self.heads[name](hidden, attention_mask) for name in names}
        # when every task asked for has its own adapter, the shared pass is not read past the
        # lowest adapted layer's input: it stops there (a full-depth adapter skips it entirely)
        hidden = None
        with capture_layer_inputs(self.encoder, {self.adapters[n].first for n in adapted},
                                  stop=len(adapted) == len(names)) as captured:
            hidden = self.encode(input_ids, attention_mask)
        out = {}
        for name in names:
            own = self.adapters[name].run(self.encoder, captured[self.adapters[name].first]) if name in adapted else hidden
            out[name] = self.heads[name](own, attention_mask)
        return out

    # ------------------------------------------------------------- artifact

    def manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "max_length": max(t.max_length for t in self.tasks.values()),
            "tasks": [asdict(t) for t in self.tasks.values()],
            **(extra or {}),
        }

    def save(self, path: str | Path, tokenizer, state_dict: dict[str, torch.Tensor] | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """Write the artifact. ``state_dict`` (e.g. gathered from FSDP) overrides this module's."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        heads = {k[len("heads."):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("heads.")}
        adapters = {k[len("adapters."):]: v.detach().cpu().contiguous() for k, v in state.items()
                    if k.startswith("adapters.")}
        self.encoder.save_pretrained(path / "encoder", state_dict=enc, safe_serialization=True)
        tokenizer.save_pretrained(str(path / "tokenizer"))
        save_file(heads, str(path / "heads.safetensors"))
        if adapters:
            save_file(adapters, str(path / ADAPTERS_FILE))
        (path / "manifest.json").write_text(json.dumps(self.manifest(extra), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiTaskModel, Any]:
        """(model in eval mode on ``device``, tokenizer) from an artifact directory."""
        path = Path(path)
        manifest = read_manifest(path)
        tasks = [TaskInfo(**t) for t in manifest["tasks"]]
        config = AutoConfig.from_pretrained(str(path / "encoder"))
        encoder = AutoModel.from_pretrained(str(path / "encoder"), config=config, add_pooling_layer=False)
        model = cls(encoder, tasks)
        model.heads.load_state_dict(load_file(str(path / "heads.safetensors")), strict=True)
        if len(model.adapters):
            model.adapters.load_state_dict(load_file(str(path / ADAPTERS_FILE)), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        return model.to(device).eval(), tokenizer


def _adapter(encoder: nn.Module, task: TaskInfo) -> TaskAdapter:
    spec = dict(task.adapter or {})
    kind = spec.pop("type", "lora")
    if kind != "lora":
        raise ValueError(f"task {task.name!r}: adapter type {kind!r} is not known (lora)")
    return TaskAdapter(encoder, **spec)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an mtl-ray model artifact (no manifest.json)")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest

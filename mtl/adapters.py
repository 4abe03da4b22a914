"""Per-task LoRA adapters: a task's own low-rank update of the top encoder layers, on its path only.

A task with ``adapter: lora`` (``TaskInfo.adapter``) gets rank-``r`` matrices ``A`` (r x in) and
``B`` (out x r, zero at the start) for the query and value projections (``targets: qv``, the
default) or every linear map (``targets: all``) of the encoder's top ``layers`` layers. The
shared encoder pass runs as before and feeds every other task; the adapted task re-runs only those top layers from the shared pass's state below them, with each projection's
output ``W x + b + (alpha / r) * B A x``, and its head reads the result. So

- the encoder's weights never change (an adapter is extra parameters), and every other task's
  outputs are exactly what they were without it;
- the extra cost is ``layers / num_layers`` of an encoder pass, for the adapted task only;
- ``B = 0`` at the start: a new adapter begins as the plain shared features.

The projections are found by name (BERT's ``query``/``value``, DistilBERT's ``q_lin``/``v_lin``,
``q_proj``/``v_proj``) in encoders that keep their layers in ``encoder.layer`` or
``transformer.layer`` (BERT, RoBERTa, MiniLM, DistilBERT, ...). The update is added by a forward
hook on each projection that acts only while an adapter re-runs its layers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

TARGETS = ("query", "value", "q_lin", "v_lin", "q_proj", "v_proj")
_DELTA = "_mtl_lora_delta"  # set on a projection (in its __dict__) while an adapter re-runs its layer


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's transformer layers, bottom to top."""
    for owner in ("encoder", "transformer"):
        layers = getattr(getattr(encoder, owner, None), "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"adapter: lora needs an encoder with its layers in encoder.layer or transformer.layer "
                     f"(BERT-like); {type(encoder).__name__} has neither")


def _projections(layer: nn.Module, targets: str = "qv") -> dict[str, nn.Linear]:
    """The linear maps of ``layer`` an adapter updates: ``qv`` the query and value projections,
    ``all`` every ``nn.Linear`` (query, key, value, attention output, both feed-forward maps)."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if targets == "all":
        if not linears:
            raise ValueError(f"adapter targets: all found no linear map in {type(layer).__name__}")
        return linears
    if targets != "qv":
        raise ValueError(f"adapter targets must be 'qv' or 'all'; got {targets!r}")
    found = {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in TARGETS}
    if len(found) != 2:
        raise ValueError(f"adapter: lora found {sorted(found)} in {type(layer).__name__}; expected a query and a "
                         f"value projection named one of {TARGETS}")
    return found


def _lora_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    delta = module.__dict__.get(_DELTA)
    return output if delta is None else output + delta(inputs[0])


class LoRA(nn.Module):
    """``x -> (alpha / r) * x A^T B^T``; ``A`` as ``nn.Linear`` initialises it, ``B`` zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t() @ self.B.t()) * self.scale


class TaskAdapter(nn.Module):
    """One task's LoRA matrices for the top ``layers`` layers of ``encoder``; ``run`` re-runs those
    layers from the captured input of the first of them."""

    def __init__(self, encoder: nn.Module, rank: int = 8, alpha: float = 16.0, layers: int = 2,
                 targets: str = "qv"):
        super().__init__()
        stack = encoder_layers(encoder)
        if not 1 <= layers <= len(stack):
            raise ValueError(f"adapter layers must be 1..{len(stack)} (the encoder's layers); got {layers}")
        if rank < 1:
            raise ValueError(f"adapter rank must be at least 1; got {rank}")
        self.first = len(stack) - layers
        self.lora = nn.ModuleDict()
        hooked = []  # (projection, its LoRA key), found once: forward does not walk the layers again
        for i in range(self.first, len(stack)):
            for name, proj in _projections(stack[i], targets).items():
                # qv keeps its short keys ("5_query"); all names the map by its path ("5_attention_output_dense")
                key = f"{i}_{name.rsplit('.', 1)[-1] if targets == 'qv' else name.replace('.', '_')}"
                self.lora[key] = LoRA(proj.in_features, proj.out_features, rank, alpha)
                hooked.append((proj, key))
                if not proj.__dict__.get("_mtl_lora_hooked"):
                    proj.register_forward_hook(_lora_hook)
                    proj.__dict__["_mtl_lora_hooked"] = True
        self.__dict__["_targets"] = hooked  # the encoder's modules: referenced, not registered here

    def run(self, encoder: nn.Module, captured: tuple[tuple, dict[str, Any]]) -> torch.Tensor:
        """The top layers again, with this adapter's updates, from ``captured`` (the positional and
        keyword arguments layer ``first`` got in the shared pass); the last layer's hidden states."""
        stack = encoder_layers(encoder)
        args, kwargs = captured
        try:
            for proj, key in self._targets:
                proj.__dict__[_DELTA] = self.lora[key]
            hidden = args[0]
            for i in range(self.first, len(stack)):
                out = stack[i](hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden
        finally:
            for proj, _ in self._targets:
                proj.__dict__.pop(_DELTA, None)


class StopEncoder(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside the shared pass once every layer input asked for is captured (``stop=True``)."""


@contextlib.contextmanager
def capture_layer_inputs(encoder: nn.Module, firsts: set[int], stop: bool = False):
    """While open, the positional and keyword arguments of encoder layers ``firsts`` are kept in
    the dict it yields (layer index -> (args, kwargs)). ``stop``: the pass is cut short at the last
    of them (the layers above it never run), raising :class:`StopEncoder`, which the context
    swallows: for when no one reads the pass's own output."""
    stack = encoder_layers(encoder)
    store: dict[int, tuple[tuple, dict[str, Any]]] = {}
    last = max(firsts)

    def keep(i: int, args: tuple, kwargs: dict) -> None:
        store[i] = (args, dict(kwargs))
        if stop and i == last:
            raise StopEncoder

    handles = [stack[i].register_forward_pre_hook(lambda m, args, kwargs, i=i: keep(i, args, kwargs),
                                                  with_kwargs=True) for i in firsts]
    try:
        yield store
    except StopEncoder:
        pass
    finally:
        for h in handles:
            h.remove()

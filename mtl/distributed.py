"""torch.distributed helpers the engine uses, whoever started the process group (Ray Train,
torchrun, ``mp.spawn``), and nothing when there is none (one process).

Every collective here is called by every rank in the same order; with no process group each one
is the identity. FSDP2 modules are recognised by type, so callers never pass a strategy string.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_fsdp(module: nn.Module) -> bool:
    """True for a module sharded with FSDP2 ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so it is its own inner module)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def shard_fsdp(module: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: each encoder layer is a shard unit, the rest (embeddings, heads, loss weights) the root's."""
    from torch.distributed.fsdp import fully_shard

    module.to(device)
    encoder = module.model.encoder
    layers = getattr(getattr(encoder, "encoder", None), "layer", None) or []
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the current process group (a plain module when there is none)."""
    module.to(device)
    if world_info()[1] == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def attach_comm_hook(module: nn.Module, hook: str) -> None:
    """Compress DDP's gradient all-reduce to fp16/bf16. Raises where the hook cannot act (FSDP,
    several processes without DDP); warns with one process, where nothing is communicated."""
    if hook == "none":
        return
    if is_fsdp(module):
        raise ValueError(f"comm_hook={hook!r} applies to DDP only; FSDP reduce-scatters its own "
                         "gradients (use comm_hook: none with strategy fsdp)")
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        if world_info()[1] > 1:
            raise ValueError(f"comm_hook={hook!r} needs a DistributedDataParallel module")
        warnings.warn(f"comm_hook={hook!r} has no effect with one worker: no gradients are communicated",
                      stacklevel=2)
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    fn = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}[hook]
    module.register_comm_hook(None, fn)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded CPU state dict (a collective under FSDP: every rank calls it)."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load an unsharded state dict (as ``full_state`` returns) into a plain, DDP or FSDP module."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        unwrap(module).load_state_dict(state, strict=strict)


def optim_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state (a collective under FSDP)."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optim_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean over ranks (float64)."""
    world = world_info()[1]
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def all_mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``t`` over ranks, in place."""
    world = world_info()[1]
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    world = world_info()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

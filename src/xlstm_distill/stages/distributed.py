"""Process group, device and FSDP2 sharding for runs under ``torchrun`` (one process without it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls) -> Distributed:
        """Join the process group that torchrun describes (NCCL on GPUs, gloo on CPUs); single process otherwise."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank() if world_size > 1 else 0, world_size, device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: ``fully_shard`` every decoder layer, then the root (bf16 params / fp32 reduction on GPU)."""
        if self.world_size == 1:
            return model
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.device.type == "cuda" else MixedPrecisionPolicy()
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The unsharded state dict (on CPU, every rank takes part) of a sharded model; None when not sharded."""
        if self.world_size == 1:
            return None
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

"""Multi-process training through the standard engine: torchrun's environment, DDP or FSDP2.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process. Under
torchrun each process drives one device: ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo (CI).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: Optional[str] = None) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device and start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)


def teardown(env: DistEnv, barrier: bool = False) -> None:
    """Destroy the process group; with ``barrier``, every rank first meets (the end of a clean training run:
    a rank that tore gloo down while another still finished its last collective aborted at exit, "terminate
    called without an active exception", under FSDP2 on CPU). Never after an error: the others may not come."""
    if env.distributed and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """DistributedDataParallel (default) or FSDP2 ``fully_shard`` (each block, then the root), in place for
    FSDP. One process: the model unchanged. Returns the module to call in the training step."""
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.blocks) + list(model.head.blocks):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()

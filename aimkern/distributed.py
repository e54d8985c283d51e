"""Multi-process runs through the standard engine: torchrun's environment, DDP or FSDP2; shared by
``aimkern.train`` and ``aimkern.eval``.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process. Under
torchrun each process drives one device: ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo (CI).

Control decisions that every rank must take together (stop after this step?) are agreed on a CPU group:
the default gloo group on the CPU, and on CUDA a gloo group created beside NCCL's, so agreeing costs a CPU
round trip and never waits for the GPU (an NCCL all-reduce read back with ``.item()`` would, every step).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: Any = None  # the CPU (gloo) process group for control decisions; None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: Optional[str] = None) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device and start the process group (and, on
    CUDA, the gloo control group beside it)."""
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
    control = None
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        if dist.get_backend() != "gloo":
            control = dist.new_group(backend="gloo")  # collective: every rank runs setup
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev, control=control)


def teardown(env: DistEnv, barrier: bool = False) -> None:
    """Destroy the process group; with ``barrier``, every rank first meets (the end of a clean training run:
    a rank that tore gloo down while another still finished its last collective aborted at exit, "terminate
    called without an active exception", under FSDP2 on CPU). Never after an error: the others may not come."""
    if env.distributed and dist.is_initialized():
        if barrier:
            dist.barrier(group=env.control)
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
    """``t`` summed over the ranks, in place (on the data backend: NCCL on CUDA)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is true on any rank. Collective on the CPU control group: no GPU sync."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control)
    return bool(t.item())


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj``, in rank order (on every rank; pickled over the CPU control group)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj, group=env.control)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.control)

"""Multi-process (DDP) plumbing for ``fit`` / ``distill``: process group, device, gathering.

Launch with ``torchrun --nproc_per_node N -m tbkd_lib train-teacher ...`` (or any script calling
``fit``): torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``.
With ``WORLD_SIZE > 1`` the process group is initialised here (NCCL on CUDA, gloo on CPU), each rank
uses ``cuda:LOCAL_RANK`` (or the CPU), and only rank 0 writes files. This module is the one place the
launcher's environment is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TbkdError

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "resolve_device", "gather_predictions",
           "barrier", "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when setup_distributed created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"``/``"cuda:N"`` must be available."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TbkdError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TbkdError(f"device {device!r} requested but CUDA is not available "
                            "(no GPU, or a CPU-only torch build); use device='cpu' or 'auto'")
        index = dev.index if dev.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise TbkdError(f"device cuda:{index} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise TbkdError(f"unsupported device {device!r}; expected auto, cpu, cuda or cuda:N")
    return dev


def setup_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the process group when ``WORLD_SIZE > 1``; return ``(info, this rank's device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    owns_group=owns), dev


def cleanup_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_predictions(info: DistInfo, indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(indices (n,), values (n, ...))`` from every rank, sorted by index, duplicates dropped.

    ``DistributedSampler`` pads the last shard with repeated items; deduplicating by dataset index
    makes the gathered predictions exactly those of a single-process pass.
    """
    indices, values = indices.cpu(), values.cpu()
    if info.enabled:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, (indices, values))
        indices = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
    order = torch.argsort(indices, stable=True)
    indices, values = indices[order], values[order]
    keep = torch.ones(len(indices), dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return indices[keep], values[keep]

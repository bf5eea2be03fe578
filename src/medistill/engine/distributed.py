"""Distributed data parallel (DDP) set-up, the same code path on one process.

Launch with ``torchrun --nproc_per_node N -m medistill train CONFIG`` (multi-node works the usual torchrun
way). The backend is NCCL on CUDA and gloo on CPU. Only trainable networks are wrapped; frozen teachers
stay plain modules. Rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medistill.errors import MedistillError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``, ...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` picks CUDA (this rank's GPU) when present, else CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if info is None else info.local_rank
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Wrap a trainable model in DDP when running distributed; otherwise return it unchanged."""
    if not info.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _check_same_keys(keys: list[str], info: DistInfo, device: torch.device) -> None:
    """Refuse ranks that would all-reduce different key lists, before they do.

    The reduce pairs values by position, so ranks with other keys average unrelated numbers, or, when
    their tensors differ in size beyond gloo's small messages, gloo aborts the rank that receives more
    than it expected (SIGABRT in its I/O thread, no Python error). A fixed-size fingerprint (count and
    CRC-32 of the names; Python's ``hash`` differs between processes) is compared first.
    """
    crc = zlib.crc32("\n".join(keys).encode())
    fingerprint = torch.tensor([len(keys), crc], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(fingerprint) for _ in range(info.world_size)]
    dist.all_gather(gathered, fingerprint)
    if all(torch.equal(g, fingerprint) for g in gathered):
        return
    every: list[list[str] | None] = [None] * info.world_size
    dist.all_gather_object(every, keys)
    shown = "; ".join(f"rank {r}: {', '.join(k or [])}" for r, k in enumerate(every))
    raise MedistillError(f"training step logs: ranks log different values ({shown})")


def all_reduce_mean(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Average scalar logs over ranks (so rank 0 logs the global value); every rank must log the same keys."""
    if not info.enabled:
        return values
    keys = sorted(values)
    _check_same_keys(keys, info, device)
    if not keys:
        return values
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

"""The distributed part of a trial: process group set-up on Ray, and the collectives trainables
use (averaging metrics, agreeing on early stopping).

Rank 0 opens a TCPStore on a free port of its node and publishes the address through the trial's
supervisor actor; the other ranks read it there. NCCL is used when the ranks have GPUs, gloo
otherwise.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hpo.service.executor import RankPlacement


def init_process_group(
    rank: int,
    world_size: int,
    node_ip: str,
    publish: Callable[[tuple[str, int]], None],
    lookup: Callable[[], tuple[str, int] | None],
    *,
    use_gpu: bool,
    timeout_s: float = 120.0,
) -> torch.device:
    """Join the trial's process group; returns this rank's device."""
    if use_gpu and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"the study asks for GPUs but this worker sees none (CUDA_VISIBLE_DEVICES={visible},"
            f" torch {torch.__version__} built for CUDA {torch.version.cuda})"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        store = dist.TCPStore(node_ip, 0, world_size, True, timeout=timeout, wait_for_workers=False)
        publish((node_ip, store.port))
    else:
        deadline = time.monotonic() + timeout_s
        while (address := lookup()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 never published the rendezvous address")
            time.sleep(0.02)
        store = dist.TCPStore(address[0], address[1], world_size, False, timeout=timeout)
    backend = "nccl" if use_gpu else "gloo"
    if use_gpu:
        device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU(s)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return device


def placement(
    rank: int, node_ip: str, node_id: str, device: torch.device, gpu_ids: list
) -> RankPlacement:
    """Where this rank runs: node, process, device (and which GPUs Ray gave it)."""
    cuda = device.type == "cuda"
    return RankPlacement(
        rank=rank,
        node_ip=node_ip,
        node_id=node_id,
        hostname=os.uname().nodename,
        pid=os.getpid(),
        device=str(device),
        gpu_ids=[str(g) for g in gpu_ids],
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES") if cuda else None,
        device_name=torch.cuda.get_device_name(device) if cuda else None,
        started_at=time.time(),
    )


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (all ranks must call this together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks (e.g. correct and total counts)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small Python objects: predictions for P/R/F1, placements)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every rank got here (all ranks must call this together)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""The distributed part of a trial: process group set-up on Ray, and the collectives trainables
use (averaging metrics, agreeing on early stopping).

Rank 0 opens a TCPStore on a free port of its node and publishes the address through the trial's
supervisor actor; the other ranks read it there. NCCL is used when the ranks have GPUs, gloo
otherwise.

Networking: the rendezvous address (``MASTER_ADDR``) is rank 0's node address as Ray knows it,
never the hostname (which often resolves to 127.0.0.1). gloo and NCCL open their own sockets;
left alone, gloo binds to whatever the hostname resolves to, so each rank sets
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` to ``HPO_SOCKET_IFNAME`` when the deployment
sets one, else to the interface that holds its node address (:func:`network_env`). Variables
the user set on the node are left alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import psutil
import torch
import torch.distributed as dist

from hpo.service.executor import RankPlacement

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# What this process set itself (worker processes are reused from one trial to the next: a
# value set here earlier is not the user's).
_ours: dict[str, str] = {}


def interface_of(ip: str, interfaces: Mapping[str, Sequence[Any]] | None = None) -> str | None:
    """The name of the network interface that holds address ``ip`` (from
    ``psutil.net_if_addrs()`` unless ``interfaces`` is given), or None if none does."""
    try:
        wanted = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    found = psutil.net_if_addrs() if interfaces is None else interfaces
    for name, addresses in found.items():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if ipaddress.ip_address(address.address.split("%", 1)[0]) == wanted:
                    return name
            except ValueError:
                continue
    return None


def network_env(
    node_ip: str,
    socket_ifname: str | None = None,
    environ: Mapping[str, str] | None = None,
    interfaces: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, str]:
    """The socket-interface variables this rank should set: ``socket_ifname`` (the
    deployment's ``HPO_SOCKET_IFNAME``) or else the interface holding ``node_ip``, for each
    of :data:`SOCKET_IFNAME_VARS` the user has not set. Empty when no interface is known."""
    environ = os.environ if environ is None else environ
    interface = socket_ifname or interface_of(node_ip, interfaces)
    if not interface:
        return {}
    return {
        name: interface
        for name in SOCKET_IFNAME_VARS
        if name not in environ or _ours.get(name) == environ[name]
    }


def apply_network_env(
    node_ip: str, socket_ifname: str | None, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set :func:`network_env`'s variables in this process; returns what was set."""
    environ = os.environ if environ is None else environ
    chosen = network_env(node_ip, socket_ifname, environ)
    environ.update(chosen)
    _ours.update(chosen)
    return chosen


def init_process_group(
    rank: int,
    world_size: int,
    node_ip: str,
    publish: Callable[[tuple[str, int]], None],
    lookup: Callable[[], tuple[str, int] | None],
    *,
    use_gpu: bool,
    timeout_s: float = 120.0,
    socket_ifname: str | None = None,
) -> torch.device:
    """Join the trial's process group; returns this rank's device. ``node_ip`` is this rank's
    node address as Ray knows it: rank 0 serves the rendezvous there (``MASTER_ADDR``), and
    gloo/NCCL bind to ``socket_ifname`` or the interface holding it (:func:`network_env`)."""
    apply_network_env(node_ip, socket_ifname)
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
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = store.host, str(store.port)
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

"""DDP networking: the rendezvous is served on the node's Ray address, and gloo/NCCL bind to the
interface that holds it (or the configured one), even where the hostname resolves to
127.0.0.1. Real interfaces (psutil) and a real gloo process group of two processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil
import pytest
import torch.multiprocessing as mp

from hpo.workers import ddp


def _ipv4_addresses() -> list[tuple[str, str]]:
    return [
        (name, a.address)
        for name, addresses in psutil.net_if_addrs().items()
        for a in addresses
        if a.family == socket.AF_INET
    ]


def test_the_interface_holding_an_address_is_found() -> None:
    found = _ipv4_addresses()
    assert "127.0.0.1" in {ip for _, ip in found}
    for name, ip in found:
        holder = ddp.interface_of(ip)
        assert holder is not None
        assert ip in {a.address for a in psutil.net_if_addrs()[holder]}
        if [n for n, other in found if other == ip] == [name]:
            assert holder == name
    taken = {ip for _, ip in found}
    absent = next(f"203.0.113.{i}" for i in range(1, 255) if f"203.0.113.{i}" not in taken)
    assert ddp.interface_of(absent) is None
    assert ddp.interface_of("not-an-address") is None


def test_the_configured_interface_wins_and_user_variables_are_left_alone() -> None:
    lo = ddp.interface_of("127.0.0.1")
    assert ddp.network_env("127.0.0.1", environ={}) == {
        "GLOO_SOCKET_IFNAME": lo,
        "NCCL_SOCKET_IFNAME": lo,
    }
    assert ddp.network_env("127.0.0.1", "ib0", environ={}) == {
        "GLOO_SOCKET_IFNAME": "ib0",
        "NCCL_SOCKET_IFNAME": "ib0",
    }
    # set by the user on the node: kept (the other one is still derived)
    assert ddp.network_env("127.0.0.1", "ib0", environ={"NCCL_SOCKET_IFNAME": "eth9"}) == {
        "GLOO_SOCKET_IFNAME": "ib0"
    }
    # an address no interface holds, and nothing configured: nothing is set (gloo's default)
    absent = next(a for a in ("203.0.113.250", "203.0.113.251") if not ddp.interface_of(a))
    assert ddp.network_env(absent, environ={}) == {}


def test_a_reused_worker_process_updates_what_it_set_itself() -> None:
    environ: dict[str, str] = {}
    ddp.apply_network_env("127.0.0.1", "ib0", environ)
    assert environ["GLOO_SOCKET_IFNAME"] == "ib0"
    # the next trial in the same process (another deployment setting): ours, so replaced
    ddp.apply_network_env("127.0.0.1", "ib1", environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "ib1", "NCCL_SOCKET_IFNAME": "ib1"}
    environ["NCCL_SOCKET_IFNAME"] = "user0"  # the user's from now on
    ddp.apply_network_env("127.0.0.1", "ib2", environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "ib2", "NCCL_SOCKET_IFNAME": "user0"}


def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def _rank(rank: int, node_ip: str, folder: str) -> None:
    """One rank: rendezvous through a file (as through the dispatcher), an all-reduce, then
    what it bound to."""
    master = Path(folder) / "master.json"

    def publish(address: tuple[str, int]) -> None:
        (Path(folder) / "tmp").write_text(json.dumps(address))
        (Path(folder) / "tmp").rename(master)

    def lookup() -> tuple[str, int] | None:
        return tuple(json.loads(master.read_text())) if master.exists() else None

    device = ddp.init_process_group(rank, 2, node_ip, publish, lookup, use_gpu=False)
    total = ddp.all_reduce_sum([rank + 1.0], device)[0]
    local = sorted(
        {
            c.laddr.ip.removeprefix("::ffff:")  # the store listens on both stacks
            for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED
        }
    )
    ddp.barrier()
    out = {
        "total": total,
        "local": local,
        "master": os.environ.get("MASTER_ADDR"),
        "gloo": os.environ.get("GLOO_SOCKET_IFNAME"),
    }
    (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(out))
    ddp.shutdown()


def test_gloo_world_of_two_binds_to_the_node_address_not_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_ip = _node_ip()
    if node_ip.startswith("127."):
        pytest.skip("this host has no address but loopback")
    for name in (*ddp.SOCKET_IFNAME_VARS, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_rank, args=(node_ip, str(tmp_path)), nprocs=2, join=True)
    interface = ddp.interface_of(node_ip)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert seen["total"] == 3.0  # world size 2: both ranks summed
        assert seen["master"] == node_ip
        assert seen["gloo"] == interface
        # every connection (rendezvous and gloo pairs) is on the node address
        assert seen["local"] == [node_ip]

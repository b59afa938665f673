"""Helpers for running the deploy/ recipes unchanged on one machine: each simulated node gets
its own Ray ports and temp dir, every process a recipe starts carries a marker in its
environment (so a test can tell whether any of them is left), and HOME is a fresh directory
(no Ray token yet, as on a new account)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# Ports for the stand-in nodes come from below the kernel's ephemeral range, claimed across
# processes: there an outgoing connection of the suite running meanwhile cannot take one
# before Ray binds it (a raylet whose agent cannot bind its port exits; raylet.err says so).
from hpo.api.demo import free_ports

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
STAND_INS = Path(__file__).parent / "data" / "bin"
VENV_BIN = Path(sys.executable).parent


def node_args(temp_dir: Path, *, head: bool, cpus: int = 1) -> str:
    """``ray start`` arguments that let one more raylet run on this host: free ports for
    everything it listens on and its own temp dir."""
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ]
    if head:
        names += ["dashboard-port", "ray-client-server-port"]
    ports = free_ports(len(names) + 16)
    args = [f"--{name}={port}" for name, port in zip(names, ports, strict=False)]
    args.append("--worker-port-list=" + ",".join(map(str, ports[len(names) :])))
    if head:
        args.append("--include-dashboard=false")  # not needed, and one process less
    args += [f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", "--object-store-memory=100000000"]
    return " ".join(args)


def short_temp_dir(prefix: str) -> Path:
    """A temp dir with a short path: Ray's socket paths under it must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Marked:
    """The environment a recipe runs in, and a way to find every process it started: each
    inherits ``HPO_DEPLOY_TEST_MARKER`` (Ray workers inherit their raylet's environment)."""

    def __init__(self, tmp_path: Path) -> None:
        self.marker = uuid.uuid4().hex
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "HOME": str(self.home),
            "HPO_DEPLOY_TEST_MARKER": self.marker,
            "HPO_STOP_GRACE_S": "5",
        }
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
            self.env.pop(name, None)

    def processes(self) -> dict[int, str]:
        """PID → command line of every live process that carries this test's marker."""
        needle = f"HPO_DEPLOY_TEST_MARKER={self.marker}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    stat = (entry / "stat").read_text()
                    if stat[stat.rindex(")") + 2] == "Z":  # exited, not yet reaped
                        continue
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                    found[int(entry.name)] = cmdline.decode(errors="replace").strip()
        return found

    def kill_all(self) -> None:
        """SIGKILL whatever is left (cleanup after a failed test; the assertions come first)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def marked(tmp_path: Path) -> Iterator[Marked]:
    env = Marked(tmp_path)
    try:
        yield env
    finally:
        env.kill_all()


def token_path(home: Path) -> Path:
    return home / ".ray" / "auth_token"


def ray_node_count(address: str, env: dict[str, str]) -> int:
    """Alive nodes of the cluster at ``address`` as ``ray status`` lists them."""
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "status", f"--address={address}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    active = re.search(r"^Active:\n(.*?)^\S", out, re.S | re.M)
    return len(re.findall(r"\bnode_[0-9a-f]+", active.group(1))) if active else 0


def write_spec(path: Path, name: str, trials: int = 1, **trainable_config: object) -> Path:
    """A tiny synthetic study whose two ranks only fit on two different one-CPU nodes."""
    spec = {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "budget": {"max_trials": trials, "max_concurrent": 1},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "trainable": {"name": "synthetic", "config": {"steps": 3, **trainable_config}},
        "space": {"x": {"type": "float", "low": -1, "high": 1}},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def ray_errors(*temp_dirs: Path) -> str:
    """The tails of the logs where a raylet and its agents say why they exited: `ray start`
    prints only raylet.out, and the raylet writes "one Ray agent failed" to raylet.err."""
    # raylet.1.err after a restart in the session; an agent's bind error goes to its .err
    names = ("raylet*.err", "*agent*.log", "*agent*.err", "gcs_server*.err")
    tails = []
    for temp in temp_dirs:
        for name in names:
            for log in sorted(temp.glob(f"session_*/logs/{name}")):
                if log.parents[1].is_symlink():  # session_latest: seen under its own name
                    continue
                text = log.read_text(errors="replace").strip()
                if text:
                    tails.append(f"--- {log.relative_to(temp.parent)}\n{text[-2000:]}")
    return "\n".join(tails)


def remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)

"""hpo on a simulated Ray cluster: dispatcher throughput, node loss, leader failover.

A Ray head (no CPUs: control processes only) and ``--nodes`` extra raylets on this host, each
``ray start --block`` with its own ``--temp-dir``, ``--num-cpus`` fake CPUs and 2 fake GPUs,
all on free ports, all stopped by their PIDs (never ``ray stop``). Then:

1. **dispatch**: this process drives :class:`hpo.service.ray_executor.RayExecutor` the way the
   scheduler does (``launch`` one :class:`AttemptLaunch` at a time, ``statuses`` to poll)
   with attempts of a trainable that does nothing: first one at a time (latency on warm
   workers), then bursts that bring the attempts the dispatcher tracks to each of
   ``--tracked`` (default 50, 150), then attempts that cannot be placed (bundles larger than
   any node) up to ``--pending`` (default 1,000: the dispatcher's own launch path, and polls
   with that many tracked). Printed per burst: launches/s (the ``launch`` calls), attempts
   finished/s, poll latency, and the CPU milliseconds per attempt of each process
   (dispatcher actor, GCS, raylets, rank workers, this driver), so the limit shows.
   ``--profile`` samples the dispatcher with py-spy during the largest burst.
2. **node loss**: ``hpo serve`` (SQLite) on the cluster runs one checkpointing trial; once it
   has a few steps, every process of the raylet its rank runs on is killed (kill -9 by PID);
   printed: time until attempt 2 runs on another node, and the checkpoint step it resumed at.
3. **failover**: two ``hpo serve`` replicas on one throwaway PostgreSQL database
   (``HPO_SCHEDULER_LEASE_S=3``) behind a TCP forwarder (their ``HPO_PUBLIC_URL``, as a load
   balancer would be) run a study of short trials; the leader is killed (kill -9, and reaped:
   the standby sees its process is gone) or frozen (SIGSTOP: its lease must expire, as for a
   leader on another host); printed: time until the standby holds the scheduler lease and
   launches the next trial, and whether every trial ran exactly once.
4. **tick** (only with ``--only tick``; no Ray): what the scheduler tick's study queries cost
   as completed studies accumulate (``--completed``), and the fair-share sort per launch.

    python benchmarks/cluster.py                          # all three, ~5-6 min here
    python benchmarks/cluster.py --only dispatch --tracked 50 200 --ranks 2 --profile
    python benchmarks/cluster.py --only failover --modes freeze  # SIGSTOP the leader only
    python benchmarks/cluster.py --only tick --completed 10 100 300

It is a benchmark, not a test: it prints figures and asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import http.server
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOOP = "bench-noop=benchmarks.cluster:noop"
# Ports each stand-in node's Ray workers may bind (one per worker process it runs at once:
# its warm ranks, a burst of new ones, tasks), at least; more for nodes with more CPUs.
WORKER_PORTS = 32


# ---------------------------------------------------------------- the trainable of part 1


def _noop_settings() -> Any:
    from pydantic import BaseModel

    class Settings(BaseModel):
        sleep_s: float = 0.0

    return Settings


def noop(ctx: Any) -> dict[str, float]:
    """An attempt that does no work (optionally sleeps), so only the machinery is measured."""
    if ctx.settings.sleep_s:
        time.sleep(ctx.settings.sleep_s)
    return {"loss": 0.0}


noop.settings_model = _noop_settings()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ the cluster


@dataclass
class Node:
    """One ``ray start --block`` process (a raylet, plus GCS on the head) and its temp dir."""

    name: str
    proc: subprocess.Popen
    temp: str

    def pids(self) -> list[int]:
        """This node's processes: ``ray start``, raylet, GCS, agents and worker processes."""
        import psutil

        try:
            me = psutil.Process(self.proc.pid)
            return [self.proc.pid, *(c.pid for c in me.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> int:
        """kill -9 every process of the node, by PID (a lost machine); returns how many."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return len(pids)


@dataclass
class SimCluster:
    """A Ray head with no CPUs and ``nodes`` raylets with fake CPUs and GPUs, on this host."""

    nodes: int = 2
    cpus: int = 4
    gpus: int = 2
    env: dict[str, str] = field(default_factory=dict)
    members: list[Node] = field(default_factory=list)
    address: str = ""

    def start(self) -> None:
        from hpo.api.demo import free_port, free_ports

        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start("head", ["--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0"])
        self._wait_nodes(1)
        for i in range(self.nodes):
            self._start(
                f"node{i + 1}",
                [
                    f"--address={self.address}",
                    f"--num-cpus={self.cpus}",
                    f"--num-gpus={self.gpus}",
                    f"--node-manager-port={free_port()}",
                    f"--object-manager-port={free_port()}",
                    # Ray's workers take ports from this list, not by walking up from a
                    # minimum through the range free_ports draws other servers' ports from.
                    "--worker-port-list="
                    + ",".join(map(str, free_ports(max(WORKER_PORTS, 3 * self.cpus + 8)))),
                ],
            )
        self._wait_nodes(1 + self.nodes)

    def _start(self, name: str, args: list[str]) -> None:
        ray = Path(sys.executable).with_name("ray")
        temp = tempfile.mkdtemp(prefix=f"r{name[-1]}", dir="/tmp")  # short: socket paths
        env = {**os.environ, "RAY_AUTH_MODE": "token", **self.env}
        command = [str(ray), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}"]
        if name == "head":
            command.append("--include-dashboard=false")
        proc = subprocess.Popen(
            command + args,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.members.append(Node(name, proc, temp))

    def _wait_nodes(self, count: int, timeout: float = 120) -> None:
        probe = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-c", probe],
                env={**os.environ, "RAY_AUTH_MODE": "token"},
                capture_output=True,
                text=True,
                timeout=90,
            )
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} nodes within {timeout} s")

    def node_of(self, pid: int) -> Node | None:
        return next((n for n in self.members if pid in n.pids()), None)

    def stop(self) -> None:
        """kill -9 every process of every node (by PID), then remove the temp dirs."""
        for node in reversed(self.members):
            node.kill()
        for node in self.members:
            shutil.rmtree(node.temp, ignore_errors=True)


@contextlib.contextmanager
def sim_cluster(nodes: int, cpus: int) -> Iterator[SimCluster]:
    env = {"PYTHONPATH": str(ROOT), "HPO_EXTRA_TRAINABLES": NOOP, "OMP_NUM_THREADS": "1"}
    cluster = SimCluster(nodes=nodes, cpus=cpus, env=env)
    try:
        started = time.perf_counter()
        cluster.start()
        print(f"cluster: head + {nodes} raylets up in {time.perf_counter() - started:.0f} s")
        yield cluster
    finally:
        cluster.stop()


# -------------------------------------------------------------- CPU seconds per process


def _category(cmdline: str, name: str) -> str:
    if "TrialDispatcher" in cmdline:
        return "dispatcher"
    if name == "gcs_server":
        return "gcs"
    if name == "raylet":
        return "raylets"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "rank workers"
    return "agents"


def cpu_snapshot(cluster: SimCluster) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process of the cluster and of this driver."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    me = psutil.Process()
    times = me.cpu_times()
    out[me.pid] = ("driver (control plane)", times.user + times.system)
    for node in cluster.members:
        for pid in node.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                times = proc.cpu_times()
                cmdline = " ".join(proc.cmdline())
                out[pid] = (_category(cmdline, proc.name()), times.user + times.system)
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    spent: dict[str, float] = collections.defaultdict(float)
    for pid, (category, cpu) in after.items():
        spent[category] += cpu - before.get(pid, (category, 0.0))[1]
    return dict(spent)


def dispatcher_pid(cluster: SimCluster) -> int | None:
    import psutil

    for node in cluster.members:
        for pid in node.pids():
            with contextlib.suppress(psutil.Error):
                if "TrialDispatcher" in " ".join(psutil.Process(pid).cmdline()):
                    return pid
    return None


# ------------------------------------------------------------------ part 1: dispatch


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """Answers the rank reporters' heartbeats, as the control plane would."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"should_stop": false}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _launch(trial_id: int, ranks: int, api_url: str, sleep_s: float) -> Any:
    from hpo.service.executor import AttemptLaunch

    return AttemptLaunch(
        trial_id=trial_id,
        study_id=1,
        number=trial_id,
        attempt=1,
        trainable="bench-noop",
        config={"sleep_s": sleep_s},
        params={},
        workers=ranks,
        cpus_per_worker=1,
        gpus_per_worker=0,
        api_url=api_url,
        token=None,
        objectives=[("loss", "minimize")],
        keep_metrics=["loss"],
        checkpoint_dir=f"/tmp/hpo-bench-noop/{trial_id}",
        lease_s=60,
    )


def _ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("py-spy is not installed: no profile")
        return None
    command = [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    command += ["--rate", "100", "--format", "raw", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _summarize_profile(path: Path, top: int = 10) -> list[str]:
    """Inclusive share of the dispatcher's samples per function of hpo and Ray's actor loop."""
    total = 0
    inclusive: dict[str, int] = collections.Counter()
    leaf: dict[str, int] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for frame in set(frames):
            if "runner.py" in frame or "executor.py" in frame:
                inclusive[frame] += n
    lines = [f"dispatcher samples: {total} (100/s; idle waiting counts too)"]
    for frame, n in collections.Counter(inclusive).most_common(top):
        lines.append(f"  incl {100 * n / max(total, 1):5.1f}%  {frame}")
    for frame, n in collections.Counter(leaf).most_common(top):
        lines.append(f"  self {100 * n / max(total, 1):5.1f}%  {frame}")
    return lines


def run_dispatch(cluster: SimCluster, args: argparse.Namespace) -> list[dict]:
    """No-op attempts through RayExecutor, as the scheduler launches and polls them: one at a
    time (latency), in bursts up to each of ``--tracked`` (throughput, where the CPU goes),
    then attempts that cannot be placed up to ``--pending`` (the dispatcher's own path, and
    polls with that many tracked)."""
    from hpo.service.ray_executor import RayExecutor

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api_url = f"http://127.0.0.1:{server.server_address[1]}"
    executor = RayExecutor(cluster.address, deployment="bench-" + secrets.token_hex(3))
    rows: list[dict] = []
    ids = iter(range(1, 10**9))

    def launches(count: int, **over: Any) -> list[Any]:
        made = [_launch(next(ids), args.ranks, api_url, args.sleep_s) for _ in range(count)]
        return [dataclasses.replace(launch, **over) for launch in made]

    try:
        executor.start()
        slots = args.nodes * args.cpus // args.ranks  # start every worker process once
        warm = launches(slots)
        t0 = time.perf_counter()
        for launch in warm:
            executor.launch(launch)
        _wait_all_ended(executor, args.burst_timeout, 0.05)
        for launch in warm:
            executor.release(launch.ref)
        print(f"dispatch: {slots} worker slots warm in {time.perf_counter() - t0:.0f} s")
        rows.append(_serial(executor, launches(args.serial)))
        tracked = 0
        for target in sorted(args.tracked):
            if target <= tracked:
                continue
            profile = args.profile and target == max(args.tracked)
            rows.append(_burst(cluster, executor, launches(target - tracked), args, profile))
            tracked = rows[-1]["tracked"]
        if args.pending > tracked:  # bundles larger than any node: they stay pending
            pending = launches(args.pending - tracked, cpus_per_worker=float(args.cpus * 16))
            rows.append(_burst(cluster, executor, pending, args, False, wait=False))
            t0 = time.perf_counter()
            for launch in pending:
                executor.cancel(launch.ref)
            rows[-1]["cancel_per_s"] = len(pending) / (time.perf_counter() - t0)
    finally:
        executor.shutdown()
        server.shutdown()
    return rows


def _serial(executor: Any, batch: list[Any]) -> dict:
    """Attempts one after another on warm workers: launch to every rank placed, and to done."""
    placed, done = [], []
    for launch in batch:
        t0 = time.time()
        executor.launch(launch)
        while True:
            (status,) = [s for s in executor.statuses() if s.ref == launch.ref]
            if status.state.ended:
                break
            time.sleep(0.005)
        done.append(time.time() - t0)
        if status.placements:
            placed.append(max(p.started_at for p in status.placements) - t0)
        executor.release(launch.ref)
    row = {
        "kind": "serial",
        "count": len(batch),
        "placed_p50_ms": _ms(placed, 0.5) if placed else float("nan"),
        "done_p50_ms": _ms(done, 0.5),
        "done_p95_ms": _ms(done, 0.95),
    }
    print(f"dispatch: {len(batch)} attempts one at a time, {row['done_p50_ms']:.0f} ms each")
    return row


def _burst(
    cluster: SimCluster,
    executor: Any,
    burst: list[Any],
    args: argparse.Namespace,
    profile: bool,
    wait: bool = True,
) -> dict:
    count = len(burst)
    profiler, prof_dir = None, Path(tempfile.mkdtemp(prefix="hpo-spy-"))
    prof_out = prof_dir / "dispatcher.txt"
    if profile and (pid := dispatcher_pid(cluster)):
        profiler = _profile(pid, seconds=600, out=prof_out)
    before = cpu_snapshot(cluster)
    t0 = time.perf_counter()
    launch_s = []
    for launch in burst:
        t = time.perf_counter()
        executor.launch(launch)
        launch_s.append(time.perf_counter() - t)
    launched = time.perf_counter() - t0
    polls, peak = _wait_all_ended(executor, args.burst_timeout, args.poll_s) if wait else ([], 0)
    done = time.perf_counter() - t0
    after = cpu_snapshot(cluster)
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes what it has
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(timeout=30)
    statuses = executor.statuses()
    states = collections.Counter(str(s.state) for s in statuses)
    idle_polls = []
    dispatcher = dispatcher_pid(cluster)
    cpu0 = _cpu_of(dispatcher)
    for _ in range(args.polls):
        t = time.perf_counter()
        executor.statuses()
        idle_polls.append(time.perf_counter() - t)
    poll_cpu = (_cpu_of(dispatcher) - cpu0) / args.polls
    cpu = cpu_delta(before, after)
    started_workers = sum(
        1 for pid, (c, _) in after.items() if c == "rank workers" and pid not in before
    )
    row = {
        "kind": "burst" if wait else "pending",
        "tracked": len(statuses),
        "ranks": len(statuses) * args.ranks,
        "burst": count,
        "launch_per_s": count / launched,
        "launch_p50_ms": _ms(launch_s, 0.5),
        "launch_p95_ms": _ms(launch_s, 0.95),
        "done_per_s": count / done if wait else float("nan"),
        "peak_running": peak,
        "poll_busy_p50_ms": _ms(polls, 0.5) if polls else float("nan"),
        "poll_idle_p50_ms": _ms(idle_polls, 0.5),
        "poll_idle_p95_ms": _ms(idle_polls, 0.95),
        "poll_dispatcher_cpu_ms": 1000 * poll_cpu,
        "cpu_per_attempt_ms": {k: 1000 * v / count for k, v in cpu.items()},
        "wall_s": done,
        "new_worker_processes": started_workers,
        "states": dict(states),
    }
    print(
        f"dispatch: {count} attempts → {len(statuses)} tracked in {done:.1f} s ({dict(states)})",
        flush=True,
    )
    if profiler is not None and prof_out.exists():
        row["profile"] = _summarize_profile(prof_out)
    shutil.rmtree(prof_dir, ignore_errors=True)
    return row


def _cpu_of(pid: int | None) -> float:
    import psutil

    if pid is None:
        return float("nan")
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _wait_all_ended(executor: Any, timeout: float, every_s: float) -> tuple[list[float], int]:
    """Poll every ``every_s`` (as the scheduler's tick does) until no tracked attempt runs;
    returns the poll latencies and the most attempts seen running at once."""
    from hpo.service.executor import AttemptState

    polls, peak = [], 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.perf_counter()
        statuses = executor.statuses()
        polls.append(time.perf_counter() - t)
        running = sum(1 for s in statuses if s.state == AttemptState.RUNNING)
        peak = max(peak, running)
        if all(s.state.ended for s in statuses):
            return polls, peak
        time.sleep(every_s)
    raise RuntimeError(f"attempts still running after {timeout} s")


# --------------------------------------------------------------- control planes (2, 3)


def _ts(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


def _synthetic(name: str, steps: int, step_s: float, **over: Any) -> dict:
    spec: dict = {
        "name": name,
        "objective": {"metric": "loss", "direction": "minimize"},
        "sampler": {"type": "random", "seed": 0},
        "budget": {"max_trials": 1},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "trainable": {"name": "synthetic", "config": {"steps": steps, "step_s": step_s}},
        "space": {"x": {"type": "float", "low": -1, "high": 1}},
        "lease_s": 60,
    }
    spec.update(over)
    return spec


def _server_env(cluster: SimCluster, storage: Path, **extra: str) -> dict[str, str]:
    return {
        "HPO_RAY_ADDRESS": cluster.address,
        "HPO_STORAGE_PATH": str(storage),
        "HPO_SCHEDULER_INTERVAL_S": "0.2",
        "RAY_AUTH_MODE": "token",
        **extra,
    }


def run_node_loss(cluster: SimCluster, args: argparse.Namespace, tmp: Path) -> dict:
    """One checkpointing trial; kill -9 the node its rank runs on; time until it runs again."""
    from tests.conftest import ServerProcess, wait_for

    (tmp / "node-loss").mkdir()
    server = ServerProcess(
        f"sqlite:///{tmp / 'node-loss' / 'hpo.db'}",
        tmp / "node-loss",
        _server_env(cluster, tmp / "shared-checkpoints"),
    )
    server.start()
    try:
        client = server.client()
        study = client.create_study(_synthetic("node-loss", args.steps, args.step_s))
        trial = wait_for(lambda: study.trials(state="running"), 120, "a running trial")[0]
        wait_for(
            lambda: len(study.metrics(trial.id, "loss")) >= args.kill_after_step,
            120,
            "the trial's first steps",
        )
        record = client.trial(trial.id)
        pid = record.placement["ranks"][0]["pid"]
        node = cluster.node_of(pid)
        if node is None or node.name == "head":
            raise RuntimeError(f"rank pid {pid} is on no extra raylet")
        killed_at = time.time()
        n = node.kill()
        steps_before = len(study.metrics(trial.id, "loss"))
        print(f"node loss: killed {node.name} ({n} processes) at step {steps_before}", flush=True)

        def rerunning() -> Any:
            t = client.trial(trial.id)
            placed = t.placement or {}
            if t.attempts >= 2 and placed.get("attempt", 0) >= 2 and placed.get("ranks"):
                return t
            if t.state in ("failed", "complete"):
                return t
            return None

        again = wait_for(rerunning, 300, "the trial's next attempt")
        seen_at = time.time()
        done = wait_for(
            lambda: (t := client.trial(trial.id)).state in ("complete", "failed") and t,
            300,
            "the trial to end",
        )
        failed = [e for e in done.events or [] if e.state == "failed"]
        relaunched = [e for e in done.events or [] if e.state == "running" and e.attempt >= 2]
        points = study.metrics(trial.id, "loss")
        steps = [p.step for p in points]
        placed = (again.placement or {}).get("ranks") or [{}]
        new_node = cluster.node_of(placed[0].get("pid", -1))
        return {
            "killed_node": node.name,
            "killed_at_step": steps_before,
            "loss_noticed_s": _ts(failed[0].time) - killed_at if failed else float("nan"),
            "relaunched_s": _ts(relaunched[0].time) - killed_at if relaunched else float("nan"),
            "running_again_s": placed[0].get("started_at", seen_at) - killed_at,
            "new_node": new_node.name if new_node else "?",
            "attempts": done.attempts,
            "state": done.state,
            "loss_detail": (failed[0].detail or "")[:160] if failed else "",
            "resumed_after_step": _resumed_after(points),
            "duplicate_steps": len(steps) - len(set(steps)),
            "steps": f"{len(set(steps))}/{args.steps}",
        }
    finally:
        server.stop()


def _resumed_after(points: list[Any]) -> int | None:
    """The checkpoint step the later attempt resumed from: the step before its first point."""
    later = [p.step for p in points if p.attempt >= 2]
    return min(later) - 1 if later else None


class Forwarder:
    """A TCP forwarder in front of the replicas (what a load balancer or a Service does): each
    connection goes to the first replica that accepts it."""

    def __init__(self, backends: list[int]) -> None:
        from hpo.api.demo import free_port

        self.backends = backends
        self.down: set[int] = set()  # what a load balancer's health check has taken out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(server.serve_forever())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in [p for p in self.backends if p not in self.down]:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def _lease_epoch(url: str) -> int:
    """The scheduler lease's epoch: 1 + how many times it changed hands."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT epoch FROM leases WHERE name = 'scheduler'").fetchone()
    return int(row[0]) if row else 0


def _health(server: Any) -> dict:
    import httpx

    try:
        return httpx.get(server.url + "/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def run_failover(cluster: SimCluster, args: argparse.Namespace, tmp: Path, freeze: bool) -> dict:
    """Two replicas on one PostgreSQL database; kill -9 (or SIGSTOP) the leader mid-study."""
    from hpo.api.demo import free_port
    from tests.conftest import ServerProcess, create_pg_database, drop_pg_database, wait_for

    url = create_pg_database()
    ports = [free_port(), free_port()]
    forwarder = Forwarder(ports)
    env = _server_env(
        cluster,
        tmp / "shared-checkpoints",
        HPO_SCHEDULER_LEASE_S=str(args.lease_s),
        HPO_PUBLIC_URL=forwarder.url,
    )
    servers: list[Any] = []
    try:
        for name, port in zip(("a", "b"), ports, strict=True):
            (tmp / f"{name}-{freeze}").mkdir()
            server = ServerProcess(url, tmp / f"{name}-{freeze}", env)
            server.port, server.url = port, f"http://127.0.0.1:{port}"
            server.start()
            servers.append(server)
        leader = wait_for(
            lambda: next((s for s in servers if _health(s).get("scheduler") == "running"), None),
            60,
            "a leader",
        )
        standby = next(s for s in servers if s is not leader)
        study = standby.client().create_study(
            _synthetic(
                "failover",
                args.fo_steps,
                args.step_s,
                budget={"max_trials": args.fo_trials, "max_concurrent": args.fo_concurrent},
            )
        )
        wait_for(
            lambda: study.refresh().counts.get("complete", 0) >= args.fo_concurrent,
            180,
            "the first trials to complete",
        )
        wait_for(lambda: study.trials(state="running"), 60, "trials in flight")
        epoch_before = _lease_epoch(url)
        leader = wait_for(  # again: under load a leader can lose the lease mid-study
            lambda: next((s for s in servers if _health(s).get("scheduler") == "running"), None),
            60,
            "the leader now",
        )
        standby = next(s for s in servers if s is not leader)
        study = standby.client().study(study.id)
        known = {t.id for t in study.trials()}
        in_flight = {t.id for t in study.trials(state="running")}
        assert leader.proc is not None
        forwarder.down.add(leader.port)  # its health check fails (not timed here)
        killed_at = time.time()
        if freeze:  # hung, or on another host: its process looks alive, the lease must expire
            os.kill(leader.proc.pid, signal.SIGSTOP)
        else:  # and reaped, as its supervisor would: the standby sees the holder is gone
            os.kill(leader.proc.pid, signal.SIGKILL)
            leader.proc.wait(timeout=30)
        print(f"failover: leader {'frozen' if freeze else 'killed'}", flush=True)
        wait_for(lambda: _health(standby).get("scheduler") == "running", 120, "the take-over")
        leading_s = time.time() - killed_at
        client = standby.client()

        def new_launch() -> Any:
            fresh = [t for t in study.trials() if t.id not in known and t.started_at]
            return min(fresh, key=lambda t: _ts(t.started_at)) if fresh else None

        first_new = wait_for(new_launch, 120, "a trial launched by the new leader")
        launched_s = _ts(first_new.started_at) - killed_at
        wait_for(lambda: study.refresh().state in ("completed", "stopped"), 300, "the study")
        trials = [client.trial(t.id) for t in study.trials()]
        numbers = [t.number for t in trials]
        duplicated = 0
        for t in trials:
            steps = [p.step for p in study.metrics(t.id, "loss")]
            duplicated += len(steps) - len(set(steps))
        adopted = [t for t in trials if t.id in in_flight]
        return {
            "handovers_before_kill": epoch_before - 1,
            "handovers_after_kill": _lease_epoch(url) - epoch_before,
            "leader_s": leading_s,
            "next_launch_s": launched_s,
            "trials": len(trials),
            "numbers_unique": len(set(numbers)) == len(numbers) == args.fo_trials,
            "states": dict(collections.Counter(str(t.state) for t in trials)),
            "attempts": dict(collections.Counter(t.attempts for t in trials)),
            "in_flight_at_kill": len(in_flight),
            "in_flight_attempts": [t.attempts for t in adopted],
            "duplicate_points": duplicated,
            "lease_s": args.lease_s,
            "mode": "SIGSTOP (lease expiry)" if freeze else "kill -9 (holder gone)",
        }
    finally:
        for server in servers:
            if freeze and server.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.proc.pid, signal.SIGCONT)
            server.stop()
        drop_pg_database(url)


# ------------------------------------------------------------- part 4: scheduler tick


def run_tick(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """In-process, no Ray: what a scheduler tick's study queries cost as completed studies
    accumulate, and the fair-share sort of ``Scheduler._launch`` per launch."""
    from hpo.service.db import make_engine, upgrade_schema
    from hpo.service.executor import AttemptRef
    from hpo.service.scheduler import Scheduler, _InFlight
    from hpo.service.spec import StudySpec
    from hpo.service.storage import Storage
    from hpo.service.studies import StudyService

    engine = make_engine(args.tick_database or f"sqlite:///{tmp / 'tick.db'}")
    upgrade_schema(engine)
    service = StudyService(Storage(engine))
    rows: list[dict] = []
    done = 0
    for target in sorted(args.completed):
        while done < target:  # a one-trial study, told and evaluated: nothing left to do
            spec = StudySpec.model_validate(_synthetic(f"done-{done}", 1, 0.0))
            study = service.create_study(spec)
            trial = service.ask(study.id, dispatched=True)
            service.tell(trial.id, values=[0.5])
            service.storage.set_test_metrics(trial.id, {"test_loss": 0.5})
            done += 1
        row: dict[str, Any] = {"kind": "queries", "completed": done}
        for name, call in (
            ("studies_to_evaluate", lambda: service.studies_to_evaluate(set())[0]),
            ("dispatched_studies", service.dispatched_studies),
        ):
            call()
            t0 = time.perf_counter()
            for _ in range(5):
                call()
            row[name + "_ms"] = 1000 * (time.perf_counter() - t0) / 5
        rows.append(row)
        print(f"tick: {done} completed studies measured", flush=True)
    engine.dispose()
    scheduler = Scheduler.__new__(Scheduler)  # only its in-flight table and turn counter
    for studies, in_flight in ((10, 100), (100, 1000)):
        scheduler.in_flight = {
            AttemptRef(i, 1): _InFlight(i % studies, 1) for i in range(in_flight)
        }
        scheduler._turn = 0
        candidates = [(sid, None) for sid in range(studies)]
        t0 = time.perf_counter()
        for _ in range(20):  # the sort of one iteration of _launch's loop
            scheduler._turn += 1
            candidates.sort(key=lambda c: (scheduler._count(c[0]), (c[0] + scheduler._turn) % 997))
        ms = 1000 * (time.perf_counter() - t0) / 20
        rows.append({"kind": "fair share", "studies": studies, "in_flight": in_flight, "ms": ms})
    return rows


# ---------------------------------------------------------------------------- report


def report(
    dispatch: list[dict], node: dict | None, failover: list[dict], args: Any, tick: list[dict] = ()
) -> None:
    if dispatch:
        print(f"\n### Dispatch ({args.ranks} rank(s) per attempt, no-op trainable)\n")
        for r in dispatch:
            if r["kind"] == "serial":
                print(
                    f"one at a time ({r['count']}): launch → ranks placed p50 "
                    f"{r['placed_p50_ms']:.0f} ms, → done p50 {r['done_p50_ms']:.0f} ms "
                    f"(p95 {r['done_p95_ms']:.0f} ms)\n"
                )
        bursts = [r for r in dispatch if r["kind"] != "serial"]
        print(
            "| attempts | tracked (ranks) | launches/s (launch p50 / p95 ms) | finished/s | "
            "peak running | new worker processes | poll while busy p50 ms | "
            "poll idle p50 / p95 ms | dispatcher CPU ms per poll |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in bursts:
            kind = "no-op" if r["kind"] == "burst" else "pending (unplaceable)"
            print(
                f"| {r['burst']} {kind} | {r['tracked']} ({r['ranks']}) | "
                f"{r['launch_per_s']:.0f} ({r['launch_p50_ms']:.1f} / {r['launch_p95_ms']:.1f})"
                f" | {r['done_per_s']:.1f} | {r['peak_running']} | {r['new_worker_processes']} "
                f"| {r['poll_busy_p50_ms']:.1f} | {r['poll_idle_p50_ms']:.1f} / "
                f"{r['poll_idle_p95_ms']:.1f} | {r['poll_dispatcher_cpu_ms']:.1f} |"
            )
        for r in bursts:
            if "cancel_per_s" in r:
                print(f"\ncancelled the {r['burst']} pending attempts at {r['cancel_per_s']:.0f}/s")
        cats = sorted({c for r in bursts for c in r["cpu_per_attempt_ms"]})
        print("\nCPU ms per attempt, by process (same bursts, polls included):\n")
        print("| attempts | " + " | ".join(cats) + " | total |")
        print("|---|" + "---|" * (len(cats) + 1))
        for r in bursts:
            cpu = r["cpu_per_attempt_ms"]
            cells = " | ".join(f"{cpu.get(c, 0.0):.1f}" for c in cats)
            print(f"| {r['burst']} {r['kind']} | {cells} | {sum(cpu.values()):.1f} |")
        for r in bursts:
            for line in r.get("profile", []):
                print(line)
    for r in tick:
        if r["kind"] == "queries":
            print(
                f"tick: {r['completed']} completed studies: studies_to_evaluate "
                f"{r['studies_to_evaluate_ms']:.1f} ms, dispatched_studies "
                f"{r['dispatched_studies_ms']:.1f} ms per tick"
            )
        else:
            print(
                f"tick: fair-share sort with {r['studies']} studies, {r['in_flight']} in "
                f"flight: {r['ms']:.2f} ms per launch"
            )
    if node:
        print("\n### Node loss\n")
        print(
            "| killed | at step | loss recorded | attempt 2 launched | attempt 2 running | "
            "on | resumed after step | duplicate steps | outcome |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {node['killed_node']} | {node['killed_at_step']} | "
            f"{node['loss_noticed_s']:.1f} s | {node['relaunched_s']:.1f} s | "
            f"{node['running_again_s']:.1f} s | {node['new_node']} | "
            f"{node['resumed_after_step']} | {node['duplicate_steps']} | "
            f"{node['state']}, {node['attempts']} attempts, steps {node['steps']} |"
        )
        print(f"loss recorded as: {node['loss_detail']}")
    if failover:
        print("\n### Leader failover\n")
        print(
            "| leader | lease_s | standby leads after | next trial launched after | "
            "in flight at kill (attempts after) | trials (states) | attempts per trial | "
            "duplicate points | lease handovers before / after |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for f in failover:
            print(
                f"| {f['mode']} | {f['lease_s']} | {f['leader_s']:.1f} s | "
                f"{f['next_launch_s']:.1f} s | {f['in_flight_at_kill']} "
                f"({f['in_flight_attempts']}) | {f['trials']} ({f['states']}) | "
                f"{f['attempts']} | {f['duplicate_points']} | "
                f"{f['handovers_before_kill']} / {f['handovers_after_kill']} |"
            )
        print(f"every trial number once: {[f['numbers_unique'] for f in failover]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=["dispatch", "node-loss", "failover", "tick"],
        nargs="*",
        help="parts to run (default: dispatch, node-loss, failover; tick only when named)",
    )
    parser.add_argument(
        "--completed", type=int, nargs="+", default=[10, 100, 300], help="tick: studies"
    )
    parser.add_argument(
        "--tick-database", help="tick: an empty database URL (default: a SQLite file)"
    )
    parser.add_argument("--nodes", type=int, default=3, help="extra raylets")
    parser.add_argument("--cpus", type=int, default=4, help="fake CPUs per raylet")
    parser.add_argument(
        "--tracked", type=int, nargs="+", default=[50, 150], help="no-op attempts tracked"
    )
    parser.add_argument(
        "--pending", type=int, default=1000, help="then attempts tracked, unplaceable ones added"
    )
    parser.add_argument("--serial", type=int, default=10, help="attempts one at a time")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per no-op attempt")
    parser.add_argument("--sleep-s", type=float, default=0.0, help="no-op attempt duration")
    parser.add_argument("--polls", type=int, default=20, help="timed polls per burst")
    parser.add_argument(
        "--poll-s", type=float, default=0.2, help="poll interval in bursts (a scheduler tick)"
    )
    parser.add_argument("--burst-timeout", type=float, default=600)
    parser.add_argument("--profile", action="store_true", help="py-spy the dispatcher")
    parser.add_argument("--steps", type=int, default=30, help="node-loss trial steps")
    parser.add_argument("--step-s", type=float, default=0.3)
    parser.add_argument("--kill-after-step", type=int, default=5)
    parser.add_argument("--lease-s", type=float, default=3.0, help="HPO_SCHEDULER_LEASE_S")
    parser.add_argument("--fo-trials", type=int, default=9)
    parser.add_argument("--fo-concurrent", type=int, default=3)
    parser.add_argument("--fo-steps", type=int, default=8)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["kill", "freeze"],
        default=["kill", "freeze"],
        help="failover drills: kill -9 the leader; SIGSTOP it (its lease must expire)",
    )
    args = parser.parse_args()
    only = set(args.only or ["dispatch", "node-loss", "failover"])
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default for clusters from 2.61
    if not Path("~/.ray/auth_token").expanduser().exists():  # every process gets this one
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ["HPO_EXTRA_TRAINABLES"] = NOOP
    started = time.perf_counter()
    dispatch, node, failover, tick = [], None, [], []
    with tempfile.TemporaryDirectory(prefix="hpo-cluster-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "tick" in only:
            tick = run_tick(args, tmp)
            report([], None, [], args, tick)
        with contextlib.ExitStack() as stack:
            if only & {"dispatch", "node-loss", "failover"}:
                cluster = stack.enter_context(sim_cluster(args.nodes, args.cpus))
            if "dispatch" in only:
                dispatch = run_dispatch(cluster, args)
                report(dispatch, None, [], args)
            if "node-loss" in only:
                node = run_node_loss(cluster, args, tmp)
                report([], node, [], args)
            for mode in args.modes if "failover" in only else []:  # on the nodes left
                failover.append(run_failover(cluster, args, tmp, mode == "freeze"))
                report([], None, failover[-1:], args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores")
    figures = {"dispatch": dispatch, "node_loss": node, "failover": failover, "tick": tick}
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()

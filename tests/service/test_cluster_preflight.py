"""The node preflight on a real two-raylet Ray cluster on this host, with real ``hpo serve``
processes: every node passes (``/healthz`` 200 listing both), a node that joins later is
checked, a node that cannot write the checkpoint storage (a read-only bind mount in its own
mount namespace: the other node writes the same path) is a 503 naming that node and the
check, an ERROR in the log and a failed ``hpo doctor`` (and a standby replica's ``/healthz``
says the same), and an unreachable ``HPO_PUBLIC_URL``
fails the control-plane check of every node. The same cluster (1 CPU a node) shows placement
per node: a rank larger than every node is failed or refused naming the field, and a DDP trial
of two 1-CPU ranks runs with one rank on each node.

The raylets run under ``unshare --mount`` (we run as root); the cluster is stopped by the PIDs
of its own process groups, never with ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hpo.api.demo import free_port
from tests.api.test_cli import watch_output
from tests.conftest import ServerProcess, wait_for
from tests.service.test_dispatch import RAY_ENV, finished, synthetic

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}
NODE_FLAGS = ["--block", "--num-cpus=1", "--object-store-memory=150000000"]


class Cluster:
    """A Ray head and extra raylets on this host; each node is told apart by a custom
    resource named after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ids: dict[str, str] = {}
        self.temps: list[str] = []

    def start_node(
        self, name: str, read_only: Path | None = None, own: tuple[Path, Path] | None = None
    ) -> str:
        """Start a raylet (the head first) and return its node id once it is registered.
        ``read_only``: a folder this node alone sees read-only; ``own``: (source, target), a
        folder of its own this node alone sees at ``target`` (bind mounts in its own mount
        namespace)."""
        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are long
        self.temps.append(temp)
        flags = [*NODE_FLAGS, f"--temp-dir={temp}", "--disable-usage-stats"]
        flags.append(f"--resources={json.dumps({f'hpo_test_{name}': 1})}")
        if not self.procs:
            flags += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            flags.append(f"--address={self.address}")
        command = [RAY, "start", *flags]
        if read_only is not None or own is not None:
            script = ""
            if read_only is not None:
                script += (
                    f'mount --bind "{read_only}" "{read_only}" && '
                    f'mount -o remount,bind,ro "{read_only}" && '
                )
            if own is not None:
                script += f'mount --bind "{own[0]}" "{own[1]}" && '
            script += 'exec "$@"'
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "-"]
            command += [RAY, "start", *flags]
        log = open(self.root / f"ray-{name}.log", "w")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(
            command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ids[name] = wait_for(lambda: self._node_id(name), 120, f"Ray node {name}")
        return self.ids[name]

    def stop_node(self, name: str) -> None:
        """End one raylet (and what it started) by its process group."""
        proc = self.procs.pop(name)
        proc.terminate()  # a graceful stop unregisters the node
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop_node(name)
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)

    def _node_id(self, name: str) -> str | None:
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps([(n['NodeID'], n['Resources']) for n in ray.nodes() "
            "if n['Alive']]))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=90
        )
        if done.returncode != 0:
            return None
        for node_id, resources in json.loads(done.stdout.strip().splitlines()[-1]):
            if f"hpo_test_{name}" in resources:
                return node_id
        return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Head ``a`` and node ``b``; node ``b`` alone sees ``cluster.root / "b-read-only"``
    read-only, and a folder of its own at ``cluster.root / "b-own"``."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a per-node mount")
    root = tmp_path_factory.mktemp("cluster")
    for folder in ("b-read-only", "b-own", "b-own-source"):
        (root / folder).mkdir()
    cluster = Cluster(root)
    try:
        cluster.start_node("a")
        cluster.start_node(
            "b", read_only=root / "b-read-only", own=(root / "b-own-source", root / "b-own")
        )
        yield cluster
    finally:
        cluster.stop()


def serve(
    tmp: Path, cluster: Cluster, storage: Path, *, public_url: str | None = None
) -> ServerProcess:
    """``hpo serve`` on the cluster, its checkpoints in ``storage``, reachable at its own URL
    (or ``public_url``); started without waiting for a healthy answer."""
    server = ServerProcess(
        f"sqlite:///{tmp / 'hpo.db'}",
        tmp,
        {
            "HPO_RAY_ADDRESS": cluster.address,
            "HPO_STORAGE_PATH": str(storage),
            "HPO_SCHEDULER_INTERVAL_S": "0.5",
            "HPO_PREFLIGHT_TIMEOUT_S": "90",  # a bound only: a busy host starts workers slowly
        },
    )
    server.extra_env["HPO_PUBLIC_URL"] = public_url or server.url
    server.start(healthy=False)
    return server


def health(server: ServerProcess) -> httpx.Response:
    return httpx.get(server.url + "/healthz", timeout=10)


def settled(server: ServerProcess, nodes: int) -> httpx.Response | None:
    """/healthz once the preflight of ``nodes`` nodes has ended (passed or failed)."""
    response = health(server)
    report = response.json().get("preflight", {})
    states = [n["state"] for n in report.get("nodes", [])]
    if len(states) == nodes and "pending" not in states:
        return response
    return None


def doctor(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **ENV,
        "HPO_DATABASE_URL": server.database_url,
        "HPO_DATA_DIR": str(server.data_dir),
        **server.extra_env,
    }
    return subprocess.run(
        [sys.executable, "-m", "hpo.api.cli", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_ranks_are_placed_per_node_on_a_two_node_cluster(tmp_path: Path, cluster: Cluster) -> None:
    """Placement per node (first: before node c joins): a rank larger than every node is failed
    with the reason (the cluster was not known yet when its study was created) or refused
    with 422 (once it is), and a DDP trial of two 1-CPU ranks runs with one rank on each."""
    # a replica on the database that serves the API only: it judges new studies by the
    # snapshot the scheduling server stores there. It starts first, so the "early" study is
    # created before any server knew the cluster (the scheduling one connects to a cluster
    # at once, for the node preflight, and publishes the nodes within its first tick).
    (tmp_path / "replica").mkdir()
    database = f"sqlite:///{tmp_path / 'hpo.db'}"
    replica = ServerProcess(database, tmp_path / "replica", {"HPO_SCHEDULER": "false"})
    server = ServerProcess(database, tmp_path, {**RAY_ENV, "HPO_RAY_ADDRESS": cluster.address})
    server.token = replica.token
    try:
        replica.start()
        too_big = {"workers_per_trial": 1, "cpus_per_worker": 2}
        # created before the control plane knew the cluster: accepted, then its trial fails
        early_id = replica.client().create_study(synthetic("early", resources=too_big)).id
        server.start()
        client = server.client()
        early = client.study(early_id)
        finished(early, timeout=90)  # bounded: never "running" forever
        (trial,) = early.trials()
        trial = client.trial(trial.id)
        assert trial.state == "failed" and trial.attempts == 1
        assert "resources.cpus_per_worker" in trial.error
        assert "the largest of its 2 node(s) has 1" in trial.error
        assert any(e.detail.startswith("[deterministic]") for e in trial.events)

        # the cluster is known now: the same spec is refused at creation, naming the field,
        # by either replica
        for served in (server, replica):
            with served.http() as http:
                refused = http.post("/api/v1/studies", json=synthetic("late", resources=too_big))
            assert refused.status_code == 422, refused.text
            assert refused.json()["field"] == "resources.cpus_per_worker"
            assert "no node" in refused.json()["message"]
        with replica.http() as http:
            three = {"workers_per_trial": 3, "cpus_per_worker": 1}
            refused = http.post("/api/v1/studies", json=synthetic("three", resources=three))
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "resources.workers_per_trial"

        # two 1-CPU ranks: one on each node, gloo across them
        ddp = client.create_study(synthetic("across"))
        finished(ddp, timeout=120)
        (trial,) = ddp.trials()
        trial = client.trial(trial.id)
        assert trial.state == "complete", trial.error
        ranks = trial.placement["ranks"]
        assert trial.placement["world_size"] == 2
        assert len({r["node_id"] for r in ranks}) == 2
    finally:
        replica.stop()
        server.stop()


def test_every_node_passes_and_doctor_agrees(tmp_path: Path, cluster: Cluster) -> None:
    server = serve(tmp_path, cluster, tmp_path / "checkpoints")
    try:
        response = wait_for(lambda: settled(server, 2), 180, "the preflight of both nodes")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["warnings"] == []
        nodes = {n["node_id"]: n for n in body["preflight"]["nodes"]}
        assert set(nodes) == {cluster.ids["a"], cluster.ids["b"]}
        assert all(n["state"] == "ok" and n["failures"] == {} for n in nodes.values())
        done = doctor(server, "--url", server.url)
        assert done.returncode == 0, done.stdout + done.stderr
        for name in ("a", "b"):
            assert f"ok    node: node {cluster.ids[name]} (" in done.stdout
        assert "ok    ray: connected to" in done.stdout
    finally:
        server.stop()


def test_a_node_that_cannot_write_the_storage_is_named(tmp_path: Path, cluster: Cluster) -> None:
    server = serve(tmp_path, cluster, cluster.root / "b-read-only")
    try:
        response = wait_for(lambda: settled(server, 2), 180, "the preflight of both nodes")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        body = response.json()
        (failure,) = body["details"]
        assert failure["node_id"] == cluster.ids["b"] and failure["check"] == "storage"
        assert "Read-only file system" in failure["message"]
        assert f"node {cluster.ids['b']}" in body["message"] and "storage" in body["message"]
        log = server.log_path.read_text()
        assert f"ERROR hpo.preflight: preflight failed: node {cluster.ids['b']} (" in log
        assert "storage check failed" in log
        done = doctor(server, "--url", server.url)
        assert done.returncode != 0
        assert f"FAIL  node: node {cluster.ids['b']} (" in done.stdout
        assert "storage check failed" in done.stdout
        assert "ok    storage:" in done.stdout  # from this host the folder is writable
        assert f"FAIL  node: node {cluster.ids['a']}" not in done.stdout
        # a second server on the same database stands by (runs no preflight) and says the same
        (tmp_path / "standby").mkdir()
        standby = ServerProcess(server.database_url, tmp_path / "standby", server.extra_env)
        standby.start(healthy=False)
        try:
            answer = health(standby)
            assert answer.status_code == 503 and answer.json()["details"] == body["details"]
            assert "runs the scheduler on this database" in standby.log_path.read_text()
        finally:
            standby.stop()
    finally:
        server.stop()


def test_an_unreachable_public_url_fails_every_node(tmp_path: Path, cluster: Cluster) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    server = serve(tmp_path, cluster, tmp_path / "checkpoints", public_url=nowhere)
    try:
        response = wait_for(lambda: settled(server, 2), 180, "the preflight of both nodes")
        assert response.status_code == 503, response.text
        failures = response.json()["details"]
        assert {f["node_id"] for f in failures} == {cluster.ids["a"], cluster.ids["b"]}
        assert {f["check"] for f in failures} == {"control-plane"}
        assert all(nowhere in f["message"] for f in failures)
        # hpo watch of a study waiting for the nodes says why
        with server.http() as http:
            created = http.post("/api/v1/studies", json=synthetic("waits-for-nodes"))
            assert created.status_code == 201, created.text
        seen = watch_output(server, "waits-for-nodes", until="preflight failed")
        assert "the cluster preflight failed" in seen and nowhere in seen, seen
        # doctor from this machine: the same URL, and storage under a regular file
        (tmp_path / "a-file").write_text("")
        server.extra_env["HPO_STORAGE_PATH"] = str(tmp_path / "a-file" / "checkpoints")
        del server.extra_env["HPO_RAY_ADDRESS"]
        done = doctor(server)
        assert done.returncode != 0
        assert "FAIL  storage: checkpoint storage" in done.stdout
        assert f"FAIL  public-url: cannot reach the control plane at {nowhere}" in done.stdout
    finally:
        server.stop()


def test_a_node_that_joins_later_is_checked(tmp_path: Path, cluster: Cluster) -> None:
    server = serve(tmp_path, cluster, tmp_path / "checkpoints")
    try:
        first = wait_for(lambda: settled(server, 2), 180, "the preflight of both nodes")
        assert first.status_code == 200, first.text
        joined = cluster.start_node("c")
        try:
            response = wait_for(lambda: settled(server, 3), 180, "the joining node's preflight")
            assert response.status_code == 200, response.text
            nodes = {n["node_id"]: n["state"] for n in response.json()["preflight"]["nodes"]}
            assert nodes[joined] == "ok"
            assert f"preflight: node {joined} (" in server.log_path.read_text()
        finally:
            cluster.stop_node("c")
    finally:
        server.stop()


def test_a_node_whose_storage_is_a_folder_of_its_own_is_named(
    tmp_path: Path, cluster: Cluster
) -> None:
    """Node b writes and reads its folder fine, but it is not the one the control plane and
    node a share: its checkpoints would vanish for every retry elsewhere and for downloads."""
    server = serve(tmp_path, cluster, cluster.root / "b-own")
    try:
        response = wait_for(lambda: settled(server, 2), 180, "the preflight of both nodes")
        assert response.status_code == 503, response.text
        (failure,) = response.json()["details"]
        assert failure["node_id"] == cluster.ids["b"] and failure["check"] == "storage"
        assert "is not the storage the control plane writes" in failure["message"]
        assert "is missing here" in failure["message"]
    finally:
        server.stop()

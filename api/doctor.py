"""``hpo doctor``: checks a deployment from this machine's settings, one line per check, so
what is wrong (and what to do about it) shows before a study hangs.

Checks, in order: the database (reachable, migrated to the newest schema), the cluster
settings (:func:`hpo.service.preflight.config_warnings`), the Ray address (its token when
token auth is on, the address reachable within the timeout, a driver connects), the
checkpoint storage (a probe file written and read from here), the control plane at the URL
workers post to, and, with ``--url``, a running server's ``/healthz`` with its per-node
preflight. Heavy libraries are imported here only, when the command runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from hpo.service.settings import Settings


@dataclass(frozen=True)
class Check:
    """One line of the report: the check's name, whether it passed, and what it found (for a
    failure: what is wrong and what to do)."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.message}"


def run_checks(settings: Settings, url: str | None = None, timeout_s: float = 10.0) -> list[Check]:
    """Every check, in order (none raises: an unexpected error is that check's failure)."""
    checks, deployment = _guarded("database", lambda: _database(settings))
    steps = [
        ("settings", lambda: _cluster_settings(settings)),
        ("ray", lambda: _ray(settings, timeout_s)),
        ("storage", lambda: _storage(settings)),
        ("public-url", lambda: _public_url(settings, deployment, timeout_s, url)),
    ]
    if url:
        steps.append(("server", lambda: _server(url, timeout_s)))
    for name, step in steps:
        checks.extend(_guarded(name, lambda step=step: (step(), None))[0])
    return checks


def _guarded(name: str, step: Any) -> tuple[list[Check], str | None]:
    try:
        return step()
    except Exception as exc:
        return [Check(name, False, f"{type(exc).__name__}: {exc}")], None


# ---------------------------------------------------------------------- checks


def _database(settings: Settings) -> tuple[list[Check], str | None]:
    """The database check, and the deployment id stored in it."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from hpo.service.db.engine import alembic_config, make_engine, schema_problem

    url = settings.database_url or f"sqlite:///{settings.data_dir / 'hpo.db'}"
    shown = make_url(url).render_as_string(hide_password=True)
    database = make_url(url).database
    if url.startswith("sqlite") and database and not Path(database).exists():
        return [Check("database", False, f"{shown} does not exist: start `hpo serve` once")], None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        if current != head and (problem := schema_problem(engine)) is not None:
            return [Check("database", False, f"{shown}: {problem}")], None
        with engine.connect() as conn:
            if current != head:
                why = (
                    f"{shown} is at schema revision {current or 'none'}, the newest is "
                    f"{head}: start `hpo serve` of this version once (it migrates at start)"
                )
                return [Check("database", False, why)], None
            row = conn.execute(text("SELECT value FROM meta WHERE key = 'deployment_id'")).first()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [Check("database", False, f"cannot use {shown}: {first}")], None
    finally:
        engine.dispose()
    deployment = row[0] if row else None
    found = f"{shown} at schema revision {head} (the newest), deployment {deployment or '-'}"
    return [Check("database", True, found)], deployment


def _cluster_settings(settings: Settings) -> list[Check]:
    from hpo.service.preflight import config_warnings

    warnings = config_warnings(settings)
    if not warnings:
        return [Check("settings", True, "nothing in the HPO_* settings breaks a cluster")]
    return [Check("settings", False, warning) for warning in warnings]


def _ray(settings: Settings, timeout_s: float) -> list[Check]:
    address = settings.ray_address
    if not address:
        return [Check("ray", True, "HPO_RAY_ADDRESS is unset: hpo serve starts a local Ray")]
    mode = os.environ.get("RAY_AUTH_MODE", "token")  # what hpo serve sets when it connects
    if mode == "token":
        found, where = ray_token()
        if not found:
            return [Check("ray", False, where)]
    host, port = _host_port(address)
    if host is not None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as exc:
            return [
                Check(
                    "ray",
                    False,
                    f"nothing answers at {address} ({host}:{port}: {exc}): is the Ray head up, "
                    "and is HPO_RAY_ADDRESS its GCS address (ray://host:10001 from a pod "
                    "without a raylet)?",
                )
            ]
    return [_ray_connect(address, mode, max(timeout_s, 30.0))]


def ray_token() -> tuple[bool, str]:
    """Whether a Ray token is available here, looked for where Ray 2.60's token loader looks
    (``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH`` names, then
    ``~/.ray/auth_token``), and where it was found or what to do."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        path = Path(named).expanduser()
        if path.is_file() and path.read_text().strip():
            return True, str(path)
        return False, (
            f"RAY_AUTH_TOKEN_PATH is {named} but that file is missing or empty: copy the "
            "cluster's token there (`ray get-auth-token` on the head prints it)"
        )
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return True, str(default)
    return False, (
        "Ray token auth is on (RAY_AUTH_MODE=token) but no token is here: set RAY_AUTH_TOKEN, "
        "or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token "
        "(`ray get-auth-token` on the head prints it)"
    )


def _host_port(address: str) -> tuple[str | None, int]:
    """The host and port a Ray address connects to (None for ``auto`` and the like)."""
    if "://" in address:
        parts = urlsplit(address)
        return parts.hostname, parts.port or 10001
    if ":" not in address:
        return None, 0
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _ray_connect(address: str, mode: str, timeout_s: float) -> Check:
    """Connect a Ray driver in a subprocess (so a hang is bounded and nothing of Ray stays in
    this process) and count the alive nodes."""
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', "
        "log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    env = {**os.environ, "RAY_AUTH_MODE": mode}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return Check(
            "ray", False, f"a Ray driver did not connect to {address} within {timeout_s:g} s"
        )
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        return Check("ray", False, f"cannot connect to {address}: {last[-400:]}")
    nodes = done.stdout.strip().splitlines()[-1]
    return Check("ray", True, f"connected to {address}: {nodes} alive node(s)")


def _storage(settings: Settings) -> list[Check]:
    from hpo.workers.storage import StorageError, probe

    root = str(settings.checkpoint_dir)
    try:
        probe(root, name=f"doctor-{socket.gethostname()}")
    except StorageError as exc:
        return [
            Check(
                "storage",
                False,
                f"{exc}: set HPO_STORAGE_PATH to storage this machine and every node can write",
            )
        ]
    return [Check("storage", True, f"wrote and read a probe file under {root}")]


def _public_url(
    settings: Settings, deployment: str | None, timeout_s: float, server: str | None = None
) -> list[Check]:
    """Whether the control plane answers where workers post metrics: ``HPO_PUBLIC_URL``, else
    the server ``--url`` names (a local server's workers post to its own address), else
    ``HPO_HOST``:``HPO_PORT``."""
    from hpo.workers.preflight import control_plane_problem

    url = server.rstrip("/") if server and not settings.public_url else settings.worker_api_url
    problem = control_plane_problem(url, deployment, timeout_s)
    if problem:
        return [
            Check(
                "public-url",
                False,
                f"{problem}: is hpo serve running there (--url or $HPO_URL name a server "
                "elsewhere), and is HPO_PUBLIC_URL its address as the nodes see it?",
            )
        ]
    return [Check("public-url", True, f"the control plane answers at {url}")]


def _server(url: str, timeout_s: float) -> list[Check]:
    target = url.rstrip("/") + "/healthz"
    try:
        response = httpx.get(target, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return [Check("server", False, f"cannot reach {target}: {type(exc).__name__}: {exc}")]
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        return [Check("server", False, f"{target} answered {response.status_code}, not JSON")]
    preflight = body.get("preflight") or {}
    if response.status_code != 200:
        message = body.get("message", body)
        checks = [Check("server", False, f"{target} answered {response.status_code}: {message}")]
    else:
        checks = [
            Check(
                "server",
                True,
                f"{url} is healthy (database {body.get('database')}, scheduler "
                f"{body.get('scheduler')}, preflight {preflight.get('state', 'off')})",
            )
        ]
    for warning in body.get("warnings") or []:
        checks.append(Check("server", False, f"the server warns: {warning}"))
    for node in preflight.get("nodes") or []:
        where = f"node {node['node_id']} ({node['node_ip']})"
        if node.get("state") == "ok":
            checks.append(Check("node", True, f"{where}: preflight passed"))
        elif node.get("state") == "pending":  # not run yet: nothing failed
            checks.append(Check("node", True, f"{where}: preflight still running"))
        for check, why in (node.get("failures") or {}).items():
            checks.append(Check("node", False, f"{where}: {check} check failed: {why}"))
    return checks

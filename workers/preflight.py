"""The node preflight: what runs on each node of a cluster before (and while) trials run there.

``hpo serve`` pins one small task per node (:meth:`hpo.service.ray_executor.RayExecutor.preflight`)
that runs :func:`run_preflight`: the node writes and reads a probe file in the checkpoint storage
(:func:`hpo.workers.storage.probe`) and asks the control plane's ``/livez`` at the URL the
workers will post metrics to, checking that this deployment answers there. Both checks always
run, so one report names every problem of the node.
"""

from __future__ import annotations

import os
import time

import httpx

from hpo.service.executor import (
    PREFLIGHT_CONTROL_PLANE,
    PREFLIGHT_STORAGE,
    NodePreflight,
    PreflightRequest,
)
from hpo.workers.storage import StorageError, probe


def run_preflight(
    request: PreflightRequest,
    node_id: str,
    node_ip: str,
    storage_env: dict[str, str] | None = None,
) -> NodePreflight:
    """Run both checks here (on the node the task was pinned to) and report them.
    ``storage_env``: the object store's settings, as the ranks get them."""
    os.environ.update(storage_env or {})
    failures: dict[str, str] = {}
    try:
        probe(request.storage_root, name=node_id, shared=request.shared_marker)
    except StorageError as exc:
        failures[PREFLIGHT_STORAGE] = str(exc)
    except Exception as exc:  # an object store's client error, say: still this check's failure
        failures[PREFLIGHT_STORAGE] = f"checkpoint storage {request.storage_root}: {exc!r}"
    problem = control_plane_problem(request.api_url, request.deployment, request.http_timeout_s)
    if problem:
        failures[PREFLIGHT_CONTROL_PLANE] = problem
    return NodePreflight(node_id, node_ip, failures, time.time())


def control_plane_problem(api_url: str, deployment: str | None, timeout_s: float) -> str | None:
    """Why the control plane cannot be reached at ``api_url`` from here (or a server of another
    deployment answers there), or None when it can."""
    url = api_url.rstrip("/") + "/livez"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"cannot reach the control plane at {url}: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"{url} answered {response.status_code}, not the hpo control plane"
    try:
        answered = response.json().get("deployment")
    except (ValueError, AttributeError):
        return f"{url} did not answer as the hpo control plane does"
    if deployment and answered != deployment:
        return f"{url} is the control plane of deployment {answered}, not of {deployment}"
    return None

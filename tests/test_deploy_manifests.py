"""The KubeRay recipe does not lock itself out: ``/healthz`` answers 503 while a node fails
its preflight (or the cluster cannot be reached), and a readiness probe on it takes the pod
out of its Service; the nodes' preflight and the workers' metric posts go to
``HPO_PUBLIC_URL``, so if that is the same Service they can no longer reach the control plane
and the preflight can never pass again. The Service workers use must keep not-ready pods."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "hpo-serve.yaml"


def test_the_workers_service_keeps_routing_while_healthz_reports_a_cluster_problem() -> None:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    public = urlsplit(env["HPO_PUBLIC_URL"]).hostname
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == public]
    probe = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
    if probe == "/healthz":
        assert service["spec"].get("publishNotReadyAddresses") is True

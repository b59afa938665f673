"""deploy/kuberay/*.yaml, checked without a Kubernetes cluster: the RayCluster against the
KubeRay CRD's own schema (vendored in tests/deploy/data, unknown fields rejected as
`kubectl apply --validate=strict` does), the core kinds for the fields the API server requires,
and the wiring between them: token auth from one Secret, Ray Client for the raylet-less control
plane, one ReadWriteMany volume for checkpoints, readiness on /healthz."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from tests.deploy.conftest import DEPLOY

KUBERAY = DEPLOY / "kuberay"
SCHEMA = Path(__file__).parent / "data" / "ray.io_rayclusters.v1.schema.yaml"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever Kubernetes would prune them (objects
    with `properties`, no `additionalProperties`, no x-kubernetes-preserve-unknown-fields): a
    misspelt field then fails here instead of vanishing on apply."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.Draft7Validator:
    text = "".join(line for line in SCHEMA.open() if not line.startswith("#"))
    return jsonschema.Draft7Validator(strict(json.loads(text)))


def errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------- the RayCluster


def test_raycluster_is_valid_against_the_kuberay_crd(raycluster_validator) -> None:
    cluster = one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert errors(raycluster_validator, cluster) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "authOptions", "mode"), "tokens"),  # not in the CRD's enum
        (("spec", "authOption"), {"mode": "token"}),  # misspelt: Kubernetes would drop it
        (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # must be a string
    ],
)
def test_the_schema_check_catches_a_broken_raycluster(
    raycluster_validator, path: tuple[str, ...], value: object
) -> None:
    broken = copy.deepcopy(one("RayCluster"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors(raycluster_validator, broken)


def test_raycluster_uses_token_auth_from_the_shared_secret() -> None:
    spec = one("RayCluster")["spec"]
    assert spec["authOptions"]["mode"] == "token"
    secret = one("Secret", spec["authOptions"]["secretName"])
    assert "auth_token" in secret["stringData"]  # the key KubeRay reads
    # KubeRay refuses token auth below Ray 2.52; Ray Client needs the control plane's Ray
    assert spec["rayVersion"] == ray.__version__
    head = containers(spec["headGroupSpec"]["template"])[0]
    assert 10001 in [p["containerPort"] for p in head["ports"]]


# ---------------------------------------------------------------------- the core kinds


def check_metadata(doc: dict) -> None:
    assert doc["apiVersion"] and doc["kind"]
    assert doc["metadata"]["name"]


def check_container(c: dict) -> None:
    assert c["name"] and c["image"]
    for e in c.get("env", []):
        assert e["name"]
        assert ("value" in e) != ("valueFrom" in e), e
    for p in c.get("ports", []):
        assert isinstance(p["containerPort"], int)


def test_core_kinds_have_the_fields_the_api_server_requires() -> None:
    kinds = {}
    for doc in manifests():
        check_metadata(doc)
        kinds.setdefault(doc["kind"], []).append(doc)
    assert set(kinds) == {"RayCluster", "Deployment", "Service", "Secret", "PersistentVolumeClaim"}
    for dep in kinds["Deployment"]:
        assert dep["apiVersion"] == "apps/v1"
        spec = dep["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        for c in containers(spec["template"]):
            check_container(c)
    for svc in kinds["Service"]:
        assert svc["apiVersion"] == "v1"
        assert svc["spec"]["ports"] and all(
            isinstance(p["port"], int) for p in svc["spec"]["ports"]
        )
    for secret in kinds["Secret"]:
        assert secret["apiVersion"] == "v1"
        assert all(isinstance(v, str) for v in secret["stringData"].values())
    for pvc in kinds["PersistentVolumeClaim"]:
        assert pvc["apiVersion"] == "v1"
        assert pvc["spec"]["accessModes"]
        assert pvc["spec"]["resources"]["requests"]["storage"]


# ------------------------------------------------------------------------- the wiring


def serve_container() -> dict:
    return containers(one("Deployment", "hpo-serve")["spec"]["template"])[0]


def test_control_plane_reaches_ray_through_ray_client_with_the_cluster_token() -> None:
    cluster = one("RayCluster")
    env = env_of(serve_container())
    # the pod has no raylet: only a ray:// address works, to the head service KubeRay makes
    assert env["HPO_RAY_ADDRESS"]["value"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (cluster["spec"]["authOptions"]["secretName"], "auth_token")
    for name in ("HPO_TOKEN", "HPO_DATABASE_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in one("Secret", ref["name"])["stringData"]


def test_control_plane_is_ready_only_when_healthz_answers() -> None:
    container = serve_container()
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert named.get(probe["port"], probe["port"]) == 8000
    svc = one("Service", "hpo-serve")
    labels = one("Deployment", "hpo-serve")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    public = env_of(container)["HPO_PUBLIC_URL"]["value"]
    assert public == f"http://hpo-serve:{svc['spec']['ports'][0]['port']}"


def mounts(pod_template: dict, path: str) -> set[str]:
    """Claims mounted at ``path`` in every container of the pod template."""
    volumes = {v["name"]: v for v in pod_template["spec"].get("volumes", [])}
    claims = set()
    for c in containers(pod_template):
        mounted = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == path]
        assert len(mounted) == 1, f"{c['name']} does not mount {path}"
        claims.add(volumes[mounted[0]]["persistentVolumeClaim"]["claimName"])
    return claims


def test_every_pod_mounts_one_read_write_many_volume_for_checkpoints() -> None:
    path = env_of(serve_container())["HPO_STORAGE_PATH"]["value"]
    spec = one("RayCluster")["spec"]
    templates = [
        one("Deployment", "hpo-serve")["spec"]["template"],
        spec["headGroupSpec"]["template"],
        *(group["template"] for group in spec["workerGroupSpecs"]),
    ]
    claims = set().union(*(mounts(t, path) for t in templates))
    assert len(claims) == 1
    pvc = one("PersistentVolumeClaim", claims.pop())
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]

"""``GET /metrics`` of a served control plane (SQLite and PostgreSQL): the counts it exposes
follow real asks, reports and tells, it needs the token, and the Grafana dashboard in
deploy/grafana reads only series it exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_outage import set_reachable
from tests.conftest import EXAMPLES, ServerProcess, simple_spec

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hpo.json"
PROMQL_WORDS = {
    "sum", "max", "min", "by", "rate", "histogram_quantile", "le", "state", "study", "status",
    "route", "method",
}  # fmt: skip


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with server.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_follow_asks_reports_and_tells(server: ServerProcess) -> None:
    with server.http(token="wrong") as http:
        assert http.get("/metrics").status_code == 401
    with server.client() as client:
        study = client.create_study(simple_spec("watched"))
        asked = [study.ask() for _ in range(3)]
        for t in asked:
            study.report(t, step=0, metrics={"loss": 1.0, "acc": 0.5})
            study.report(t, step=1, metrics={"loss": 0.5})
        study.tell(asked[0], value=0.5)
        study.tell(asked[1], state="pruned")
        samples = scrape(server)

        assert value(samples, "hpo_database_up") == 1
        assert value(samples, "hpo_trials", state="complete") == 1
        assert value(samples, "hpo_trials", state="pruned") == 1
        assert value(samples, "hpo_trials", state="running") == 1
        assert value(samples, "hpo_running_study_trials", study="watched", state="running") == 1
        assert value(samples, "hpo_studies", state="running") == 1
        assert value(samples, "hpo_asks_total", status="201") == 3
        # hpo serve froze its start-up heap (modules, engine, app): out of every collection
        assert value(samples, "hpo_gc_frozen_objects") > 50_000
        assert value(samples, "python_gc_collections_total", generation="2") is not None
        assert value(samples, "hpo_ask_duration_seconds_count") == 3
        assert value(samples, "hpo_metric_points_ingested_total") == 9
        assert value(samples, "hpo_report_duration_seconds_count") == 6  # the reports answered
        assert value(samples, "hpo_report_duration_seconds_bucket", le="+Inf") == 6
        route = "/api/v1/trials/{trial_id}/metrics"
        assert value(samples, "hpo_http_requests_total", route=route, method="POST", status="200")
        assert value(samples, "hpo_scheduler_leading") == 0  # served without a scheduler
        assert value(samples, "hpo_db_errors_total") == 0

        # a refused report stores nothing and counts no points
        with server.http() as http:
            body = {"points": [{"step": 5, "name": "loss", "value": 1.0}]}
            assert http.post(f"/api/v1/trials/{asked[0].trial_id}/metrics", json=body).is_error
        study.stop()
        samples = scrape(server)
        assert value(samples, "hpo_metric_points_ingested_total") == 9
        assert value(samples, "hpo_report_duration_seconds_count") == 6
        # a study that is no longer running keeps no per-study series
        assert not [k for k in samples if k[0] == "hpo_running_study_trials"]
        assert value(samples, "hpo_studies", state="stopped") == 1
        client.create_study(simple_spec("other")).ask()  # a running study again
        assert_dashboard_reads_only(set(name for name, _ in scrape(server)))

    if server.database_url.startswith("postgresql"):  # an outage: answers 503, still scraped
        set_reachable(server.database_url, False)
        try:
            with server.http() as http:
                for _ in range(3):
                    assert http.get(f"/api/v1/studies/{study.id}").status_code == 503
            samples = scrape(server)
        finally:
            set_reachable(server.database_url, True)
        assert value(samples, "hpo_database_up") == 0
        assert value(samples, "hpo_db_errors_total") == 3
        route = "/api/v1/studies/{study_id}"
        assert value(samples, "hpo_http_requests_total", route=route, method="GET", status="503")
        assert value(scrape(server), "hpo_database_up") == 1


def test_the_example_scrape_config_reads_metrics(
    sqlite_server: ServerProcess, tmp_path: Path
) -> None:
    """examples/prometheus.yml scrapes as Prometheus would: its path, with the token from its
    credentials file (here a copy pointing at this server and a file of its token)."""
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"
    token_file = tmp_path / "hpo-token"
    token_file.write_text(sqlite_server.token)
    target = f"http://127.0.0.1:{sqlite_server.port}"
    answer = httpx.get(
        target + job["metrics_path"],
        headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
    )
    assert answer.status_code == 200
    assert "hpo_trials" in {f.name for f in text_string_to_metric_families(answer.text)}
    assert httpx.get(target + job["metrics_path"]).status_code == 401  # without it


def assert_dashboard_reads_only(exposed: set[str]) -> None:
    """Every series the Grafana dashboard queries is one that /metrics exposes."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"])
    used = set()
    for expr in exprs:
        expr = re.sub(r'"[^"]*"', "", expr)  # label values
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
        used |= {w for w in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr) if w not in PROMQL_WORDS}
    assert used and {w for w in used if w.startswith("hpo_")} == used
    assert used <= exposed, f"the dashboard reads series /metrics does not expose: {used - exposed}"

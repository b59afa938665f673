"""Prometheus metrics of the control plane: ``GET /metrics`` in the text exposition format.

Three kinds of series:

- counted by this process as requests pass (a plain ASGI middleware, outermost, so the rate
  limit's 429s and the body limit's 413s count too): requests by route template, method and
  status (``hpo_http_requests_total``; 503s are ``status="503"``), asks and their latency,
  metric points ingested and the reports' latency, answers that said the database was
  unavailable. Each replica counts its own; sum them with ``sum(rate(...))``.
- read from the database at scrape time (the same on every replica): trials by state in
  total, and per study only for running studies (so finished studies do not pile up label
  sets), studies by state, and this server's scheduler queue.
- this process's garbage collector: collections by generation (prometheus_client's
  ``python_gc_*``) and the objects it skips (``hpo_gc_frozen_objects``: ``hpo serve`` freezes
  its start-up heap, see ``create_app``).

``/metrics`` needs the API token like the rest of the API (Prometheus sends it with
``authorization: {credentials_file: ...}``): trial counts and study names are not public.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo.api.deps import require_token
from hpo.api.errors import RESPONSES
from hpo.service.db.models import Study, Trial
from hpo.service.errors import DatabaseUnavailable

if TYPE_CHECKING:
    from hpo.api.siblings import Siblings
    from hpo.service.scheduler import Scheduler

# The text format every Prometheus reads (our names need none of 1.0.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
API_PREFIX = "/api/v1"
ASK_PATH = re.compile(r"^/api/v1/studies/[^/]+/ask$")
REPORT_PATH = re.compile(r"^/api/v1/trials/[^/]+/metrics$")
# Each metric point of a report body carries one "step" key (MetricsBody: {"points": [{"step",
# "name", "value"}], "attempt"}); counting the keys spares parsing the body a second time.
STEP_KEY = re.compile(rb'"step"\s*:')
ASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
REPORT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Instruments:
    """The counters this process keeps, in their own registry (one per app)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "hpo_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.asks = Counter(
            "hpo_asks", "POST /ask requests answered, by status", ["status"], registry=registry
        )
        self.ask_seconds = Histogram(
            "hpo_ask_duration_seconds",
            "Time to answer POST /ask (sampling included)",
            buckets=ASK_BUCKETS,
            registry=registry,
        )
        self.report_seconds = Histogram(
            "hpo_report_duration_seconds",
            "Time to answer POST /trials/{id}/metrics with 200 (the pruner's decision included)",
            buckets=REPORT_BUCKETS,
            registry=registry,
        )
        self.points = Counter(
            "hpo_metric_points_ingested",
            "Metric points accepted by POST /trials/{id}/metrics (a resent point counts again)",
            registry=registry,
        )
        self.db_errors = Counter(
            "hpo_db_errors",
            "Requests answered 503 because the database was unreachable or locked",
            registry=registry,
        )


class RequestMetrics:
    """ASGI middleware that feeds :class:`Instruments` from every HTTP request."""

    def __init__(self, app: ASGIApp, instruments: Instruments) -> None:
        self.app = app
        self.m = instruments

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path, method = scope["path"], scope["method"]
        status = 500
        body_503 = b""
        steps = 0
        is_report = method == "POST" and REPORT_PATH.match(path) is not None

        async def counting_receive() -> Message:
            nonlocal steps
            message = await receive()
            if message["type"] == "http.request":
                steps += len(STEP_KEY.findall(message.get("body", b"")))
            return message

        async def watching_send(message: Message) -> None:
            nonlocal status, body_503
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 503:
                body_503 += message.get("body", b"")[:512]
            await send(message)

        try:
            await self.app(scope, counting_receive if is_report else receive, watching_send)
        finally:
            self.m.requests.labels(route_of(scope), method, str(status)).inc()
            if method == "POST" and ASK_PATH.match(path):
                self.m.asks.labels(str(status)).inc()
                self.m.ask_seconds.observe(time.perf_counter() - start)
            if is_report and status == 200:
                self.m.points.inc(steps)
                self.m.report_seconds.observe(time.perf_counter() - start)
            if status == 503 and b'"database_unavailable"' in body_503:
                self.m.db_errors.inc()


def route_of(scope: Scope) -> str:
    """The matched route's template (``/api/v1/studies/{study_id}/ask``), or ``unmatched``: a
    bounded label, never the raw path. The route knows its path within its router; the API's
    routers are all under ``/api/v1``."""
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        return "unmatched"
    if scope["path"].startswith(API_PREFIX + "/") and not template.startswith(API_PREFIX):
        return API_PREFIX + template
    return template


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time: trials and studies by state."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        service = getattr(self.app.state, "service", None)
        if service is None:  # before the app started
            return
        up = GaugeMetricFamily("hpo_database_up", "1 when the last scrape read the database")
        try:
            totals, studies, per_study = _counts(service.storage)
        except DatabaseUnavailable:
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            trials = GaugeMetricFamily("hpo_trials", "Trials by state", labels=["state"])
            for state, n in sorted(totals.items()):
                trials.add_metric([state], n)
            yield trials
            study_g = GaugeMetricFamily("hpo_studies", "Studies by state", labels=["state"])
            for state, n in sorted(studies.items()):
                study_g.add_metric([state], n)
            yield study_g
            running = GaugeMetricFamily(
                "hpo_running_study_trials",
                "Trials of each running study by state (running studies only)",
                labels=["study", "state"],
            )
            for (name, state), n in sorted(per_study.items()):
                running.add_metric([name, state], n)
            yield running


class ProcessCollector(Collector):
    """This process's gauges: its scheduler's queue, the objects its garbage collector skips."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        yield from _scheduler_gauges(getattr(self.app.state, "scheduler", None))
        frozen = GaugeMetricFamily(
            "hpo_gc_frozen_objects",
            "Objects the garbage collector skips (hpo serve freezes its start-up heap)",
        )
        frozen.add_metric([], gc.get_freeze_count())
        yield frozen


def _counts(storage: Any) -> tuple[dict[str, int], dict[str, int], dict[tuple[str, str], int]]:
    with storage.read() as s:
        totals = dict(s.execute(select(Trial.state, func.count()).group_by(Trial.state)).all())
        studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        rows = s.execute(
            select(Study.name, Trial.state, func.count())
            .join(Study, Study.id == Trial.study_id)
            .where(Study.state == "running")
            .group_by(Study.name, Trial.state)
        ).all()
    return totals, studies, {(name, state): n for name, state, n in rows}


def _scheduler_gauges(scheduler: Any) -> Iterator[Metric]:
    leading = GaugeMetricFamily(
        "hpo_scheduler_leading", "1 when this server holds the scheduler lease and dispatches"
    )
    in_flight = GaugeMetricFamily(
        "hpo_scheduler_in_flight", "Attempts this server's scheduler has launched and not ended"
    )
    queued = GaugeMetricFamily(
        "hpo_scheduler_queued",
        "Launched attempts still waiting for cluster resources (not yet placed)",
    )
    flights = list(scheduler.in_flight.values()) if scheduler is not None else []
    leading.add_metric([], 1 if scheduler is not None and scheduler.leading else 0)
    in_flight.add_metric([], len(flights))
    queued.add_metric([], sum(1 for f in flights if not f.placed))
    yield from (leading, in_flight, queued)


class SiblingsCollector(Collector):
    """The series of every worker of ``hpo serve --workers N``, summed (counters, histogram
    buckets, the process gauges: one scheduler's queue and zeros), from the files the workers
    publish (:class:`hpo.api.serving.Siblings`); this worker's own are published first, so
    they are current and the others' at most a second old."""

    def __init__(self, app: FastAPI, siblings: Siblings) -> None:
        self.app = app
        self.siblings = siblings

    def collect(self) -> Iterator[Metric]:
        publish(self.app)
        families: dict[str, Metric] = {}
        sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for entry in self.siblings.read().values():
            for family in text_string_to_metric_families(entry["metrics"]):
                families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    if sample.name.endswith("_created"):  # a time, not a count
                        continue
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    sums[key] = sums.get(key, 0.0) + sample.value
        for (family_name, name, labels), value in sums.items():
            families[family_name].add_sample(name, dict(labels), value)
        yield from (family for family in families.values() if family.samples)


def publish(app: FastAPI) -> None:
    """Write this worker's series and its scheduler's role where its siblings read them."""
    siblings = app.state.siblings
    with siblings.lock:  # so that a newer text is never replaced by an older one
        own = generate_latest(app.state.process_registry).decode()
        siblings.publish(own, role_of(getattr(app.state, "scheduler", None)))


def role_of(scheduler: Scheduler | None) -> str:
    """What a server's scheduler does: ``running`` (it holds the scheduler lease and
    dispatches), ``standby`` (another server holds it) or ``off`` (none)."""
    if scheduler is None:
        return "off"
    return "running" if scheduler.leading else "standby"


def install(app: FastAPI, siblings: Siblings | None = None) -> None:
    """Count requests and serve ``GET /metrics`` (API token required). With ``siblings``
    (a worker of ``hpo serve --workers N``), ``/metrics`` sums every worker's series."""
    own = CollectorRegistry(auto_describe=False)  # what this process counts
    instruments = Instruments(own)
    own.register(ProcessCollector(app))
    GCCollector(registry=own)  # python_gc_collections_total by generation, and more
    if siblings is None:
        registry = own
    else:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SiblingsCollector(app, siblings))
        app.state.siblings = siblings
    registry.register(DatabaseCollector(app))
    app.state.process_registry = own
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetrics, instruments=instruments)
    router = APIRouter(tags=["system"], dependencies=[Depends(require_token)])

    @router.get(
        "/metrics",
        operation_id="metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
            **{code: RESPONSES[code] for code in (401, 403, 429, 503)},
        },
    )
    def metrics(request: Request) -> Response:
        """Prometheus metrics in the text exposition format (see docs/integrations.md)."""
        body = generate_latest(request.app.state.metrics_registry)
        return Response(body, media_type=CONTENT_TYPE)

    app.include_router(router)

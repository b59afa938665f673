"""The FastAPI application: routes, error mapping, database set-up and background loops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from hpo.api import errors, middleware, prometheus
from hpo.api.deps import attempts_verified, require_token
from hpo.api.routes import checkpoints, dashboard, studies, trials
from hpo.api.schemas import ErrorBody
from hpo.service.analysis_worker import AnalysisWorker, analyses_for
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.models import utcnow
from hpo.service.errors import DatabaseUnavailable
from hpo.service.histories import Histories
from hpo.service.preflight import FAILED, OFF, config_warnings, failure_lines
from hpo.service.settings import Settings
from hpo.service.spec import StudySpec
from hpo.service.storage import Storage, leases, meta
from hpo.service.storage import analyses as kept
from hpo.service.studies import StudyService
from hpo.workers import storage as checkpoint_storage

if TYPE_CHECKING:
    from hpo.api.siblings import Siblings
    from hpo.service.scheduler import Scheduler

log = logging.getLogger("hpo.api")
VERSION = "0.1.0"


def create_app(
    settings: Settings | None = None, *, freeze_heap: bool = False, siblings: Siblings | None = None
) -> FastAPI:
    """Build the app. The schema is upgraded and background loops start with the app.

    ``freeze_heap`` (``hpo serve``, whose process is the app's alone): once started, the
    objects made so far (modules, the engine, the app) are moved out of the garbage
    collector's view (``gc.freeze``), so its full collections, which paused every thread of
    the server for ~100 ms every few seconds under a metrics stream, scan only what came
    after (12–34 ms there, scheduler off; docs/benchmarks.md, "Scale: metrics"). The
    scheduler connects to Ray only when a study needs it: Ray's modules and client (some
    35,000 objects) are frozen too, once it has.

    ``siblings``: this app is one worker of ``hpo serve --workers N`` (:mod:`hpo.api.serving`);
    it publishes its counters and its scheduler's role for the others every second.
    """
    settings = settings or Settings()
    warnings = config_warnings(settings)
    if not settings.auth:
        warnings.append(
            "HPO_AUTH=false: the API answers requests without a token; anyone who reaches "
            f"{settings.host}:{settings.port} can read, change and delete every study"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if siblings is None or siblings.index == 0:  # once per server, not once per worker
            for warning in warnings:
                log.warning("%s", warning)
        engine = make_engine(settings.resolved_database_url)
        if siblings is None:  # a worker of `hpo serve --workers N` skips it: its supervisor did it
            await asyncio.to_thread(upgrade_schema, engine)
        app.state.engine = engine
        app.state.token = settings.api_token(create=True)
        app.state.attempts_verified = attempts_verified()
        wake = threading.Event()  # set by the service on every change; the scheduler ticks
        service = StudyService(
            Storage(engine),
            check_trainable=_check_trainable,
            on_change=wake.set if settings.scheduler else None,
            histories=Histories(settings.sampler_cache_studies, settings.sampler_cache_trials),
            ask_wait_s=settings.ask_wait_s,
        )
        app.state.service = service
        analyses = analyses_for(service.storage, settings.resolved_database_url)
        app.state.analyses = analyses
        service.storage.health.watch()  # a freeze of this process holds leases back
        # made at the first start; it keeps this deployment's Ray namespace and actors apart
        app.state.deployment_id = await asyncio.to_thread(meta.deployment_id, service.storage)
        scheduler = _scheduler(settings, service, app.state.token, wake, app.state.deployment_id)
        if scheduler is not None:
            scheduler.start()
        app.state.scheduler = scheduler
        background = [asyncio.create_task(_sweep_leases(app, settings.lease_sweep_interval_s))]
        if siblings is not None:
            background.append(asyncio.create_task(_beat(siblings)))
            background.append(asyncio.create_task(_publish(app, siblings)))
        if freeze_heap:
            _freeze_heap()
            if scheduler is not None:
                background.append(asyncio.create_task(_freeze_once_connected(scheduler)))
        try:
            if isinstance(analyses, AnalysisWorker):
                big = settings.importance_wait_trials
                with contextlib.suppress(DatabaseUnavailable):  # then it starts when asked
                    # a study whose page will need a fit (its first ask, importance, not
                    # kept for it as it is now): the worker's imports done before it asks
                    first = kept.key("importance", 0)
                    if await asyncio.to_thread(kept.any_unkept_past, service.storage, big, first):
                        analyses.warm()
            yield
        finally:
            for task in background:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # a loop that died: the shutdown goes on
                    log.exception("a background task of the server had failed")
            try:
                if scheduler is not None:
                    await asyncio.to_thread(scheduler.stop)
            finally:
                try:
                    await asyncio.to_thread(analyses.close)
                finally:
                    service.storage.health.close()
                    engine.dispose()

    app = FastAPI(
        title="hpo",
        version=VERSION,
        summary="Distributed hyperparameter search: studies, trials, samplers, metric streams.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.settings = settings
    errors.install(app)
    middleware.install(app, settings)
    prometheus.install(app, siblings)  # GET /metrics; counts every request, so outermost
    auth = [Depends(require_token)]
    api = {"prefix": "/api/v1", "dependencies": auth, "responses": errors.RESPONSES}
    app.include_router(studies.router, **api)
    app.include_router(trials.router, **api)
    app.include_router(checkpoints.router, **api)
    app.include_router(dashboard.router, **api)
    app.include_router(dashboard.pages)  # the page itself is public; it asks for the token
    app.mount("/static", dashboard.files, name="static")

    unavailable = {
        503: {
            "model": ErrorBody,
            "description": "The database is unreachable or busy, or the cluster preflight "
            "failed (`preflight` then holds every node's outcome); retry after `Retry-After`",
        }
    }

    @app.get("/healthz", tags=["system"], response_model=dict[str, Any], responses=unavailable)
    def healthz() -> dict[str, Any] | JSONResponse:
        """Liveness and database reachability (no token needed): 503 with ``Retry-After``
        and the reason while the database cannot be reached. ``scheduler`` says whether this
        server runs the scheduler (``running``), stands by for another that holds the
        scheduler lease (``standby``), or has none (``off``); under ``hpo serve --workers N``
        every worker answers for worker 0, which runs it (``unknown`` when worker 0's file in
        their shared folder cannot be read). Also 503 while writes fail: the
        last write found the database locked or unreachable a moment ago.

        On a cluster, ``preflight`` is the node preflight (``state`` ok, pending or failed,
        and each node's outcome), the same on every replica; a failed node (or a cluster that
        cannot be reached) is a 503 ``preflight_failed`` naming the node and the check, with
        one ``details`` entry per failed check and the whole ``preflight`` report.
        ``warnings`` are the settings that break a cluster (logged at start too).
        ``scheduler_running``: whether any server of this database holds the scheduler lease
        now (without one, no study with a trainable starts a trial). ``executor_failure``:
        while the scheduler's server cannot start or reach Ray, why (the error, how many tries
        since when, the wait before the next); otherwise null."""
        storage = app.state.service.storage
        storage.ping()
        storage.ping_write()  # after a failed write: a lock that another process holds?
        if siblings is not None and not settings.scheduler:  # worker 0 runs the server's
            role = siblings.scheduler_role()
        else:
            role = prometheus.role_of(app.state.scheduler)
        report = meta.preflight_report(storage) or {"state": OFF, "nodes": []}
        if report.get("state") == FAILED:
            failures = failure_lines(report)
            message = "; ".join(
                f"node {f['node_id']} ({f['node_ip']}): {f['check']} check failed: {f['message']}"
                if f["node_id"]
                else f["message"]
                for f in failures
            )
            body = {
                "error": "preflight_failed",
                "message": f"the cluster preflight failed: {message}",
                "field": None,
                "details": failures,
                "preflight": report,  # every node's outcome, the passed ones too
            }
            retry = {"Retry-After": str(int(settings.preflight_recheck_s))}
            return JSONResponse(status_code=503, content=body, headers=retry)
        lease = leases.get(storage, leases.SCHEDULER)
        running = lease is not None and lease.expires_at > utcnow()
        failure = meta.executor_failure(storage) if running else None
        if failure is not None and failure.get("holder") != lease.holder:
            failure = None  # a note of an earlier scheduler's server
        return {
            "status": "ok",
            "version": VERSION,
            "database": storage.dialect,
            "scheduler": role,
            "scheduler_running": running,
            "executor_failure": failure,
            "preflight": report,
            "warnings": warnings,
        }

    @app.get("/livez", tags=["system"])
    def livez() -> dict[str, str]:
        """That this process answers, without touching the database (no token needed): what
        the node preflight asks to check that a node reaches the control plane, and which
        deployment it is (a node must reach its own)."""
        return {"status": "ok", "deployment": app.state.deployment_id}

    return app


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operationId: its function's name (``create_study``, ``ask``), unless
    the route names one itself. Generated clients name their functions by it, so it is part
    of the contract: ``tests/api/test_openapi.py`` lists them."""
    return route.name


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, made once: a record's ``spec`` is declared as the StudySpec that
    ``POST /api/v1/studies`` accepts (the record keeps the stored JSON as it is, so reads never
    validate it again)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        record = schema["components"]["schemas"]["StudyRecord"]["properties"]
        record["spec"] = {
            "$ref": "#/components/schemas/StudySpec",
            "description": "The spec as created; it validates as the body of a new study.",
        }
        app.openapi_schema = schema
    return app.openapi_schema


def _check_trainable(spec: StudySpec) -> None:
    """Refuse (ValueError naming the field) a trainable that is not registered, or whose
    settings reject the spec's config or any value its space can take."""
    from hpo.workers import registry

    if spec.trainable is None:
        return
    space = {name: param.representatives() for name, param in spec.space.items()}
    world_size = spec.resources.workers_per_trial
    registry.check_spec(spec.trainable.name, spec.trainable.config, space, world_size)


def _freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's view (see ``create_app``)."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()


async def _beat(siblings: Siblings) -> None:
    """Tell the supervisor every ``siblings.interval_s`` that this event loop runs (apart from
    publishing, so that a slow or failing disk is not taken for a hang)."""
    while True:
        try:
            siblings.beat()
        except OSError:
            log.exception("could not beat; the supervisor will take this worker for hung")
        await asyncio.sleep(siblings.interval_s)


async def _publish(app: FastAPI, siblings: Siblings) -> None:
    """Publish this worker's series for its siblings every ``siblings.interval_s`` (see
    ``create_app``). A publish that fails (a full disk) is logged once until one succeeds
    again; the others read the last one meanwhile."""
    failing = False
    while True:
        try:
            await asyncio.to_thread(prometheus.publish, app)
        except Exception:
            if not failing:
                log.exception("could not publish this worker's metrics; trying every second")
            failing = True
        else:
            failing = False
        await asyncio.sleep(siblings.interval_s)


async def _freeze_once_connected(scheduler: Scheduler, poll_s: float = 1.0) -> None:
    """Freeze the heap again once the scheduler's executor has connected to Ray (once)."""
    while not scheduler.executor.started:
        await asyncio.sleep(poll_s)
    _freeze_heap()


def _scheduler(
    settings: Settings,
    service: StudyService,
    token: str | None,
    wake: threading.Event,
    deployment: str,
) -> Scheduler | None:
    """The scheduler of dispatched studies on Ray (in ``deployment``'s Ray namespace), or None
    when it is switched off."""
    if not settings.scheduler:
        return None
    from hpo.service.executor import PreflightRequest
    from hpo.service.preflight import ClusterPreflight
    from hpo.service.ray_executor import RayExecutor
    from hpo.service.scheduler import Scheduler

    env = {k: v for k, v in os.environ.items() if k == "HPO_EXTRA_TRAINABLES"}
    # Ranks and evaluations on a cluster reach an object store with the control plane's
    # storage options and AWS_* variables (never its database URL or admin token); they go
    # as task arguments: Ray logs the runtime_env (``env``) in plain text on every node.
    storage_env = checkpoint_storage.worker_env(settings.checkpoint_dir, settings.storage_options)
    executor = RayExecutor(
        settings.ray_address,
        num_cpus=settings.ray_num_cpus,
        num_gpus=settings.ray_num_gpus,
        object_store_mb=settings.ray_object_store_mb,
        env=env,
        session_file=settings.ray_session_file,
        deployment=deployment,
        namespace=settings.ray_namespace,
        socket_ifname=settings.socket_ifname,
        storage_env=storage_env,
    )
    request = None
    if settings.ray_address:  # a local Ray runs on this host only: nothing to preflight
        request = PreflightRequest(
            storage_root=str(settings.checkpoint_dir),
            api_url=settings.worker_api_url,
            deployment=deployment,
            timeout_s=settings.preflight_timeout_s,
        )
    preflight = ClusterPreflight(service.storage, request, recheck_s=settings.preflight_recheck_s)
    return Scheduler(
        service,
        executor,
        api_url=settings.worker_api_url,
        token=token,
        checkpoint_dir=settings.checkpoint_dir,
        interval_s=settings.scheduler_interval_s,
        wake=wake,
        lease_s=settings.scheduler_lease_s,
        preflight=preflight,
        deployment=deployment,
        tensorboard_dir=settings.tensorboard_dir,
    )


async def _sweep_leases(app: FastAPI, interval: float) -> None:
    """Fail (or requeue) trials whose lease ran out or that made no progress within
    ``progress_timeout_s``, fail attempts past ``budget.trial_timeout_s`` and end studies past
    ``budget.timeout_s``, so a dead client or a hung trial never blocks a study."""
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await asyncio.to_thread(app.state.service.expire_leases)
            if expired:
                log.info("expired the lease of %d trial(s)", expired)
        except Exception:  # keep sweeping; the next round retries
            log.exception("lease sweep failed")

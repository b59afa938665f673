"""The FastAPI application: routes, error mapping, database set-up and background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from hpo.api import errors
from hpo.api.deps import require_token
from hpo.api.routes import studies, trials
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.settings import Settings
from hpo.service.storage import Storage
from hpo.service.studies import StudyService
from sqlalchemy import text

log = logging.getLogger("hpo.api")
VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The schema is upgraded and background loops start with the app."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url)
        await asyncio.to_thread(upgrade_schema, engine)
        app.state.engine = engine
        app.state.service = StudyService(Storage(engine))
        app.state.token = settings.api_token(create=True)
        sweeper = asyncio.create_task(_sweep_leases(app, settings.lease_sweep_interval_s))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            engine.dispose()

    app = FastAPI(
        title="hpo",
        version=VERSION,
        summary="Distributed hyperparameter search: studies, trials, samplers, metric streams.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)
    auth = [Depends(require_token)]
    app.include_router(studies.router, prefix="/api/v1", dependencies=auth)
    app.include_router(trials.router, prefix="/api/v1", dependencies=auth)

    @app.get("/healthz", tags=["system"])
    def healthz() -> dict[str, str]:
        """Liveness and database reachability (no token needed)."""
        with app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "version": VERSION, "database": app.state.engine.dialect.name}

    return app


async def _sweep_leases(app: FastAPI, interval: float) -> None:
    """Fail (or requeue) trials whose lease ran out, so a dead client never blocks a study."""
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await asyncio.to_thread(app.state.service.expire_leases)
            if expired:
                log.info("expired the lease of %d trial(s)", expired)
        except Exception:  # keep sweeping; the next round retries
            log.exception("lease sweep failed")

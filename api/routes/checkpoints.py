"""Checkpoint downloads: a trial's newest checkpoint, or the best trial's, as a .tar.gz.

A checkpoint on an object store is downloaded to a temporary folder first, then archived. At
most :data:`MAX_CONCURRENT_DOWNLOADS` run at once: each holds one of the server's request
threads while it reads the store, and a store that hangs (a gateway that accepts connections
and never answers) would otherwise take every one of them, ``/healthz`` and metric posts
included; the excess is a 503 with ``Retry-After`` at once."""

from __future__ import annotations

import io
import logging
import tarfile
import tempfile
import threading
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

from hpo.api.bodies import StrictJsonRoute
from hpo.api.deps import Reader, StudyId, TrialId
from hpo.api.schemas import ARCHIVE
from hpo.service.errors import NotFound
from hpo.workers import storage as checkpoint_storage

router = APIRouter(tags=["checkpoints"], route_class=StrictJsonRoute)
log = logging.getLogger("hpo.api.checkpoints")

MAX_CONCURRENT_DOWNLOADS = 4
_downloads = threading.BoundedSemaphore(MAX_CONCURRENT_DOWNLOADS)


@router.get(
    "/trials/{trial_id}/checkpoint",
    response_class=Response,
    responses=ARCHIVE,
    operation_id="get_trial_checkpoint",
)
def trial_checkpoint(trial_id: TrialId, storage: Reader, request: Request) -> Response:
    """The trial's newest checkpoint directory as a gzipped tar archive."""
    path = storage.trial_checkpoint(trial_id)
    if path is None:
        raise NotFound(f"trial {trial_id} has no checkpoint", field="trial_id")
    settings = request.app.state.settings
    if not _downloads.acquire(blocking=False):
        raise HTTPException(
            503,
            f"{MAX_CONCURRENT_DOWNLOADS} checkpoint downloads are under way; retry shortly",
            headers={"Retry-After": "5"},
        )
    try:
        return _archive(
            path, settings.checkpoint_dir, settings.storage_options, f"trial-{trial_id}"
        )
    finally:
        _downloads.release()


@router.get(
    "/studies/{study_id}/best/checkpoint",
    response_class=Response,
    responses=ARCHIVE,
    operation_id="get_best_checkpoint",
)
def best_checkpoint(study_id: StudyId, storage: Reader, request: Request) -> Response:
    """The best trial's newest checkpoint (single-objective studies)."""
    best, front = storage.best(study_id)
    if best is None:
        if front:  # several objectives: no one best trial
            ids = ", ".join(str(t.id) for t in front[:5])
            raise NotFound(
                f"study {study_id} has several objectives and no one best trial: take the "
                f"checkpoint of a trial of its Pareto front (GET /api/v1/trials/{{id}}/checkpoint,"
                f" ids {ids}{', ...' if len(front) > 5 else ''})",
                field="study_id",
            )
        raise NotFound(
            f"study {study_id} has no best trial yet: no trial is complete (or, with "
            "constraints, none complete meets them)",
            field="study_id",
        )
    return trial_checkpoint(best.id, storage, request)


def _archive(path: str, root: Path | str, options: dict, name: str) -> Response:
    """The checkpoint at ``path`` as a .tar.gz, if it lies inside the store ``root``: a
    recorded path leading elsewhere (another bucket, ``..`` in a key, a symbolic link out of
    the folder) is never read with the server's credentials."""
    if checkpoint_storage.relative(path, root) is None:
        raise NotFound(f"checkpoint {path} lies outside the checkpoint store", field="trial_id")
    where = checkpoint_storage.location(path)
    with tempfile.TemporaryDirectory(prefix="hpo-download-") as tmp:
        if isinstance(where, Path):
            folder = where.resolve()
        else:
            try:
                folder = checkpoint_storage.fetch(where, Path(tmp), options)
            except FileNotFoundError:
                folder = Path(tmp) / "gone"
            except Exception as exc:  # unreachable store, refused credentials: not the client's
                log.warning("downloading checkpoint %s failed: %s", path, exc)
                raise HTTPException(503, f"the checkpoint store cannot be read: {exc}") from exc
        if not folder.is_dir():
            raise NotFound(f"checkpoint {path} is gone from the checkpoint store", field="trial_id")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    return Response(
        buffer.getvalue(),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}-{folder.name}.tar.gz"'},
    )

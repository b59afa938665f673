"""Checkpoint downloads: a trial's newest checkpoint, or the best trial's, as a .tar.gz."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from fastapi import APIRouter, Request, Response

from hpo.api.deps import Reader, StudyId, TrialId
from hpo.service.errors import NotFound

router = APIRouter(tags=["checkpoints"])


@router.get("/trials/{trial_id}/checkpoint", response_class=Response)
def trial_checkpoint(trial_id: TrialId, storage: Reader, request: Request) -> Response:
    """The trial's newest checkpoint directory as a gzipped tar archive."""
    path = storage.trial_checkpoint(trial_id)
    if path is None:
        raise NotFound(f"trial {trial_id} has no checkpoint", field="trial_id")
    return _archive(Path(path), request.app.state.settings.checkpoint_dir, f"trial-{trial_id}")


@router.get("/studies/{study_id}/best/checkpoint", response_class=Response)
def best_checkpoint(study_id: StudyId, storage: Reader, request: Request) -> Response:
    """The best trial's newest checkpoint (single-objective studies)."""
    best, _ = storage.best(study_id)
    if best is None:
        raise NotFound(f"study {study_id} has no complete trial yet", field="study_id")
    return trial_checkpoint(best.id, storage, request)


def _archive(path: Path, root: Path, name: str) -> Response:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise NotFound(f"checkpoint {path} lies outside the checkpoint store", field="trial_id")
    if not resolved.is_dir():
        raise NotFound(f"checkpoint {path} is gone from the checkpoint store", field="trial_id")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(resolved, arcname=resolved.name)
    return Response(
        buffer.getvalue(),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}-{resolved.name}.tar.gz"'},
    )

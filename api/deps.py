"""Dependencies injected into routes: the study service (workflows that write), the storage
(every read), and the caller's authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request
from pydantic import AfterValidator

from hpo.service.spec import no_nul
from hpo.service.storage import Storage
from hpo.service.studies import StudyService


def get_service(request: Request) -> StudyService:
    """The study service: ask, tell, report and the other workflows that write."""
    return request.app.state.service


def get_storage(request: Request) -> Storage:
    """The storage, which read-only routes read through."""
    return request.app.state.service.storage


def require_token(request: Request) -> None:
    """Check ``Authorization: Bearer <token>`` when the server has a token."""
    expected: str | None = request.app.state.token
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), expected):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API token (send `Authorization: Bearer <token>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )


Service = Annotated[StudyService, Depends(get_service)]
Reader = Annotated[Storage, Depends(get_storage)]

MAX_ID = 2**63 - 1
# Ids and cursors are 64-bit in the database: anything larger is a 422, not a database error.
StudyId = Annotated[int, Path(ge=1, le=MAX_ID)]
TrialId = Annotated[int, Path(ge=1, le=MAX_ID)]
Cursor = Annotated[int | None, Query(ge=0, le=MAX_ID)]
# Free text to filter by (a study or metric name): a NUL character is a 422, not a database error.
QueryText = Annotated[str | None, Query(), AfterValidator(no_nul)]

"""Dependencies injected into routes: the study service and the caller's authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from hpo.service.studies import StudyService


def get_service(request: Request) -> StudyService:
    return request.app.state.service


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

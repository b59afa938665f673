"""Conditional GETs: answer 304 when the client's ETag is current."""

from __future__ import annotations

from fastapi import Request, Response


def not_modified(request: Request, tag: str) -> Response | None:
    given = request.headers.get("if-none-match")
    if given and tag in [t.strip() for t in given.split(",")]:
        return Response(status_code=304, headers={"ETag": tag})
    return None

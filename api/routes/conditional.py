"""Conditional GETs: 304 when the client's ETag is current, and answers reused by ETag.

An ETag names one state of a study (its change sequence) plus the query, so the answer for a
tag never changes: many pollers asking for the same one share a single database read, and a
single serialisation: answers are kept as JSON bytes and sent as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache, cached
from fastapi import Request, Response
from pydantic import BaseModel

# How a route that honours ``If-None-Match`` declares its 304 (``responses=NOT_MODIFIED``).
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the `If-None-Match` ETag is still current (no body)."}
}
ANSWERS_KEPT = 512  # answers kept per app, by ETag
_creating = threading.Lock()


def not_modified(request: Request, tag: str) -> Response | None:
    """A 304 answer when the request's ``If-None-Match`` names ``tag``, else None."""
    given = request.headers.get("if-none-match")
    if given and tag in [t.strip() for t in given.split(",")]:
        return Response(status_code=304, headers={"ETag": tag})
    return None


def _by_tag(tag: str, make: Callable[[], BaseModel]) -> bytes:
    """The answer ``make`` returns as the JSON FastAPI would send for it as its own response
    model."""
    value = make()
    return value.__pydantic_serializer__.to_json(value, by_alias=True)


def _answers(request: Request) -> Callable[[str, Callable[[], BaseModel]], bytes]:
    """The app's answers by ETag: an LRU where concurrent callers of one tag wait for the
    first to make it instead of making it again."""
    state = request.app.state
    if getattr(state, "answers", None) is None:
        with _creating:
            if getattr(state, "answers", None) is None:
                keep = cached(
                    LRUCache(ANSWERS_KEPT),
                    key=lambda tag, make: tag,
                    condition=threading.Condition(),
                )
                state.answers = keep(_by_tag)
    return state.answers


def answer(request: Request, tag: str, make: Callable[[], BaseModel]) -> Response:
    """304 if the client has ``tag``; else the (shared) answer for it, with the ETag set.
    ``make`` returns an instance of the route's response model."""
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    body = _answers(request)(tag, make)
    return Response(body, media_type="application/json", headers={"ETag": tag})

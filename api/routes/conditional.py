"""Conditional GETs: 304 when the client's ETag is current, and answers reused by ETag.

An ETag names one state of a study (its change sequence) plus the query, so the answer for a
tag never changes: many pollers asking for the same one share a single database read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response


def not_modified(request: Request, tag: str) -> Response | None:
    given = request.headers.get("if-none-match")
    if given and tag in [t.strip() for t in given.split(",")]:
        return Response(status_code=304, headers={"ETag": tag})
    return None


class AnswerCache:
    """A small thread-safe LRU of answers by ETag (one per app)."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, tag: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if tag in self._items:
                self._items.move_to_end(tag)
                return self._items[tag]
        value = make()
        with self._lock:
            self._items[tag] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def answer(request: Request, response: Response, tag: str, make: Callable[[], Any]) -> Any:
    """304 if the client has ``tag``; else the (shared) answer for it, with the ETag set."""
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    cache = getattr(request.app.state, "answers", None)
    if cache is None:
        cache = request.app.state.answers = AnswerCache()
    response.headers["ETag"] = tag
    return cache.get_or_make(tag, make)

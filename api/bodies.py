"""Request bodies read as JSON that is also valid Unicode.

JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), and Python's ``json`` decodes it into
a string that no UTF-8 encoder takes. Stored, such a string broke every later read of what
held it: a study whose spec had one (a define-by-run choice) could no longer be read,
changed or deleted, and a trial's ``user_attrs`` made the study list answer 500. A body with
one is refused (422 naming where it is) before any route sees it, and so is a body that is
not UTF-8 (which Python would decode as UTF-16 or -32, surrogates and all). Surrogate pairs
(an emoji spelled ``"\\ud83d\\ude00"``) decode to one character and pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

# A surrogate escape, or a surrogate encoded in the bytes themselves (which ``json.loads``
# decodes with ``surrogatepass``). A body without either cannot hold a lone surrogate, and
# is not walked.
_MAYBE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_LONE = re.compile("[\ud800-\udfff]")


class BadBody(HTTPException):
    """A 422 raised while the body is read, naming the field at fault (FastAPI passes an
    HTTPException raised there on as it is; :mod:`hpo.api.errors` answers it as every other
    invalid input)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(status_code=422, detail=message)
        self.field = field


def lone_surrogate_at(value: Any) -> str | None:
    """Where in a decoded JSON value a string (or an object's key) holds a lone surrogate,
    as a field path (``user_attrs.a``, ``space.c.choices[0]``; a key's surrogate written as
    its escape, ``\\ud800``); None when nowhere."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _LONE.search(item):
                return path or "body"
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                shown = _LONE.sub(lambda m: f"\\u{ord(m[0]):04x}", key)  # answerable
                where = f"{path}.{shown}" if path else shown
                if _LONE.search(key):
                    return where
                children.append((where, child))
            stack.extend(reversed(children))  # the first one in the body is named first
        elif isinstance(item, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(item)]))
    return None


class StrictJsonRequest(Request):
    """A request whose JSON body may not hold a lone surrogate (:class:`BadBody`)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
                # json.loads would decode UTF-16 and -32 too (surrogates passing through,
                # unseen by the check below): JSON on the wire is UTF-8 (RFC 8259)
                raise BadBody("body", "not UTF-8: send JSON as UTF-8 text")
            value = json.loads(body)
            if _MAYBE.search(body) and (where := lone_surrogate_at(value)) is not None:
                raise BadBody(
                    where,
                    "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape not part of a "
                    "pair), which is not a character: send valid Unicode",
                )
            self._json = value
        return self._json


class StrictJsonRoute(APIRoute):
    """The routes of every router (``APIRouter(route_class=StrictJsonRoute)``): their bodies
    are read by :class:`StrictJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict

"""Dependencies injected into routes: the study service (workflows that write), the storage
(every read), and the caller's authentication."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from cachetools import TTLCache
from fastapi import Depends, Header, HTTPException, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from hpo.service import attempts
from hpo.service.attempts import AttemptToken
from hpo.service.spec import no_nul
from hpo.service.storage import Storage
from hpo.service.studies import StudyService

F = TypeVar("F", bound=Callable[..., Any])


# The dependencies below are ``async`` though they do no I/O: FastAPI runs a plain ``def``
# dependency in the thread pool, and those hops (three or four a request) queued behind the
# routes' database work under load: 200 dashboards polling saw 160 ms a request, mostly
# waiting for a thread to hand back a value it already had.


async def get_service(request: Request) -> StudyService:
    """The study service: ask, tell, report and the other workflows that write."""
    return request.app.state.service


async def get_storage(request: Request) -> Storage:
    """The storage, which read-only routes read through."""
    return request.app.state.service.storage


# Route functions an attempt token may call (see :func:`attempt_may_call`).
_ATTEMPT_ROUTES: set[Callable[..., Any]] = set()


def attempt_may_call(route: F) -> F:
    """Mark a route of ``/trials/{trial_id}`` that an attempt token may call for its own trial
    (report, heartbeat, tell, read the trial and its metrics); every other route answers such
    a token 403."""
    _ATTEMPT_ROUTES.add(route)
    return route


# Routes of those whose every call hands the attempt to a write that fences it again in its
# own transaction (see :func:`fenced_again`).
_FENCED_ROUTES: set[Callable[..., Any]] = set()


def fenced_again(route: F) -> F:
    """Mark a route (also :func:`attempt_may_call`) that only writes, and passes the caller's
    attempt to the write, which refuses it (409) unless it is current, in the write's own
    transaction: an attempt token found current in the last :data:`ATTEMPT_VERIFIED_S` is
    not read from the database again before it. (Reports and heartbeats: the hot routes.)"""
    _FENCED_ROUTES.add(route)
    return route


@dataclass(frozen=True)
class Caller:
    """Who sent the request: the admin (``attempt`` None), or one attempt of one trial."""

    attempt: AttemptToken | None = None


# Declares the bearer scheme in the OpenAPI document (the Authorize button of /docs, and what
# generated clients send); :func:`require_token` reads the header itself.
bearer = HTTPBearer(
    scheme_name="bearer",
    description="The API token: the server's $HPO_TOKEN, or the token file `hpo serve` writes "
    "($HPO_DATA_DIR/token; `hpo token` prints it). An attempt token (`hpo_att.…`) reaches its "
    "own trial's report, heartbeat, tell and reads.",
    auto_error=False,
)
# What a 401 says about where the token comes from.
TOKEN_HELP = (
    "send `Authorization: Bearer <token>`; the token is the server's $HPO_TOKEN or, when that "
    "is unset, the token file `hpo serve` writes ($HPO_DATA_DIR/token); `hpo token` prints it"
)


async def require_token(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
) -> None:
    """Authenticate ``Authorization: Bearer <token>``: the admin token (when the server has
    one) reaches every route; an attempt token (``hpo_att.<trial>.<attempt>.<secret>``) only
    the routes marked :func:`attempt_may_call`, of its own trial, while it is that trial's
    current attempt. Raises 401 (no or wrong token), 403 (an attempt token outside its
    trial), StaleAttempt (409: the attempt is no longer current)."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer" and attempts.is_attempt_token(given):
        token = _attempt_token(request, given)
        # Only touched here, on the event loop: no lock.
        verified: TTLCache[str, bool] = request.app.state.attempts_verified
        route = getattr(request.scope.get("route"), "endpoint", None)
        if route not in _FENCED_ROUTES or token.digest not in verified:
            storage: Storage = request.app.state.service.storage
            # Checking it reads the database: off the event loop.
            if not await run_in_threadpool(storage.attempt_matches, token):
                raise _unauthorized(f"wrong attempt token for trial {token.trial_id}")
            verified[token.digest] = True
        request.state.caller = Caller(token)
        return
    expected: str | None = request.app.state.token
    if expected is not None and (
        scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode())
    ):
        raise _unauthorized(f"missing or wrong API token: {TOKEN_HELP}")
    request.state.caller = Caller()


# Attempt tokens found current in the database, by hash, kept this many seconds: a trial's
# reports and heartbeats (:func:`fenced_again`) then skip that read and its trip to a thread.
# A wrong token is never kept. A token superseded meanwhile passes here for at most this long
# on those routes only, and their write refuses it (409) before storing anything. (Where this
# check would have said 401, a cached token then hears 409 for a re-issued token of the same
# attempt, or 404 for a deleted trial.)
ATTEMPT_VERIFIED_S = 5.0


def attempts_verified() -> TTLCache[str, bool]:
    """The app's cache of verified attempt tokens (see :data:`ATTEMPT_VERIFIED_S`)."""
    return TTLCache(maxsize=10_000, ttl=ATTEMPT_VERIFIED_S)


def _attempt_token(request: Request, given: str) -> AttemptToken:
    """The attempt token of a request, checked for shape and reach (its own trial, a route
    marked :func:`attempt_may_call`); whether it is current is checked by the caller."""
    token = attempts.parse(given)
    if token is None:
        raise _unauthorized("malformed attempt token")
    route = request.scope.get("route")
    if getattr(route, "endpoint", None) not in _ATTEMPT_ROUTES:
        raise HTTPException(
            status_code=403,
            detail=f"an attempt token (trial {token.trial_id}, attempt {token.attempt}) may "
            "only report, heartbeat, tell and read its own trial; use the API token here",
        )
    trial_id = request.path_params.get("trial_id")
    if str(trial_id) != str(token.trial_id):
        raise HTTPException(
            status_code=403,
            detail=f"this attempt token belongs to trial {token.trial_id}, not trial {trial_id}",
        )
    return token


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def get_caller(request: Request) -> Caller:
    """The authenticated caller (set by :func:`require_token`)."""
    return getattr(request.state, "caller", None) or Caller()


Service = Annotated[StudyService, Depends(get_service)]
Reader = Annotated[Storage, Depends(get_storage)]
Auth = Annotated[Caller, Depends(get_caller)]

MAX_ID = 2**63 - 1
# Ids and cursors are 64-bit in the database: anything larger is a 422, not a database error.
StudyId = Annotated[int, Path(ge=1, le=MAX_ID)]
TrialId = Annotated[int, Path(ge=1, le=MAX_ID)]
Cursor = Annotated[int | None, Query(ge=0, le=MAX_ID)]
# Free text to filter by (a study or metric name): a NUL character is a 422, not a database error.
NoNul = AfterValidator(no_nul)
QueryText = Annotated[str | None, Query(), NoNul]
# An ask's Idempotency-Key: at most 200 characters, no NUL (else a 422 naming the header).
AskKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=200),
    AfterValidator(no_nul),
]

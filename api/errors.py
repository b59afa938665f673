"""The one place where core errors become HTTP answers (JSON naming the field at fault)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hpo.api.bodies import BadBody
from hpo.api.schemas import ErrorBody
from hpo.service.errors import (
    AnalysisUnavailable,
    AskContention,
    Conflict,
    DatabaseUnavailable,
    HpoError,
    InvalidInput,
    NotFound,
    SuggestionPending,
)
from hpo.service.spec import describe_errors

STATUS = {
    NotFound: 404,
    Conflict: 409,
    InvalidInput: 422,
    DatabaseUnavailable: 503,
    SuggestionPending: 503,
    AskContention: 503,
    AnalysisUnavailable: 503,
}

# What every API route may answer besides its success, documented once (every error body is
# an ErrorBody); the app passes this to each router.
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API token"},
    403: {
        "model": ErrorBody,
        "description": "An attempt token used outside its own trial's report, heartbeat, "
        "tell and reads",
    },
    404: {"model": ErrorBody, "description": "No such study, trial or checkpoint"},
    409: {"model": ErrorBody, "description": "Conflicts with the stored state"},
    422: {"model": ErrorBody, "description": "Invalid input; `field` names it"},
    429: {
        "model": ErrorBody,
        "description": "Over the rate limit of this token; retry after `Retry-After` seconds",
    },
    503: {
        "model": ErrorBody,
        "description": "The database is unreachable or busy, a slow suggestion (GP) is "
        "still being computed, an ask kept losing the next trial to other servers' asks, or "
        "the dashboard's analysis worker could not run a fit; retry after `Retry-After` "
        "seconds",
    },
}
# What FastAPI says when a body is not UTF-8 text or nests too deeply to parse.
_UNPARSABLE_BODY = "There was an error parsing the body"


def _status(exc: HpoError) -> int:
    for cls, status in STATUS.items():
        if isinstance(exc, cls):
            return status
    return 400


def error_response(
    status: int, code: str, message: str, field: str | None = None, details: list | None = None
) -> JSONResponse:
    body = {"error": code, "message": message, "field": field}
    if details:
        body["details"] = details
    return JSONResponse(status_code=status, content=body)


def _validation(details: list[dict[str, str]]) -> JSONResponse:
    first = details[0] if details else {"field": None, "message": "invalid request"}
    message = "; ".join(
        f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details
    )
    return error_response(422, "invalid_input", message, first["field"], details)


def _json_type(content_type: str) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON (``application/json``,
    ``application/*+json``)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def install(app: FastAPI) -> None:
    @app.exception_handler(HpoError)
    async def _domain(_: Request, exc: HpoError) -> JSONResponse:
        response = error_response(_status(exc), exc.code, exc.message, exc.field)
        if isinstance(
            exc, DatabaseUnavailable | SuggestionPending | AskContention | AnalysisUnavailable
        ):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def _request(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = describe_errors(list(exc.errors()))
        sent_as = request.headers.get("content-type", "")
        if not _json_type(sent_as):  # FastAPI read no JSON out of it
            said = f"sent as {sent_as!r}" if sent_as else "sent without a Content-Type"
            for d in details:
                if d["field"] == "body":
                    d["message"] += f" (it was {said}: send JSON as application/json)"
        return _validation(details)

    @app.exception_handler(ValidationError)
    async def _model(_: Request, exc: ValidationError) -> JSONResponse:
        return _validation(describe_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BadBody):
            return _validation([{"field": exc.field, "message": str(exc.detail)}])
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            return _validation(
                [{"field": "body", "message": "not JSON (not UTF-8 text, or nested too deeply)"}]
            )
        code = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
        }.get(exc.status_code, "error")
        response = error_response(exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

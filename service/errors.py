"""Domain errors. Each names the field or id at fault; `hpo.api.errors` maps them to HTTP."""

from __future__ import annotations


class HpoError(Exception):
    """Base class of every error the core raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(HpoError):
    """The request is well formed but a value in it is not acceptable (HTTP 422)."""

    code = "invalid_input"


class NotFound(HpoError):
    """An id does not name a stored study or trial (HTTP 404)."""

    code = "not_found"


class StudyNotFound(NotFound):
    def __init__(self, study_id: int | str) -> None:
        super().__init__(f"study {study_id} not found", field="study_id")


class TrialNotFound(NotFound):
    def __init__(self, trial_id: int | str) -> None:
        super().__init__(f"trial {trial_id} not found", field="trial_id")


class Conflict(HpoError):
    """The request contradicts the stored state (HTTP 409)."""

    code = "conflict"


class NameTaken(Conflict):
    code = "name_taken"


class StudyNotRunning(Conflict):
    code = "study_not_running"


class BudgetSpent(Conflict):
    code = "budget_spent"


class GridExhausted(BudgetSpent):
    code = "grid_exhausted"


class ConcurrencyLimit(Conflict):
    code = "concurrency_limit"


class TrialFinished(Conflict):
    code = "trial_finished"


class DatabaseUnavailable(HpoError):
    """The database cannot be reached or is busy right now (HTTP 503 with ``Retry-After``).

    Raised by the storage's transaction scope for a lost or refused connection, a server that
    is down, a lock timeout or SQLite's "database is locked". Nothing was written: the caller
    may retry the same request after ``retry_after_s`` seconds.
    """

    code = "database_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, field=None)
        self.retry_after_s = retry_after_s


class SuggestionPending(HpoError):
    """The sampler's suggestion outlasted the ask's wait (``HPO_ASK_WAIT_S``; HTTP 503 with
    ``Retry-After``). It goes on in the background and is kept: the retried ask (the same
    Idempotency-Key or any ask of the study) is answered with it. Also raised when the ask
    waited that long for the server's other asks of the study. Nothing was written."""

    code = "suggestion_pending"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, field=None)
        self.retry_after_s = retry_after_s


class AskContention(HpoError):
    """An ask claimed no trial in all of its tries: asks through other server processes
    (replicas, ``hpo serve --workers``) kept taking the study's next number, or the trial it
    meant to resume, first (HTTP 503 with ``Retry-After``). No trial was handed out: ask
    again, with the same Idempotency-Key."""

    code = "ask_contention"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, field=None)
        self.retry_after_s = retry_after_s


class AnalysisUnavailable(HpoError):
    """The dashboard's analysis worker (:mod:`hpo.service.analysis_worker`) could not run
    the job (HTTP 503 with ``Retry-After``): it failed twice in a row (died, or could not
    start), the job outlasted its time limit, or the server is stopping. After such a failure
    no worker is started for a cool-down (``retry_after_s`` says how long it has left)."""

    code = "analysis_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, field=None)
        self.retry_after_s = retry_after_s


class StaleAttempt(Conflict):
    """A write made with the token of an attempt that is no longer the trial's current one
    (the trial was requeued and claimed again, or finished by another attempt): nothing of it
    was stored (HTTP 409)."""

    code = "stale_attempt"

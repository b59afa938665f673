"""Routes under /api/v1/trials.

Writes (tell, metrics, heartbeat) are fenced to the trial's current attempt. One made with
the API token that names no attempt (neither an attempt token nor ``attempt``) is accepted
only while the trial is on its first attempt: once the trial was handed out again it may
come from the attempt that lost it, so it is a 409 (``unnamed_first_only``). The scheduler's
in-process calls are not fenced so.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from hpo.api.bodies import StrictJsonRoute
from hpo.api.deps import (
    Auth,
    QueryText,
    Reader,
    Service,
    TrialId,
    attempt_may_call,
    fenced_again,
)
from hpo.api.pools import DEFAULT, REPORTS, runs_in
from hpo.api.schemas import (
    MAX_STEP,
    MetricPage,
    MetricsBody,
    ShouldStop,
    SuggestAnswer,
    SuggestBody,
    TellBody,
)
from hpo.service.records import Lineage, TrialRecord

router = APIRouter(prefix="/trials", tags=["trials"], route_class=StrictJsonRoute)

# The largest ``attempt`` a heartbeat may name (``trials.attempts`` is a 32-bit column).
MAX_ATTEMPT = 2**31 - 1


@router.get("/{trial_id}", response_model=TrialRecord)
@attempt_may_call
def get_trial(trial_id: TrialId, storage: Reader) -> TrialRecord:
    """Params, state, value, attempts, timings, where it ran, and its state history."""
    return storage.get_trial(trial_id)


@router.get("/{trial_id}/lineage", response_model=Lineage)
@attempt_may_call
def get_lineage(trial_id: TrialId, storage: Reader) -> Lineage:
    """The schedule a fresh trial follows to train as this one did: its parameters over its
    steps, every PBT copy resolved to the steps the trial it copied trained (and so on up the
    chain), each segment naming the trial that trained it. ``scheduler: {type: replay,
    schedule: ...}`` (``hpo replay``) trains along it."""
    return storage.lineage(trial_id)


@router.post("/{trial_id}/tell", response_model=TrialRecord)
@attempt_may_call
def tell(trial_id: TrialId, body: TellBody, service: Service, caller: Auth) -> TrialRecord:
    """Finish the trial. Repeating the same tell is a no-op; a different one on a finished
    trial is a 409, and so is a tell of an attempt that is no longer current."""
    return service.tell(
        trial_id,
        value=body.value,
        values=body.values,
        state=body.state,
        error=body.error,
        token=caller.attempt,
        attempt=body.attempt,
        unnamed_first_only=True,
    )


@router.post("/{trial_id}/metrics", response_model=ShouldStop, operation_id="report_metrics")
@attempt_may_call
@fenced_again
@runs_in(REPORTS)
def report(trial_id: TrialId, body: MetricsBody, service: Service, caller: Auth) -> ShouldStop:
    """Store metric points (each once per attempt), renew the trial's lease, and say whether
    it should stop; 409 for an attempt that is no longer current (nothing of the batch is
    stored)."""
    stop = service.report(
        trial_id, body.points, token=caller.attempt, attempt=body.attempt, unnamed_first_only=True
    )
    return ShouldStop(should_stop=stop)


@router.post("/{trial_id}/heartbeat", response_model=ShouldStop)
@attempt_may_call
@fenced_again
@runs_in(DEFAULT)
def heartbeat(
    trial_id: TrialId,
    service: Service,
    caller: Auth,
    attempt: Annotated[
        int | None,
        Query(ge=1, le=MAX_ATTEMPT, description="Refuse (409) unless this attempt is current."),
    ] = None,
) -> ShouldStop:
    """Renew the trial's lease without reporting metrics (409 for a stale attempt)."""
    stop = service.heartbeat(
        trial_id, token=caller.attempt, attempt=attempt, unnamed_first_only=True
    )
    return ShouldStop(should_stop=stop)


@router.get("/{trial_id}/metrics", response_model=MetricPage, operation_id="list_metrics")
@attempt_may_call
def metrics(
    trial_id: TrialId,
    storage: Reader,
    name: QueryText = None,
    since_step: Annotated[int | None, Query(ge=-1, le=MAX_STEP)] = None,
) -> MetricPage:
    """Metric points in step order; ``since_step`` returns only later steps."""
    return MetricPage(points=storage.metrics(trial_id, name=name, since_step=since_step))


@router.post("/{trial_id}/user_attrs", response_model=TrialRecord)
@attempt_may_call
def set_user_attrs(
    trial_id: TrialId,
    attrs: Annotated[dict[str, Any], Body(description="Merged into the trial's user_attrs.")],
    service: Service,
) -> TrialRecord:
    """Attach user attributes to the trial (Optuna's ``set_user_attr``): merged into those it
    has, in any state; 422 when not JSON or over 64 KiB."""
    return service.set_user_attrs(trial_id, attrs)


@router.post("/{trial_id}/suggest", response_model=SuggestAnswer)
@attempt_may_call
def suggest(trial_id: TrialId, body: SuggestBody, service: Service) -> SuggestAnswer:
    """The value of a parameter the running trial names (define-by-run): learned into the
    study's space on first use, then sampled with the rest. Asking again answers the same
    value. 422 for a domain of another kind than the space holds; 409 unless running."""
    value = service.suggest_param(trial_id, body.name, body.param)
    return SuggestAnswer(name=body.name, value=value)

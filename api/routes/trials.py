"""Routes under /api/v1/trials."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from hpo.api.deps import QueryText, Reader, Service, TrialId
from hpo.api.schemas import MAX_STEP, MetricPage, MetricsBody, ShouldStop, TellBody
from hpo.service.records import MetricInput, TrialRecord

router = APIRouter(prefix="/trials", tags=["trials"])


@router.get("/{trial_id}", response_model=TrialRecord)
def get_trial(trial_id: TrialId, storage: Reader) -> TrialRecord:
    """Params, state, value, attempts, timings, where it ran, and its state history."""
    return storage.get_trial(trial_id)


@router.post("/{trial_id}/tell", response_model=TrialRecord)
def tell(trial_id: TrialId, body: TellBody, service: Service) -> TrialRecord:
    """Finish the trial. Repeating the same tell is a no-op; a different one on a finished
    trial is a 409."""
    return service.tell(
        trial_id, value=body.value, values=body.values, state=body.state, error=body.error
    )


@router.post("/{trial_id}/metrics", response_model=ShouldStop)
def report(trial_id: TrialId, body: MetricsBody, service: Service) -> ShouldStop:
    """Store metric points, renew the trial's lease, and say whether it should stop."""
    points = [MetricInput(p.step, p.name, float(p.value)) for p in body.points]
    return ShouldStop(should_stop=service.report(trial_id, points))


@router.post("/{trial_id}/heartbeat", response_model=ShouldStop)
def heartbeat(trial_id: TrialId, service: Service) -> ShouldStop:
    """Renew the trial's lease without reporting metrics."""
    return ShouldStop(should_stop=service.heartbeat(trial_id))


@router.get("/{trial_id}/metrics", response_model=MetricPage)
def metrics(
    trial_id: TrialId,
    storage: Reader,
    name: QueryText = None,
    since_step: Annotated[int | None, Query(ge=-1, le=MAX_STEP)] = None,
) -> MetricPage:
    """Metric points in step order; ``since_step`` returns only later steps."""
    return MetricPage(points=storage.metrics(trial_id, name=name, since_step=since_step))

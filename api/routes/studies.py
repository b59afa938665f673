"""Routes under /api/v1/studies."""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from hpo.api.bodies import StrictJsonRoute
from hpo.api.deps import AskKey, Cursor, QueryText, Reader, Service, StudyId
from hpo.api.pools import ASKS, POLLS, runs_in, study_turn
from hpo.api.routes.conditional import NOT_MODIFIED, answer, not_modified
from hpo.api.schemas import (
    CSV,
    AskAnswer,
    AskBody,
    BestAnswer,
    EnqueueBody,
    ImportAnswer,
    ImportBody,
    StudyMetricPage,
    StudyPage,
    StudyPatch,
    TrialPage,
)
from hpo.service.errors import InvalidInput
from hpo.service.export import csv_cell, newest_versions, trial_rows
from hpo.service.records import TRIAL_STATES, StudyRecord, TrialRecord
from hpo.service.spec import StudySpec
from hpo.service.states import StudyState
from hpo.service.storage import Storage
from hpo.service.studies import StudyService
from hpo.service.warmstart import FinishedTrial

router = APIRouter(prefix="/studies", tags=["studies"], route_class=StrictJsonRoute)
STUDY_STATE = "^(" + "|".join(s.value for s in StudyState) + ")$"


@router.post("", status_code=201, response_model=StudyRecord)
def create_study(
    spec: StudySpec,
    service: Service,
    response: Response,
    load_if_exists: Annotated[
        bool,
        Query(
            description="Answer 200 with the study of this name when its objective and "
            "space match (409 naming what differs)."
        ),
    ] = False,
) -> StudyRecord:
    """Create a study from its spec. 422 names the bad field; 409 if the name is taken."""
    if load_if_exists:
        study, created = service.create_or_load(spec)
        response.status_code = 201 if created else 200
    else:
        study = service.create_study(spec)
    response.headers["Location"] = f"/api/v1/studies/{study.id}"
    return study


@router.get("", response_model=StudyPage)
def list_studies(
    storage: Reader,
    state: Annotated[str | None, Query(pattern=STUDY_STATE)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Cursor = None,
    name: QueryText = None,
) -> StudyPage:
    """Studies, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    studies, next_cursor = storage.list_studies(state=state, limit=limit, cursor=cursor, name=name)
    return StudyPage(studies=studies, next_cursor=next_cursor)


@router.get("/{study_id}", response_model=StudyRecord, responses=NOT_MODIFIED)
async def get_study(study_id: StudyId, storage: Reader, request: Request) -> Response:
    """Spec, state, trial counts per state and best trial. Honours ``If-None-Match`` (a
    change made through another server on the same database shows within a second)."""
    seq = storage.known_study_seq(study_id)  # a poll's usual 304: no read, no thread
    if seq is not None and (unchanged := not_modified(request, _study_tag(study_id, seq))):
        return unchanged
    return await _read_study(study_id, storage, request)


def _study_tag(study_id: int, seq: int) -> str:
    return f'"study-{study_id}-{seq}"'


@runs_in(POLLS)
def _read_study(study_id: int, storage: Storage, request: Request) -> Response:
    tag = _study_tag(study_id, storage.study_seq(study_id))
    return answer(request, tag, lambda: storage.get_study(study_id))


@router.patch("/{study_id}", response_model=StudyRecord)
def update_study(study_id: StudyId, patch: StudyPatch, service: Service) -> StudyRecord:
    """Pause, resume or stop the study, change its budget (``max_trials``,
    ``max_concurrent``, ``timeout_s``, ``max_steps``, ``max_worker_seconds``) or merge
    ``user_attrs`` into its user attributes (null removes a key). A raised budget
    runs a completed study again; 409 naming the field when the study would stay completed
    (nothing is changed then)."""
    budget = patch.budget.model_dump(exclude_none=True) if patch.budget else {}
    return service.update_study(study_id, state=patch.state, user_attrs=patch.user_attrs, **budget)


@router.delete("/{study_id}", status_code=204)
def delete_study(study_id: StudyId, service: Service) -> Response:
    """Delete the study, its trials and metrics; running trials are cancelled. The study is
    stopped first (its active trials fail): a 503 may leave it stopped but not deleted, and
    the same DELETE sent again finishes it."""
    service.delete_study(study_id)
    return Response(status_code=204)


# An ask without a body (the body is optional: a schema of its own, not "or null", so
# generated clients leave it out).
_NO_PARAMS = AskBody()


@router.post("/{study_id}/ask", status_code=201, response_model=AskAnswer)
async def ask(
    study_id: StudyId,
    service: Service,
    request: Request,
    key: AskKey = None,
    body: AskBody = _NO_PARAMS,
) -> AskAnswer:
    """A trial to run, with its attempt's token: 409 when the grid is exhausted, the budget
    spent or the study paused. An ``Idempotency-Key`` used before answers the trial its first
    ask created (no budget spent), or 409 when that trial has finished or the body fixes
    other params than that ask's did. A body
    ``{"params": {...}}`` fixes values of a new trial (422 naming one outside the space).
    503 ``suggestion_pending`` (retry) when a slow sampler, or the study's other asks, held
    it longer than ``HPO_ASK_WAIT_S``; 503 ``ask_contention`` (retry) when asks through other
    server processes kept taking the next trial first."""
    async with study_turn(request, study_id, service.suggestions.wait_s):
        return await _ask(study_id, service, key, body)


@runs_in(ASKS)
def _ask(study_id: int, service: StudyService, key: str | None, body: AskBody) -> AskAnswer:
    trial = service.ask(study_id, key=key, params=body.params)
    return AskAnswer(
        trial_id=trial.id,
        number=trial.number,
        params=trial.params,
        attempt=trial.attempts,
        attempt_token=trial.attempt_token,
    )


@router.post("/{study_id}/queue", status_code=201, response_model=TrialRecord)
def enqueue_trial(study_id: StudyId, body: EnqueueBody, service: Service) -> TrialRecord:
    """Queue a trial with fixed parameters (Optuna's ``enqueue_trial``): the next ask hands it
    out before any new suggestion. A study with a ``space`` needs every active parameter;
    a define-by-run study takes any subset. 422 names a parameter outside the space."""
    return service.enqueue_trial(study_id, body.params)


@router.post("/{study_id}/trials", status_code=201, response_model=ImportAnswer)
def import_trials(study_id: StudyId, body: ImportBody, service: Service) -> ImportAnswer:
    """Store finished trials from elsewhere (warm start): the samplers learn from them. They
    do not spend the budget (``max_trials`` grows by their count). 422 names the trial and
    field at fault."""
    finished = [
        FinishedTrial(
            params=t.params, state=t.state, value=t.value, values=t.values, user_attrs=t.user_attrs
        )
        for t in body.trials
    ]
    return ImportAnswer(trials=service.import_trials(study_id, finished))


@router.get("/{study_id}/trials", response_model=TrialPage, responses=NOT_MODIFIED)
@runs_in(POLLS)
def list_trials(
    study_id: StudyId,
    storage: Reader,
    request: Request,
    state: str | None = None,
    since: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> Response:
    """Trials changed after cursor ``since`` (all when absent), with the next cursor."""
    states = _states(state)
    # The validated states, not the raw query: the tag goes into a header verbatim.
    filter_ = ",".join(states or [])
    # The curves cursor, not ``seq``: new points count as a change here (records carry
    # ``last_step``), so the list's cursor and ETag move with them; the study's do not.
    curve_seq = storage.study_curve_seq(study_id)
    tag = f'"trials-{study_id}-{curve_seq}-{since}-{filter_}-{limit}"'

    def page() -> TrialPage:
        trials, cursor = storage.list_trials(study_id, states=states, since=since, limit=limit)
        return TrialPage(trials=trials, cursor=cursor)

    return answer(request, tag, page)


@router.get(
    "/{study_id}/metrics", response_model=StudyMetricPage, operation_id="list_study_metrics"
)
def study_metrics(
    study_id: StudyId,
    storage: Reader,
    name: QueryText = None,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> StudyMetricPage:
    """The study's metric points (of metric ``name``), trial by trial in id order, each
    trial's in step order as ``/trials/{id}/metrics`` gives them: at most ``limit`` trials a
    page (fewer when they hold over 100,000 points); pass ``cursor`` back as ``after``."""
    points, cursor = storage.study_metrics(study_id, name=name, after=after, limit=limit)
    return StudyMetricPage(points=points, cursor=cursor)


@router.get("/{study_id}/best", response_model=BestAnswer, operation_id="get_best")
def best(study_id: StudyId, storage: Reader) -> BestAnswer:
    """The best complete trial, and the Pareto front of a multi-objective study."""
    best_trial, front = storage.best(study_id)
    return BestAnswer(best_trial=best_trial, best_trials=front)


@router.get(
    "/{study_id}/export.csv",
    response_class=Response,
    responses=CSV,
    operation_id="export_trials_csv",
)
def export_csv(study_id: StudyId, storage: Reader) -> Response:
    """Every trial as one CSV row (number, state, value(s), params_*, timings)."""
    study = storage.get_study(study_id)
    trials = _all_trials(storage, study_id)
    metrics = [o.metric for o in StudySpec.model_validate(study.spec).objectives]
    columns, rows = trial_rows(trials, metrics)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    filename = f"{study.name}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _all_trials(storage: Storage, study_id: int) -> list:
    trials, since = [], None
    while True:
        page, cursor = storage.list_trials(study_id, since=since)
        trials.extend(page)
        if len(page) < 1000:
            return newest_versions(trials)
        since = cursor


def _states(state: str | None) -> list[str] | None:
    if not state:
        return None
    states = [s.strip() for s in state.split(",") if s.strip()]
    for s in states:
        if s not in TRIAL_STATES:
            raise InvalidInput(
                f"state: {s!r} is not a trial state ({', '.join(TRIAL_STATES)})", field="state"
            )
    return states

"""The dashboard: its static page at ``/`` and the read endpoints its plots poll.

``router`` holds the API endpoints (served under ``/api/v1`` with the token); ``pages`` serves
the page and ``files`` its files, both without a token (the page asks for the token itself).

Every endpoint answers ``304 Not Modified`` while the ``If-None-Match`` it is sent names the
current ETag. Study-level tags carry the study's change sequence (``seq``; the curves its curves
cursor, ``curve_seq``, which metric points move), so checking one costs a single indexed read;
the answer itself is built only when something changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import mimetypes
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from cachetools import LRUCache, cached
from fastapi import APIRouter, Query, Request, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError

from hpo.api.bodies import StrictJsonRoute
from hpo.api.deps import Cursor, NoNul, Reader, StudyId, TrialId
from hpo.api.pools import POLLS, runs_in
from hpo.api.routes.conditional import NOT_MODIFIED, answer, not_modified
from hpo.service import analysis, analysis_worker
from hpo.service.background import BackgroundJobs, NotReady
from hpo.service.errors import DatabaseUnavailable, InvalidInput
from hpo.service.records import StudyRecord, TrialRecord
from hpo.service.spec import ParamValue, StudySpec
from hpo.service.storage import Storage, analyses, parse_spec

log = logging.getLogger(__name__)

router = APIRouter(tags=["dashboard"], route_class=StrictJsonRoute)
pages = APIRouter(include_in_schema=False, route_class=StrictJsonRoute)

STATIC = Path(__file__).resolve().parent.parent / "static"
MaxPoints = Annotated[int, Query(ge=4, le=10_000, description="Points kept per series.")]
Objective = Annotated[int, Query(ge=0, le=63, description="Index of the objective.")]


# ------------------------------------------------------------------------- caches
# LRUs (cachetools) shared by the server's threads: concurrent callers of one key wait for the
# first to compute it instead of computing it again.


def _series_key(storage: Storage, trial: TrialRecord, max_points: int) -> tuple:
    return (trial.id, trial.curve_seq, max_points)


@cached(LRUCache(4096), key=_series_key, condition=threading.Condition())
def _trial_series(storage: Storage, trial: TrialRecord, max_points: int) -> dict:
    """Every metric of the trial, downsampled (cached until the trial changes)."""
    if trial.last_step is None:
        return {}
    points = ((p.name, p.step, p.value) for p in storage.metrics(trial.id))
    return analysis.metric_series(points, max_points)


# Importance and contours are fitted where the app's analyses run (a worker process that fits
# one at a time: service/analysis_worker.py), waited for on background threads (two at a
# time), one job per study change (seq): a request waits at most HPO_IMPORTANCE_WAIT_S for
# it, then answers (importance) the study's last result, or 202, while it goes on. Each fit is
# kept at rest (service/storage/analyses.py): while the study is unchanged, any server answers
# it at once, one just started included.
_analysis_jobs = BackgroundJobs(workers=2, keep=128, name="hpo-analysis")


def _study_tag(storage: Storage, study_id: int, what: str, *options: Any) -> str:
    return f'"{what}-{study_id}-{storage.study_seq(study_id)}-{_digest(options)}"'


def _curves_tag(storage: Storage, study_id: int, *options: Any) -> str:
    return f'"curves-{study_id}-{storage.study_curve_seq(study_id)}-{_digest(options)}"'


def _digest(value: Any) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def _objective(spec: StudySpec, objective: int) -> int:
    if objective >= len(spec.objectives):
        raise InvalidInput(
            f"objective: the study has {len(spec.objectives)} objective(s); "
            f"{objective} is out of range",
            field="objective",
        )
    return objective


# ---------------------------------------------------------------------- bodies


class StudySummary(BaseModel):
    id: int
    name: str
    state: str
    state_reason: str | None
    sampler: str
    directions: list[str]
    counts: dict[str, int]
    n_trials: int
    max_trials: int | None
    best_value: float | None
    best_values: list[list[float]]
    updated_at: datetime
    seq: int


class StudySummaryPage(BaseModel):
    studies: list[StudySummary]
    truncated: bool


class TrialCurve(BaseModel):
    trial_id: int
    number: int
    state: str
    steps: list[int]
    values: list[float]
    n: int
    last_step: int | None = None
    # The trial's curves cursor when this was read: of two readings of ``last_step`` (this
    # and the trial's record, which has its own), the page keeps the later one.
    curve_seq: int | None = None


class CurvesPage(BaseModel):
    metric: str
    names: list[str]
    series: list[TrialCurve]
    cursor: int
    more: bool


class ImportanceAnswer(BaseModel):
    objective: int
    importances: dict[str, float]
    n_trials: int
    method: str
    # Complete trials the forest was fitted on (a sample of n_trials beyond 2,000).
    n_fitted: int | None = None
    # "computing": the fit for the study as it is now is under way (202 when there is no
    # earlier answer to show); ask again after Retry-After.
    status: Literal["ready", "computing"] = "ready"


class MetricSeries(BaseModel):
    """One metric of one trial, downsampled: ``n`` points before downsampling."""

    steps: list[int]
    values: list[float]
    n: int


class TrialSeries(BaseModel):
    trial_id: int
    series: dict[str, MetricSeries]


class ContourAxis(BaseModel):
    name: str
    kind: Literal["numeric", "categorical"]
    log: bool
    values: list[ParamValue] = Field(
        description="Grid values (log10 of them on a log scale), or a categorical's choices."
    )


class ContourPoint(BaseModel):
    """A complete trial the estimate was fitted on."""

    x: ParamValue
    y: ParamValue
    value: float
    number: int


class ContourAnswer(BaseModel):
    x: ContourAxis
    y: ContourAxis
    z: list[list[float]] = Field(description="`z[j][i]` is at `x.values[i]`, `y.values[j]`.")
    points: list[ContourPoint]
    # "computing" (with 202, empty z and points): the fit is under way; ask after Retry-After.
    status: Literal["ready", "computing"] = "ready"


_FITTING = "Still fitting (`status: computing`): ask again after Retry-After."


def _summary(s: StudyRecord) -> StudySummary:
    best = s.best_trial
    return StudySummary(
        id=s.id,
        name=s.name,
        state=s.state,
        state_reason=s.state_reason,
        sampler=s.spec["sampler"]["type"],
        directions=s.directions,
        counts=s.counts,
        n_trials=s.n_trials,
        max_trials=(s.spec.get("budget") or {}).get("max_trials"),
        best_value=best.value if best else None,
        best_values=[t.values for t in s.best_trials if t.values] if len(s.directions) > 1 else [],
        updated_at=s.updated_at,
        seq=s.seq,
    )


# ------------------------------------------------------------------- endpoints


@router.get(
    "/dashboard/studies",
    response_model=StudySummaryPage,
    responses=NOT_MODIFIED,
    operation_id="list_study_summaries",
)
def study_summaries(
    storage: Reader,
    request: Request,
    response: Response,
    state: Annotated[str | None, Query(pattern="^(running|paused|stopped|completed)$")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
):
    """Every study (newest first, at most ``limit``) with its counts and best value."""
    studies: list[StudyRecord] = []
    cursor = None
    while len(studies) < limit:
        page, cursor = storage.list_studies(state=state, limit=limit - len(studies), cursor=cursor)
        studies.extend(page)
        if cursor is None:
            break
    tag = f'"studies-{_digest([(s.id, s.seq) for s in studies] + [state, limit])}"'
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    response.headers["ETag"] = tag
    return StudySummaryPage(studies=[_summary(s) for s in studies], truncated=cursor is not None)


@router.get(
    "/studies/{study_id}/curves",
    response_model=CurvesPage,
    responses=NOT_MODIFIED,
    operation_id="get_curves",
)
@runs_in(POLLS)
def curves(
    study_id: StudyId,
    storage: Reader,
    request: Request,
    metric: Annotated[str | None, Query(min_length=1, max_length=128), NoNul] = None,
    max_points: MaxPoints = 200,
    since: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    best: Annotated[
        int | None,
        Query(ge=1, le=1000, description="Only the best complete trials, and the unfinished."),
    ] = None,
    objective: Objective = 0,
) -> Response:
    """Learning curves: one downsampled series of ``metric`` (the first objective's by
    default; read from the curves kept at rest, at most 120 points with every bucket's
    extrema; ``/trials/{id}/series`` has the full resolution) per trial whose record or
    points changed after curves cursor ``since``; pass
    ``cursor`` back as ``since``. The cursor and ETag are the curves' own (metric points move
    them, not the study's ETag).

    ``best=N`` (without ``since``) asks for a large study's first view: the curves of its N
    best complete trials by objective ``objective`` and of at most N unfinished ones
    (running and waiting before paused), in one answer (``more`` false), with the cursor to
    follow every change from then on."""
    if best is not None and since is not None:
        raise InvalidInput("best: asks for a first view; it cannot follow a cursor", field="best")
    if best is not None or objective:
        _objective(storage.spec_of(study_id), objective)
    if best is None:
        objective = 0  # not used without best: one ETag for every value
    else:
        limit = 1000  # not used with best: one ETag for every value
    # Pages polling one study ask for the same delta, which its ETag names: the first
    # computes it, the others are sent its JSON (see ``conditional.answer``).
    query = (metric, max_points, since, limit, best, objective)
    tag = _curves_tag(storage, study_id, *query)
    return answer(request, tag, lambda: _curves_page(storage, study_id, *query))


def _curves_page(
    storage: Storage,
    study_id: int,
    metric: str | None,
    max_points: int,
    since: int | None,
    limit: int,
    best: int | None,
    objective: int,
) -> CurvesPage:
    metric = metric or storage.spec_of(study_id).objectives[0].metric
    trials, at_rest, names, cursor = storage.curves_page(
        study_id, metric, since=since, limit=limit, best=best, objective=objective
    )
    out = []
    for t in trials:
        curve = at_rest.get(t.id)
        if curve is None:
            continue
        steps, values = curve.steps, curve.values
        if len(steps) > max_points:
            keep = analysis.downsample(values, max_points)
            steps, values = [steps[i] for i in keep], [values[i] for i in keep]
        out.append(
            TrialCurve(
                trial_id=t.id,
                number=t.number,
                state=t.state,
                last_step=t.last_step,
                curve_seq=t.curve_seq,
                steps=steps,
                values=values,
                n=curve.n,
            )
        )
    more = best is None and len(trials) == limit
    return CurvesPage(metric=metric, names=sorted(names), series=out, cursor=cursor, more=more)


@router.get(
    "/studies/{study_id}/importance",
    response_model=ImportanceAnswer,
    responses={**NOT_MODIFIED, 202: {"model": ImportanceAnswer, "description": _FITTING}},
    operation_id="get_importance",
)
def importance(
    study_id: StudyId,
    storage: Reader,
    request: Request,
    response: Response,
    objective: Objective = 0,
):
    """How much each parameter explains the objective (random forest over the complete
    trials, a sample of 2,000 beyond; normalised to sum 1). Fitted off the request: past
    1,000 complete trials (HPO_IMPORTANCE_WAIT_TRIALS), while a fit takes longer than
    HPO_IMPORTANCE_WAIT_S (2 s), the answer is the last one with ``status`` "computing", or
    202 when there is none, with Retry-After."""
    seq = storage.study_seq(study_id)
    tag = f'"importance-{study_id}-{seq}-{_digest((objective,))}"'
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    study = storage.get_study(study_id)
    spec = parse_spec(study.spec)
    objective = _objective(spec, objective)
    name = analyses.key("importance", objective)
    kept = _kept_importance(analyses.current(storage, study_id, name, seq), objective, "ready")
    if kept is not None:  # fitted for the study as it is now
        response.headers["ETag"] = tag
        return kept
    try:
        result = _analysis_jobs.result(
            (study_id, seq, objective),
            _fit_and_keep,
            request.app.state.analyses,
            storage,
            name,
            seq,
            dataclasses.asdict,
            analysis_worker.fit_importance,
            study_id,
            spec,
            objective,
            wait_s=_analysis_wait(request, study),
        )
    except NotReady:
        # Still fitting: the last answer kept (or none, 202) and no ETag; ask again shortly.
        response.headers["Retry-After"] = "1"
        response.headers["Cache-Control"] = "no-store"
        kept = _kept_importance(analyses.last(storage, study_id, name), objective, "computing")
        if kept is None:
            response.status_code = 202
            return _importance_answer(objective, analysis.Importance({}, 0), "computing")
        return kept
    response.headers["ETag"] = tag
    return _importance_answer(objective, result, "ready")


def _kept_importance(kept: Any, objective: int, status: str) -> ImportanceAnswer | None:
    """The answer for a kept importance; None when there is none, or when it has another
    shape (kept by other code under the same key): then it is fitted again."""
    if not isinstance(kept, dict):
        return None
    try:
        return _importance_answer(objective, analysis.Importance(**kept), status)
    except (TypeError, ValidationError):
        return None


def _as_contour(kept: Any) -> dict[str, Any] | None:
    """A kept contour (without its points) as the answer; None as for
    :func:`_kept_importance`."""
    if kept is None:
        return None
    try:
        return ContourAnswer.model_validate(kept).model_dump()
    except ValidationError:
        return None


def _without_points(contour: dict[str, Any]) -> dict[str, Any]:
    """A contour as it is kept: its points are every complete trial (the page, which has them,
    asks without them), so they are left out."""
    return {**contour, "points": []}


def _fit_and_keep(
    where: analysis_worker.Analyses,
    storage: Storage,
    name: str,
    seq: int,
    encode: Callable[[Any], Any],
    fit: Callable[..., Any],
    study_id: int,
    *args: Any,
) -> Any:
    """``fit(study_id, *args)`` where the app's analyses run, then kept at rest under
    ``name`` as asked at the study's ``seq``. When it cannot be stored (an outage, the
    study's row held past ``analyses.LOCK_TIMEOUT_S``) that is only logged: the answer
    stands, and the next server fits it again."""
    result = where.run(fit, study_id, *args)
    try:
        analyses.put(storage, study_id, name, seq, encode(result))
    except DatabaseUnavailable as error:
        log.warning("an analysis of study %s was not kept: %s", study_id, error)
    return result


def _analysis_wait(request: Request, study: StudyRecord) -> float | None:
    """How long a request waits for an analysis job: as long as it takes for a study of up
    to HPO_IMPORTANCE_WAIT_TRIALS complete trials (a quick fit), else HPO_IMPORTANCE_WAIT_S."""
    settings = request.app.state.settings
    small = study.counts.get("complete", 0) <= settings.importance_wait_trials
    return None if small else settings.importance_wait_s


def _importance_answer(
    objective: int, result: analysis.Importance, status: str
) -> ImportanceAnswer:
    return ImportanceAnswer(
        objective=objective,
        importances=result.importances,
        n_trials=result.n_trials,
        method=result.method,
        n_fitted=result.n_fitted,
        status=status,
    )


@router.get(
    "/studies/{study_id}/contour",
    response_model=ContourAnswer,
    responses={**NOT_MODIFIED, 202: {"model": ContourAnswer, "description": _FITTING}},
    operation_id="get_contour",
)
def contour(
    study_id: StudyId,
    storage: Reader,
    request: Request,
    response: Response,
    x: Annotated[str, Query(min_length=1, max_length=128), NoNul],
    y: Annotated[str, Query(min_length=1, max_length=128), NoNul],
    objective: Objective = 0,
    size: Annotated[int, Query(ge=2, le=100)] = 24,
    points: Annotated[
        bool, Query(description="Include the trials (the page, which has them, leaves them out).")
    ] = True,
) -> Any:
    """The objective estimated over a grid of parameters ``x`` and ``y``, with the complete
    trials it was estimated from (``z[j][i]`` is at ``x.values[i]``, ``y.values[j]``)."""
    tag = _study_tag(storage, study_id, "contour", x, y, objective, size, points)
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    study = storage.get_study(study_id)
    spec = parse_spec(study.spec)
    objective = _objective(spec, objective)
    analysis.check_axes(spec, x, y)
    name = analyses.key("contour", x, y, objective, size)
    result = None
    if not points:  # kept without its points
        result = _as_contour(analyses.current(storage, study_id, name, study.seq))
    if result is None:  # not kept for the study as it is now
        try:
            result = _analysis_jobs.result(
                (study_id, study.seq, x, y, objective, size),
                _fit_and_keep,
                request.app.state.analyses,
                storage,
                name,
                study.seq,
                _without_points,
                analysis_worker.fit_contour,
                study_id,
                spec,
                x,
                y,
                objective,
                size,
                wait_s=_analysis_wait(request, study),
            )
        except NotReady:  # still fitting: 202, no ETag; the page asks again at its next poll
            response.status_code = 202
            response.headers["Retry-After"] = "1"
            response.headers["Cache-Control"] = "no-store"
            axes = {"x": analysis.empty_axis(spec, x), "y": analysis.empty_axis(spec, y)}
            return {**axes, "z": [], "points": [], "status": "computing"}
    response.headers["ETag"] = tag
    return result if points else {**result, "points": []}


@router.get(
    "/trials/{trial_id}/series",
    response_model=TrialSeries,
    responses=NOT_MODIFIED,
    operation_id="get_trial_series",
)
def trial_series(
    trial_id: TrialId,
    storage: Reader,
    request: Request,
    response: Response,
    max_points: MaxPoints = 1000,
):
    """Every metric of the trial, each downsampled to at most ``max_points`` points."""
    trial = storage.get_trial(trial_id, events=False)
    tag = f'"series-{trial_id}-{trial.curve_seq}-{max_points}"'
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    series = _trial_series(storage, trial, max_points)
    response.headers["ETag"] = tag
    return TrialSeries(trial_id=trial_id, series={k: s.as_dict() for k, s in series.items()})


# ----------------------------------------------------------------------- pages

# The page's modules must be served as JavaScript whatever the host's mime.types says.
mimetypes.add_type("text/javascript", ".js")
# The page's files (mounted at ``/static``; ETag and 304 from Starlette, headers from
# :class:`hpo.api.middleware.SecurityHeaders`).
files = StaticFiles(directory=STATIC)


@pages.get("/")
async def index(request: Request) -> Response:
    """The dashboard (``/#token=...`` hands it the API token)."""
    return await files.get_response("index.html", request.scope)

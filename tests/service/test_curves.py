"""Learning curves kept at rest: folded in as points are stored, equal to a rebuild from the
points, extrema kept, and back-filled by the migration for points stored before it."""

from __future__ import annotations

import math
import random

from alembic import command
from sqlalchemy import text

from hpo.service.db import make_engine, upgrade_schema
from hpo.service.db.engine import alembic_config
from hpo.service.spec import StudySpec
from hpo.service.storage import curves
from hpo.service.studies import MetricInput, StudyService
from tests.conftest import simple_spec


def test_a_curve_folded_point_by_point_is_the_curve_of_the_whole_series() -> None:
    rng = random.Random(0)
    values = [rng.gauss(0, 1) for _ in range(5000)]
    folded = curves.Curve()
    for step, value in enumerate(values):
        folded.add(step, value)
    whole = curves.from_points(range(5000), values)
    assert folded.points() == whole.points() and folded.shift == whole.shift
    steps, kept = folded.points()
    assert len(folded.buckets) <= curves.BUCKETS and len(steps) <= 4 * curves.BUCKETS
    assert min(kept) == min(values) and max(kept) == max(values)
    assert steps[0] == 0 and steps[-1] == 4999 and folded.n() == 5000
    short = curves.from_points(range(50), values[:50])  # buckets of two steps: all kept
    assert short.points() == (list(range(50)), values[:50])


def test_reports_keep_each_trials_curve_at_rest(service: StudyService) -> None:
    sid = service.create_study(StudySpec.model_validate(simple_spec("c"))).id
    t = service.ask(sid)
    values = [math.cos(s / 40) + (5.0 if s == 777 else 0.0) for s in range(2000)]
    for start in range(0, 2000, 300):  # batches, one of them sent twice (a lost answer)
        batch = [MetricInput(s, "loss", values[s]) for s in range(start, min(start + 300, 2000))]
        service.report(t.id, batch)
        if start == 600:
            service.report(t.id, batch)
    service.report(t.id, [MetricInput(0, "acc", 0.5)])
    at_rest, names = service.storage.curves([t.id], "loss")
    assert names == {"loss", "acc"}
    curve = at_rest[t.id]
    assert curve.n() == 2000  # the batch sent twice is counted once
    steps, kept = curve.points()
    assert 777 in steps and max(kept) == max(values) and min(kept) == min(values)
    with service.storage.write() as s:  # the same as a rebuild from the stored points
        curves.rebuild(s, [t.id])
    rebuilt, _ = service.storage.curves([t.id], "loss")
    assert rebuilt[t.id].points() == curve.points() and rebuilt[t.id].n() == 2000
    # the dashboard's page reads the same points straight from the stored rows
    _, kept, _, _ = service.storage.curves_page(sid, "loss")
    assert (kept[t.id].steps, kept[t.id].values) == curve.points() and kept[t.id].n == 2000


def test_the_migration_back_fills_curves_from_stored_points(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        cfg = alembic_config(engine)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0006")
            conn.commit()
        t = {"t": "2026-01-01 00:00:00"}
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (id, name, spec, state, next_number, seq, created_at,"
                    " updated_at) VALUES (1, 's', '{}', 'running', 1, 1, :t, :t)"
                ),
                t,
            )
            conn.execute(
                text(
                    "INSERT INTO trials (id, study_id, number, state, attempts, seq, created_at)"
                    " VALUES (1, 1, 0, 'running', 2, 1, :t)"
                ),
                t,
            )
            rows = [{"s": s, "v": float(s % 7), "a": 1, **t} for s in range(100)]
            rows.append({"s": 3, "v": -9.0, "a": 2, **t})  # the newest attempt's value wins
            conn.execute(
                text(
                    "INSERT INTO metric_points (trial_id, study_id, step, name, value, time,"
                    " attempt) VALUES (1, 1, :s, 'loss', :v, :t, :a)"
                ),
                rows,
            )
        upgrade_schema(engine)
        with engine.connect() as conn:
            shift, n, text_ = conn.execute(
                text("SELECT shift, n, buckets FROM trial_curves WHERE trial_id = 1")
            ).one()
    finally:
        engine.dispose()
    curve = curves.Curve.loads(shift, text_)
    steps, values = curve.points()
    assert n == 100 and steps[0] == 0 and steps[-1] == 99
    assert min(values) == -9.0 and max(values) == 6.0

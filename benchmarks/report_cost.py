"""What one 330-point report costs, part by part, old way against new, in one run.

``insert``: PostgreSQL's CPU for the report's point insert (``storage.metrics``'s
``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING``, sent as the service sends it),
read from the backend's own CPU time (``/proc``), with and without the foreign key from
``metric_points.trial_id`` to ``trials`` that migration 0015 dropped. A throwaway database on
the server of ``--postgres`` (dropped at the end) with the newest schema, one study and 8
running trials; blocks of ``--reports`` inserts, round robin over the trials, alternate
with the key added back and without it.

``body``: the server's CPU to turn a report's JSON body into the points the service takes:
what FastAPI does (``json.loads``, then the body model's validation) and, before report
bodies were validated straight into records, the copy of each point into a ``MetricInput``;
timed with ``timeit`` in this process, alternating the old model (pydantic ``BaseModel``
points with a Python validator for finite values) and the shipped one
(``api.schemas.PointIn``: a dataclass validated straight into the record).

    python benchmarks/report_cost.py insert --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/report_cost.py body
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import sys
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, field_validator
from sqlalchemy import create_engine, text

from hpo.api.schemas import MAX_POINTS, MAX_STEP, MetricsBody
from hpo.service.db import make_engine, upgrade_schema
from hpo.service.records import MetricInput
from hpo.service.spec import MetricName, Number
from hpo.service.storage.metrics import _UNNEST_INSERT, _array_literals

TRIALS = 8
_ADD_KEY = (
    "ALTER TABLE metric_points ADD CONSTRAINT metric_points_trial_id_fkey "
    "FOREIGN KEY (trial_id) REFERENCES trials (id) ON DELETE CASCADE"
)
_DROP_KEY = "ALTER TABLE metric_points DROP CONSTRAINT metric_points_trial_id_fkey"


def _batch(step: int, points: int) -> list[MetricInput]:
    """``points`` points from ``step`` on, two metrics a step, as scale.py's streams send."""
    out = []
    for s in range(step, step + points // 2):
        out += [MetricInput(s, "loss", 0.5 + 1 / (1 + s)), MetricInput(s, "acc", 0.8)]
    return out


def _backend_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one PostgreSQL backend (same machine only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_insert(args: argparse.Namespace) -> None:
    name = f"hpo_cost_{secrets.token_hex(4)}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.postgres.rsplit("/", 1)[0] + "/" + name
    try:
        engine = make_engine(url)
        upgrade_schema(engine)
        insert = text(_UNNEST_INSERT.replace(":time", "now()"))
        with engine.connect() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (id, name, spec, state, next_number, seq, created_at,"
                    " updated_at) VALUES (1, 's', '{}', 'running', :n, 1, now(), now())"
                ),
                {"n": TRIALS},
            )
            for t in range(1, TRIALS + 1):
                conn.execute(
                    text(
                        "INSERT INTO trials (id, study_id, number, state, attempts, seq,"
                        " created_at) VALUES (:t, 1, :t, 'running', 1, 1, now())"
                    ),
                    {"t": t},
                )
            conn.commit()
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            steps = [0] * (TRIALS + 1)

            def block(n: int) -> float:
                """Backend CPU ms per insert over ``n`` inserts, each its own commit."""
                start = _backend_cpu_s(pid)
                for k in range(n):
                    t = 1 + k % TRIALS
                    points = _batch(steps[t], args.batch)
                    steps[t] += args.batch // 2
                    conn.execute(
                        insert,
                        {"trial_id": t, "study_id": 1, "attempt": 1, **_array_literals(points)},
                    )
                    conn.commit()
                return (_backend_cpu_s(pid) - start) / n * 1e3

            block(args.reports // 2)  # warm: plans cached, indexes past their first pages
            keyed, plain = [], []
            for _ in range(args.rounds):
                conn.execute(text(_ADD_KEY))
                conn.commit()
                keyed.append(block(args.reports))
                conn.execute(text(_DROP_KEY))
                conn.commit()
                plain.append(block(args.reports))
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(f"PostgreSQL backend CPU per {args.batch}-point insert, ms, {args.rounds} rounds:")
    print(f"  with the trial's foreign key:    {_row(keyed)}")
    print(f"  without it (migration 0015):     {_row(plain)}")
    print(f"  ratio of medians: {statistics.median(plain) / statistics.median(keyed):.2f}")


class _OldPoint(BaseModel):
    """The report body's point before this change (api/schemas.py at ef8b0ed)."""

    model_config = ConfigDict(extra="forbid")
    step: StrictInt = Field(ge=0, le=MAX_STEP)
    name: MetricName
    value: Number

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v}")
        return v


class _OldBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: list[_OldPoint] = Field(max_length=MAX_POINTS)
    attempt: StrictInt | None = Field(default=None, ge=1)


def run_body(args: argparse.Namespace) -> None:
    raw = json.dumps({"points": [p.__dict__ for p in _batch(0, args.batch)], "attempt": 1}).encode()
    old, new = TypeAdapter(_OldBody), TypeAdapter(MetricsBody)

    def before() -> list[MetricInput]:
        body = old.validate_python(json.loads(raw))
        return [MetricInput(p.step, p.name, float(p.value)) for p in body.points]

    def after() -> Any:
        return new.validate_python(json.loads(raw)).points

    assert [tuple(p.__dict__.values()) for p in after()] == [
        tuple(p.__dict__.values()) for p in before()
    ]
    loads, timed = [], {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, fn in (("before", before), ("after", after)):
            timed[label].append(timeit.timeit(fn, number=args.reports) / args.reports * 1e3)
        loads.append(
            timeit.timeit(lambda: json.loads(raw), number=args.reports) / args.reports * 1e3
        )
    print(f"server CPU per {args.batch}-point body, ms, {args.rounds} rounds:")
    print(f"  json.loads alone:                         {_row(loads)}")
    print(f"  before (BaseModel points, copied):        {_row(timed['before'])}")
    print(f"  after (api.schemas.PointIn, no copy):     {_row(timed['after'])}")
    ratio = statistics.median(timed["after"]) / statistics.median(timed["before"])
    print(f"  ratio of medians: {ratio:.2f}")


def _row(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) + f"   (median {statistics.median(values):.2f})"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    ins = sub.add_parser("insert", help="PostgreSQL CPU per point insert, with and without the key")
    ins.add_argument("--postgres", required=True, metavar="ADMIN_URL")
    ins.add_argument("--reports", type=int, default=100, help="inserts a block")
    body = sub.add_parser("body", help="server CPU per report body, old and new validation")
    body.add_argument("--reports", type=int, default=500, help="bodies a timing")
    for p in (ins, body):
        p.add_argument("--batch", type=int, default=330, help="points a report")
        p.add_argument("--rounds", type=int, default=4, help="alternations")
    args = ap.parse_args(argv)
    {"insert": run_insert, "body": run_body}[args.section](args)


if __name__ == "__main__":
    main()

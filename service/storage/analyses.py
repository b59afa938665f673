"""The dashboard's analyses at rest (the ``study_analyses`` table).

A fitted analysis of a study (its parameter importance, a contour) is kept under a key naming
what was asked (:func:`key`) with the study's ``seq`` it was asked at. While the study's
``seq`` is still that one, nothing the analysis reads has changed (``seq`` grows with every
change of the study or of a trial, metric points aside), so any server, one started later
included, answers it without reading the trials or fitting again. A study keeps its
``KEEP_PER_STUDY`` most recently stored analyses; deleting the study deletes them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from hpo.service.db import jsontext
from hpo.service.db.models import StudyAnalysis, utcnow
from hpo.service.storage.session import Transactions

# Bump when an analysis computes something else for the same trials (what is kept under an
# older version is then never read again, and pruned in time).
VERSION = 1
KEEP_PER_STUDY = 32


def key(kind: str, *options: Any) -> str:
    """The key of one analysis: its kind and options (objective, axes, grid size)."""
    text = repr((VERSION, kind, *options)).encode()
    return f"{kind}-{hashlib.blake2b(text, digest_size=16).hexdigest()}"


def get(storage: Transactions, study_id: int, name: str) -> tuple[int, Any] | None:
    """The analysis kept under ``name`` and the study ``seq`` it was asked at, or None.
    Raises DatabaseUnavailable."""
    with storage.read() as s:
        row = s.execute(
            select(StudyAnalysis.seq, StudyAnalysis.value).where(
                StudyAnalysis.study_id == study_id, StudyAnalysis.key == name
            )
        ).one_or_none()
    return None if row is None else (row.seq, jsontext.loads(row.value))


def put(storage: Transactions, study_id: int, name: str, seq: int, value: Any) -> None:
    """Keep ``value`` (JSON) under ``name`` as asked at ``seq``, unless something asked at a
    later ``seq`` is kept there already; then drop the study's analyses past its newest
    ``KEEP_PER_STUDY``. A study deleted meanwhile keeps nothing. Raises DatabaseUnavailable."""
    row = {
        "study_id": study_id,
        "key": name,
        "seq": seq,
        "value": json.dumps(value, separators=(",", ":")),
        "stored_at": utcnow(),
    }
    table = StudyAnalysis.__table__
    try:
        with storage.write() as s:
            insert = sqlite_insert if s.bind.dialect.name == "sqlite" else postgresql_insert
            stmt = insert(table).values(row)
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=[table.c.study_id, table.c.key],
                    set_={c: stmt.excluded[c] for c in ("seq", "value", "stored_at")},
                    where=table.c.seq <= stmt.excluded.seq,
                )
            )
            mine = table.c.study_id == study_id
            if s.scalar(select(func.count()).select_from(table).where(mine)) > KEEP_PER_STUDY:
                newest = (
                    select(table.c.key)
                    .where(mine)
                    .order_by(table.c.stored_at.desc(), table.c.key)
                    .limit(KEEP_PER_STUDY)
                )
                s.execute(delete(table).where(mine, table.c.key.not_in(newest)))
    except IntegrityError:  # the study was deleted while its analysis was fitted
        pass

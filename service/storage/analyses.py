"""The dashboard's analyses at rest (the ``study_analyses`` table).

A fitted analysis of a study (its parameter importance, a contour) is kept under a key naming
what was asked (:func:`key`) with the study's ``seq`` it was asked at. While the study's
``seq`` is still that one, nothing the analysis reads has changed (``seq`` grows with every
change of the study's spec or of one of its trials; metric points, user attributes and test
metrics move it not), so any server, one started later included, answers it without reading
the trials or fitting again (:func:`current`). A study keeps its ``KEEP_PER_STUDY`` newest
analyses (by the ``seq`` they were asked at); deleting the study deletes them.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from hpo.service.db import jsontext
from hpo.service.db.models import Study, StudyAnalysis, Trial, utcnow
from hpo.service.storage.session import Transactions

# Bump when an analysis computes something else for the same trials and spec, or answers in
# another shape (the versions of hpo and scikit-learn are part of every key as well, but an
# editable install keeps one version through every change): what was kept under another key
# is never read again, and goes once newer analyses of its study push it out, or with the
# study. A kept answer of another shape under the same key is fitted again (the routes check).
VERSION = 1
KEEP_PER_STUDY = 16
# On PostgreSQL, how long storing an analysis waits for a row lock (the study's row, which the
# insert's foreign-key check shares): the answer does not wait on a held row for longer.
LOCK_TIMEOUT_S = 1.0


@cache
def _versions() -> tuple[str, ...]:
    """The versions of the code that computes the analyses (read without importing it)."""
    found = []
    for package in ("hpo", "scikit-learn"):
        try:
            found.append(metadata.version(package))
        except metadata.PackageNotFoundError:
            found.append("")
    return tuple(found)


def key(kind: str, *options: Any) -> str:
    """The key of one analysis: its kind and options (objective, axes, grid size), and the
    versions of what computes it."""
    text = repr((VERSION, _versions(), kind, *options)).encode()
    return f"{kind}-{hashlib.blake2b(text, digest_size=16).hexdigest()}"


def current(storage: Transactions, study_id: int, name: str, seq: int) -> Any | None:
    """The analysis kept under ``name`` if it was asked at the study's ``seq``, else None.
    Raises DatabaseUnavailable."""
    return _value(storage, study_id, name, StudyAnalysis.seq == seq)


def last(storage: Transactions, study_id: int, name: str) -> Any | None:
    """The analysis kept under ``name``, whatever ``seq`` it was asked at, or None. Raises
    DatabaseUnavailable."""
    return _value(storage, study_id, name)


def _value(storage: Transactions, study_id: int, name: str, *where: Any) -> Any | None:
    mine = (StudyAnalysis.study_id == study_id, StudyAnalysis.key == name, *where)
    with storage.read() as s:
        text = s.scalar(select(StudyAnalysis.value).where(*mine))
    return None if text is None else jsontext.loads(text)


def put(storage: Transactions, study_id: int, name: str, seq: int, value: Any) -> None:
    """Keep ``value`` (JSON) under ``name`` as asked at ``seq``, unless something asked at a
    later ``seq`` is kept there already; then drop the study's analyses past its newest
    ``KEEP_PER_STUDY`` (two stores at once may each leave one more). A study deleted
    meanwhile keeps nothing. Raises DatabaseUnavailable (also "busy", when the study's row
    is held past ``LOCK_TIMEOUT_S`` on PostgreSQL)."""
    row = {
        "study_id": study_id,
        "key": name,
        "seq": seq,
        "value": json.dumps(value, separators=(",", ":")),
        "stored_at": utcnow(),
    }
    table = StudyAnalysis.__table__
    try:
        with storage.write(lock_timeout_s=LOCK_TIMEOUT_S) as s:
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
                    .order_by(table.c.seq.desc(), table.c.stored_at.desc(), table.c.key)
                    .limit(KEEP_PER_STUDY)
                )
                s.execute(delete(table).where(mine, table.c.key.not_in(newest)))
    except IntegrityError:  # the study was deleted while its analysis was fitted
        pass


def any_unkept_past(storage: Transactions, n: int, name: str) -> bool:
    """Whether some study with more than ``n`` complete trials has no analysis ``name`` kept
    for the study as it is now: its page will need a fit (the server then starts its analysis
    worker at once, so that its imports are done before the page asks). Raises
    DatabaseUnavailable."""
    kept_now = (
        select(StudyAnalysis.study_id)
        .join(Study, Study.id == StudyAnalysis.study_id)
        .where(StudyAnalysis.key == name, StudyAnalysis.seq == Study.seq)
    )
    stmt = (
        select(Trial.study_id)
        .where(Trial.state == "complete", Trial.study_id.not_in(kept_now))
        .group_by(Trial.study_id)
        .having(func.count() > n)
        .limit(1)
    )
    with storage.read() as s:
        return s.execute(stmt).first() is not None

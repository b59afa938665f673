"""Facts about the deployment a database belongs to (the ``meta`` table).

:func:`deployment_id` names the deployment: it is made once, at the first start on a fresh
database, and every later start (and every other server on the same database) reads the same
one. The Ray namespace and the dispatcher's name carry it, so two deployments that share a Ray
cluster never see each other's attempts.

:func:`get` and :func:`put` keep other facts by key: the scheduler's leader stores the cluster's
node snapshot (:mod:`hpo.service.placement`) here, so every replica serving the API can check a
new study against the nodes without talking to Ray.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from hpo.service.db.models import Meta
from hpo.service.storage.session import Transactions

DEPLOYMENT_ID = "deployment_id"
PREFLIGHT = "preflight"
EXECUTOR_FAILURE = "executor_failure"


def deployment_id(storage: Transactions) -> str:
    """This database's deployment id (12 hex digits), made and stored if it has none yet.
    Servers racing on a fresh database all return the one that was stored first.

    Raises DatabaseUnavailable when the database cannot be reached.
    """
    with storage.read() as s:
        row = s.get(Meta, DEPLOYMENT_ID)
        if row is not None:
            return row.value
    try:
        with storage.write() as s:
            s.execute(insert(Meta).values(key=DEPLOYMENT_ID, value=secrets.token_hex(6)))
    except IntegrityError:  # another server stored one first
        pass
    with storage.read() as s:
        return s.get(Meta, DEPLOYMENT_ID).value


def store_preflight(storage: Transactions, report: dict[str, Any] | None) -> None:
    """Replace the node preflight report (a JSON document the scheduler's server writes, that
    every server's ``/healthz`` reads); None removes it. Raises DatabaseUnavailable."""
    _put_json(storage, PREFLIGHT, report)


def preflight_report(storage: Transactions) -> dict[str, Any] | None:
    """The stored node preflight report, or None when there is none. Raises
    DatabaseUnavailable."""
    return _get_json(storage, PREFLIGHT)


def store_executor_failure(storage: Transactions, failure: dict[str, Any] | None) -> None:
    """Replace the scheduler's note that its executor (Ray) cannot be started or reached: a
    JSON document its server writes after each failed start, that every server's ``/healthz``
    reads; None removes it. Raises DatabaseUnavailable."""
    _put_json(storage, EXECUTOR_FAILURE, failure)


def executor_failure(storage: Transactions) -> dict[str, Any] | None:
    """The stored note of :func:`store_executor_failure`, or None. Raises
    DatabaseUnavailable."""
    return _get_json(storage, EXECUTOR_FAILURE)


def get(storage: Transactions, key: str) -> str | None:
    """The value stored under ``key``, or None. Raises DatabaseUnavailable."""
    with storage.read() as s:
        row = s.get(Meta, key)
        return None if row is None else row.value


def put(storage: Transactions, key: str, value: str | None) -> None:
    """Store ``value`` under ``key`` (None removes it); the last writer wins. Raises
    DatabaseUnavailable."""
    with storage.write() as s:
        row = s.get(Meta, key)
        if value is None:
            s.execute(delete(Meta).where(Meta.key == key))
        elif row is None:
            s.add(Meta(key=key, value=value))
        else:
            row.value = value


def _put_json(storage: Transactions, key: str, value: dict[str, Any] | None) -> None:
    put(storage, key, None if value is None else json.dumps(value))


def _get_json(storage: Transactions, key: str) -> dict[str, Any] | None:
    text = get(storage, key)
    return None if text is None else json.loads(text)

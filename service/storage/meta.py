"""Facts about the deployment a database belongs to (the ``meta`` table).

:func:`deployment_id` names the deployment: it is made once, at the first start on a fresh
database, and every later start (and every other server on the same database) reads the same
one. The Ray namespace and the dispatcher's name carry it, so two deployments that share a Ray
cluster never see each other's attempts.
"""

from __future__ import annotations

import secrets

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from hpo.service.db.models import Meta
from hpo.service.storage.session import Transactions

DEPLOYMENT_ID = "deployment_id"


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

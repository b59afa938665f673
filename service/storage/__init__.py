"""The storage: the only code that speaks SQL.

:class:`Storage` is the contract the API and the scheduler read through: one transaction per
call, records out, documented errors (every call may raise ``DatabaseUnavailable``). Workflows
that read and write in one transaction (``StudyService``: ask, tell, report, leases) open
``Storage.write()`` and use the per-table functions of the modules below, which take that
session:

- :mod:`.studies`: lookup and locking (``get(..., lock=True)``), creation, paging, counts, best.
- :mod:`.trials`: lookup and locking, creation (compare-and-set on the number), leases, paging.
- :mod:`.metrics`: storing and reading metric points; the pruner's history.
- :mod:`.events`: a trial's history lines.
- :mod:`.transitions`: ``set_trial_state`` / ``set_study_state``, the only writes of a state,
  each checked against the table in :mod:`hpo.service.states`.
- :mod:`.leases`: named leases fenced by an epoch (the one scheduler of a database) and the
  owners of running attempts.
- :mod:`.meta`: facts of the deployment (its id, made at the first start).
- :mod:`.records`: rows → records, and the stored spec.
- :mod:`.session`: transactions, and database failures → ``DatabaseUnavailable``.
"""

from hpo.service.storage import leases, meta
from hpo.service.storage.base import MAX_PAGE, Storage
from hpo.service.storage.records import parse_spec, spec_of
from hpo.service.storage.session import Transactions, unavailable

__all__ = [
    "MAX_PAGE",
    "Storage",
    "Transactions",
    "leases",
    "meta",
    "parse_spec",
    "spec_of",
    "unavailable",
]

"""SQL storage: SQLAlchemy 2 models, engine set-up and Alembic migrations."""

from hpo.service.db.engine import make_engine, upgrade_schema
from hpo.service.db.models import Base, MetricPoint, Study, Trial, TrialEvent, TrialParam

__all__ = [
    "Base",
    "MetricPoint",
    "Study",
    "Trial",
    "TrialEvent",
    "TrialParam",
    "make_engine",
    "upgrade_schema",
]

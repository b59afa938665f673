"""Trials keep their compute: worker-seconds of ended attempts and when the running one began

``budget.max_worker_seconds`` sums, over a study's trials, the worker-seconds of their ended
attempts (``worker_seconds``) and of the running one (ranks x time since
``attempt_started_at``).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(
            sa.Column("worker_seconds", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("attempt_started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    drop_columns("trials", "attempt_started_at", "worker_seconds")

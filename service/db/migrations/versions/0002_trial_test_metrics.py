"""trials.test_metrics: held-out test metrics of a study's best trial

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("test_metrics", sa.JSON(), nullable=True))


def downgrade() -> None:
    drop_columns("trials", "test_metrics")

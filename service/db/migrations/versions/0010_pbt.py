"""Population based training: why a trial paused (PBT names the trial it will copy) and its
parameter schedule over steps

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("pause_reason", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("schedule", sa.JSON(), nullable=True))


def downgrade() -> None:
    drop_columns("trials", "schedule", "pause_reason")

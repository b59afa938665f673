"""PBT: the steps a trial skipped by copying a trial further ahead, left out of its
``budget.max_steps`` charge (the trial it copied was charged for them)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(
            sa.Column("steps_copied", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    drop_columns("trials", "steps_copied")

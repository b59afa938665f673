"""Curves have their own cursor: metric points move ``curve_seq``, not ``seq``

``seq`` (study and trial) now moves only with a change of state, values, parameters or any
other field but the curves; ``curve_seq`` moves with every change, metric points included, so
pages polling a study whose trials stream keep getting 304 for the study and fetch only the
curves that grew.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("studies", "trials"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("curve_seq", sa.BigInteger(), nullable=False, server_default="0")
            )
        # Every change so far is in ``seq``: both cursors start there.
        op.execute(f"UPDATE {table} SET curve_seq = seq")
    op.create_index("ix_trials_study_curve_seq", "trials", ["study_id", "curve_seq"])


def downgrade() -> None:
    op.drop_index("ix_trials_study_curve_seq", table_name="trials")
    for table in ("trials", "studies"):
        drop_columns(table, "curve_seq")

"""Trials carry user attributes (Optuna's ``set_user_attr``): a JSON object per trial

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("user_attrs", sa.JSON(), nullable=True))


def downgrade() -> None:
    drop_columns("trials", "user_attrs")

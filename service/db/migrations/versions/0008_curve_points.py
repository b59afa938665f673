"""Learning curves at rest (``trial_curves``)

``trial_curves`` keeps each trial's metric downsampled to at most 30 buckets of steps (first,
last, lowest and highest point of each; :mod:`hpo.service.storage.curves`), so the dashboard's
overview of curves no longer reads every metric point. Back-filled here from the stored points.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trial_curves",
        sa.Column(
            "trial_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("trials.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column(
            "study_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("studies.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("shift", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("buckets", sa.Text(), nullable=True),
    )
    op.create_index("ix_trial_curves_study_id", "trial_curves", ["study_id"])
    from hpo.service.storage import curves

    curves.rebuild(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_trial_curves_study_id", table_name="trial_curves")
    op.drop_table("trial_curves")

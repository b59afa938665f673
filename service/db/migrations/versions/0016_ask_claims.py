"""Asks with an Idempotency-Key that claimed a waiting or promoted trial (``ask_claims``)

A key was stored only with the trial its ask created (``trials.ask_key``). An ask that
claimed a waiting trial or promoted a paused one, sent again after its answer was lost, found
no trial of its key and was answered another trial: the one it had claimed ran no client until
its lease ran out (a promoted trial's lease expiry then ended it).

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ask_claims",
        sa.Column(
            "study_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("studies.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("trial_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ask_claims")

"""Exactly once under faults: attempt tokens, owners, progress leases, idempotent asks and
metric points, and the scheduler lease

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import drop_columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        # sha256 of the current attempt's token: only that attempt may write to the trial.
        batch.add_column(sa.Column("attempt_token_hash", sa.String(64), nullable=True))
        # Attempts lost to the infrastructure: they do not count against max_retries.
        batch.add_column(
            sa.Column("infra_failures", sa.Integer(), nullable=False, server_default="0")
        )
        # The control plane (scheduler lease holder) that launched the running attempt.
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))
        # A running attempt must report a new step before this time (progress_timeout_s).
        batch.add_column(
            sa.Column("progress_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        # The Idempotency-Key of the ask that created the trial: a repeated ask gets it back.
        batch.add_column(sa.Column("ask_key", sa.String(200), nullable=True))
    # Unique indexes, not constraints: SQLite adds an index without rebuilding the table (a
    # rebuild would drop AUTOINCREMENT, and deleted ids could then come back).
    op.create_index("uq_trials_study_ask_key", "trials", ["study_id", "ask_key"], unique=True)

    # Points stored twice before this revision (re-sent batches) keep their first copy.
    op.execute(
        "DELETE FROM metric_points WHERE id NOT IN "
        "(SELECT MIN(id) FROM metric_points GROUP BY trial_id, name, step)"
    )
    with op.batch_alter_table("metric_points") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))
    op.create_index(
        "uq_metric_points_trial_attempt_name_step",
        "metric_points",
        ["trial_id", "attempt", "name", "step"],
        unique=True,
    )

    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("uq_metric_points_trial_attempt_name_step", table_name="metric_points")
    with op.batch_alter_table("metric_points") as batch:
        batch.drop_column("attempt")
    op.drop_index("uq_trials_study_ask_key", table_name="trials")
    drop_columns(
        "trials", "ask_key", "progress_expires_at", "owner", "infra_failures", "attempt_token_hash"
    )

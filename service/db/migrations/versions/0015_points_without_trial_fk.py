"""Metric points lose their trial's foreign key

On PostgreSQL the foreign key ran a check for every inserted point: a locking read of its
trial's row (``FOR KEY SHARE``) through the trials' primary key, 330 of them for a report of
330 points. Under 64 streaming trials that was about a fifth of PostgreSQL's CPU, and the
reads grew slower as the trials' rows, updated by every report, left dead versions in that
index. The trial's curves at rest (``trial_curves``) keep theirs: every report writes one
of its trial's curve rows, so a report of a trial deleted meanwhile still fails there, and
the points of a deleted study are deleted with it (``storage.studies.delete``), no longer
through the key's cascade. Points of no trial are deleted on the way down (the key's check
would refuse them).

On SQLite the table is rebuilt (SQLite cannot drop a constraint), in the one transaction
of the upgrade, as in 0013: about 6 s a million points on a 2-core machine.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import (
    autoincrement_counter,
    restore_autoincrement_counter,
)

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# The name of the trial foreign key in batch mode on SQLite, whose reflected constraints
# have no names.
_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_KWARGS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        for fk in sa.inspect(bind).get_foreign_keys("metric_points"):
            if fk["referred_table"] == "trials":
                op.drop_constraint(fk["name"], "metric_points", type_="foreignkey")
        return
    counter = autoincrement_counter(bind, "metric_points")
    with op.batch_alter_table(
        "metric_points", recreate="always", naming_convention=_NAMES, table_kwargs=_KWARGS
    ) as batch:
        batch.drop_constraint("fk_metric_points_trial_id_trials", type_="foreignkey")
    restore_autoincrement_counter(bind, "metric_points", counter)


def downgrade() -> None:
    bind = op.get_bind()
    op.execute("DELETE FROM metric_points WHERE trial_id NOT IN (SELECT id FROM trials)")
    if bind.dialect.name != "sqlite":
        op.create_foreign_key(
            "metric_points_trial_id_fkey",
            "metric_points",
            "trials",
            ["trial_id"],
            ["id"],
            ondelete="CASCADE",
        )
        return
    counter = autoincrement_counter(bind, "metric_points")
    with op.batch_alter_table("metric_points", recreate="always", table_kwargs=_KWARGS) as batch:
        batch.create_foreign_key(
            "fk_metric_points_trial_id_trials", "trials", ["trial_id"], ["id"], ondelete="CASCADE"
        )
    restore_autoincrement_counter(bind, "metric_points", counter)

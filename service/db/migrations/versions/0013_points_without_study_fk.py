"""Metric points and curves at rest keep their trial's foreign key only

``metric_points.study_id`` and ``trial_curves.study_id`` lose their foreign keys to
``studies``: the trial's foreign key already ties each row to its study (deleting a study
still deletes them, through its trials). On PostgreSQL each inserted row's check took a
``FOR KEY SHARE`` lock on the study's row; with the reports of a study's trials writing at
once, PostgreSQL records those shared locks as MultiXacts (3.2 a report in
``benchmarks/scale.py metrics``), which autovacuum must then freeze. On SQLite the tables are
rebuilt (SQLite cannot drop a constraint), in the one transaction of the upgrade: 2 million
points took 12 s on a 2-core machine, so expect about a minute at 10 million, and a WAL file
as large as the table. Rows whose trial is gone (only a tool that wrote with SQLite's foreign
keys off could leave them) are deleted first: the copy checks the trial's foreign key.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

from hpo.service.db.migrations.sqlite_tables import (
    autoincrement_counter,
    restore_autoincrement_counter,
)

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# What the study foreign key of each table is called in batch mode on SQLite, whose
# reflected constraints have no names.
_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_TABLES = {"metric_points": {"sqlite_autoincrement": True}, "trial_curves": {}}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        inspector = sa.inspect(bind)
        for table in _TABLES:
            for fk in inspector.get_foreign_keys(table):
                if fk["referred_table"] == "studies":
                    op.drop_constraint(fk["name"], table, type_="foreignkey")
        return
    for table, kwargs in _TABLES.items():
        sequence = autoincrement_counter(bind, table)
        op.execute(f"DELETE FROM {table} WHERE trial_id NOT IN (SELECT id FROM trials)")
        with op.batch_alter_table(
            table, recreate="always", naming_convention=_NAMES, table_kwargs=kwargs
        ) as batch:
            batch.drop_constraint(f"fk_{table}_study_id_studies", type_="foreignkey")
        restore_autoincrement_counter(bind, table, sequence)


def downgrade() -> None:
    bind = op.get_bind()
    for table, kwargs in _TABLES.items():
        if bind.dialect.name != "sqlite":
            op.create_foreign_key(
                f"{table}_study_id_fkey", table, "studies", ["study_id"], ["id"], ondelete="CASCADE"
            )
            continue
        sequence = autoincrement_counter(bind, table)
        with op.batch_alter_table(table, recreate="always", table_kwargs=kwargs) as batch:
            batch.create_foreign_key(
                f"fk_{table}_study_id_studies", "studies", ["study_id"], ["id"], ondelete="CASCADE"
            )
        restore_autoincrement_counter(bind, table, sequence)

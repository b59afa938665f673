"""What migrations that rebuild a SQLite table share.

SQLite cannot drop a constraint: Alembic's batch mode copies the table into a new one. The
copy starts the table's AUTOINCREMENT counter again from the highest id left, so the ids of
deleted rows would come back; these keep it across the copy.
"""

from __future__ import annotations

import sqlalchemy as sa


def autoincrement_counter(bind: sa.Connection, table: str) -> int | None:
    """The table's AUTOINCREMENT counter, or None when SQLite keeps none for it."""
    if not sa.inspect(bind).has_table("sqlite_sequence"):
        return None
    return bind.execute(
        sa.text("SELECT seq FROM sqlite_sequence WHERE name = :name"), {"name": table}
    ).scalar()


def restore_autoincrement_counter(bind: sa.Connection, table: str, counter: int | None) -> None:
    """Set the table's counter back to at least ``counter`` (what it was before the copy)."""
    if counter is None:
        return
    updated = bind.execute(
        sa.text("UPDATE sqlite_sequence SET seq = MAX(seq, :seq) WHERE name = :name"),
        {"seq": counter, "name": table},
    )
    if updated.rowcount == 0:
        bind.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:name, :seq)"),
            {"name": table, "seq": counter},
        )


def drop_columns(table: str, *columns: str) -> None:
    """Drop plain columns (no index, key or constraint on them) in place: SQLite 3.35 and
    later drop a column without copying its table, so the table keeps its AUTOINCREMENT
    and the rows that reference it stay (Alembic's batch mode copies the table, and its
    copy has no AUTOINCREMENT); an older SQLite gets the batch copy."""
    import sqlite3

    from alembic import op

    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.drop_column(column)
        return
    for column in columns:
        op.drop_column(table, column)

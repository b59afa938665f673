"""meta values may be long: the node preflight report is a JSON document

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("meta") as batch:
        batch.alter_column("value", type_=sa.Text(), existing_nullable=False)


def downgrade() -> None:
    # Values past 256 characters (a preflight report, a node snapshot) are notes the server
    # writes again; PostgreSQL would refuse to narrow the column while one is stored.
    op.execute(sa.text("DELETE FROM meta WHERE length(value) > 256"))
    with op.batch_alter_table("meta") as batch:
        batch.alter_column("value", type_=sa.String(256), existing_nullable=False)

"""slide and shard ids never reused; build leases; shard quarantine; session versions,
disabled users; login throttle

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 08:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # SQLite reuses the highest INTEGER PRIMARY KEY after a delete unless the table is declared
    # AUTOINCREMENT, which needs the table rebuilt (env.py turns foreign keys off while
    # migrating, so dropping the old table does not cascade into tiles). PostgreSQL's
    # sequences never reuse an id; the rebuild is a no-op there.
    is_sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table(
        "slides", recreate="always" if is_sqlite else "auto", table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        pass
    with op.batch_alter_table(
        "shards", recreate="always" if is_sqlite else "auto", table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=20), server_default="ok", nullable=False))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_version", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "build_leases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("index_dir", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_build_leases")),
        sa.UniqueConstraint("owner", name=op.f("uq_build_leases_owner")),
    )
    with op.batch_alter_table("build_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_build_leases_heartbeat_at"), ["heartbeat_at"], unique=False)
    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_login_throttle")),
    )


def downgrade() -> None:
    op.drop_table("login_throttle")
    with op.batch_alter_table("build_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_build_leases_heartbeat_at"))
    op.drop_table("build_leases")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("disabled")
        batch_op.drop_column("session_version")
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_column("error")
        batch_op.drop_column("status")

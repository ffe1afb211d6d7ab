"""encoders.spec: what loads the index's encoder again (search uses it when none is given)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 14:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # nullable: encoders recorded before this revision have no spec until the next
    # `indexer build` with them fills it in (engine.search.which_encoder)
    with op.batch_alter_table("encoders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spec", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("encoders", schema=None) as batch_op:
        batch_op.drop_column("spec")

"""Leases: which controller process runs each singleton (the rollout runner, the maintenance loop).

One row per lease: its holder (a process), the generation (raised each time another holder
takes it: the fencing token an action checks in its own transaction) and when it runs out, in
seconds since the epoch by the database's clock (controller.leases).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

INT: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("generation", INT, nullable=False),
        sa.Column("expires_at", REAL, nullable=False),
        sa.Column("acquired_at", REAL, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")

"""The order each device said its reported states and status in (controller.fleet).

Several ingest processes share the devices' messages (an MQTT shared subscription) and do not
keep one device's order, so a report or status is stored only when it is newer than the stored
one by the (session, seq) the agent numbers it with. ``status_received_at`` dates the stored
status as ``reported_received_at`` already dates the stored report.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

INT: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")

COLUMNS = (
    ("reported_session", INT),
    ("reported_seq", INT),
    ("status_session", INT),
    ("status_seq", INT),
    ("status_received_at", REAL),
)


def upgrade() -> None:
    # ALTER TABLE ADD COLUMN on both backends: a batch (copy and move) of SQLite's devices table
    # would break the foreign keys of every table that names a device.
    for name, kind in COLUMNS:
        op.add_column("devices", sa.Column(name, kind, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)

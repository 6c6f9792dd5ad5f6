"""The schema as it stood when migrations began: every table the controller keeps.

On a database made before migrations (SQLite, by an older controller) the tables already
exist: each missing table, column and index is added and nothing else is touched, so such
a database is adopted without losing a row.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# 64-bit integers (BIGINT on PostgreSQL); SQLite keeps INTEGER, which an autoincrement id needs.
INT: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Timestamps in seconds with a fraction: double precision (PostgreSQL's REAL is 4 bytes).
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")


def schema(dialect: str) -> sa.MetaData:
    """The baseline tables as ``dialect`` (sqlite or postgresql) holds them."""
    metadata = sa.MetaData()
    partitioned = dialect == "postgresql"
    by_arrival: dict[str, Any] = {"postgresql_partition_by": "RANGE (received_at)"} if partitioned else {}
    sa.Table(
        "models",
        metadata,
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("created_at", REAL, nullable=False),
    )
    sa.Table(
        "model_versions",
        metadata,
        sa.Column("name", sa.Text(), sa.ForeignKey("models.name")),
        sa.Column("version", sa.Text()),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("size", INT, nullable=False),
        sa.Column("format", sa.Text(), nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("outputs", sa.Text(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
    )
    sa.Table(
        "devices",
        metadata,
        sa.Column("device_id", sa.Text(), primary_key=True),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("online", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("status_at_ms", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("agent_version", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("last_seen", REAL),
        sa.Column("reported", sa.Text()),
        sa.Column("reported_at_ms", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("reported_received_at", REAL),
        sa.Column("desired_generation", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("desired", sa.LargeBinary()),
    )
    sa.Table(
        "rollouts",
        metadata,
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
    )
    sa.Table(
        "rollout_devices",
        metadata,
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.id")),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id")),
        sa.Column("generation", INT, nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    # Raw telemetry windows and device events: on PostgreSQL partitioned by day of arrival
    # (controller.partitions), so retention drops whole partitions. A partitioned table's keys
    # must hold the partition column, so there the primary key is (id, received_at) and a
    # resent window is recognised by controller.telemetry under a per-device lock instead of
    # by a unique index.
    sa.Table(
        "telemetry",
        metadata,
        sa.Column("id", INT, sa.Identity(), primary_key=True),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id"), nullable=False),
        sa.Column("received_at", REAL, nullable=False, primary_key=partitioned),
        sa.Column("seq", INT, nullable=False),
        sa.Column("window_start_ms", INT, nullable=False),
        sa.Column("window_end_ms", INT, nullable=False),
        sa.Column("system", sa.Text(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("outbox_dropped", INT, nullable=False),
        sa.Column("shadows", sa.Text(), nullable=False, server_default=sa.text("'[]'")),
        sa.Column("tenants", sa.Text(), nullable=False, server_default=sa.text("'[]'")),
        # The agent's outbox delivers at least once: a resent window is the same record.
        sa.Index("telemetry_once", "device_id", "seq", "window_start_ms", unique=not partitioned),
        sa.Index("telemetry_newest", "device_id", "window_end_ms", "id"),
        sa.Index("telemetry_received", "received_at"),
        sqlite_autoincrement=True,
        **by_arrival,
    )
    sa.Table(
        "events",
        metadata,
        sa.Column("id", INT, sa.Identity(), primary_key=True),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id"), nullable=False),
        sa.Column("received_at", REAL, nullable=False, primary_key=partitioned),
        sa.Column("at_ms", INT, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.Index("events_newest", "device_id", "at_ms", "id"),
        sa.Index("events_received", "received_at"),
        sqlite_autoincrement=True,
        **by_arrival,
    )
    # The rollout engine's state (one row per rollout), its members and its event log.
    sa.Table(
        "rollout_runs",
        metadata,
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("wave", INT, nullable=False, server_default=sa.text("-1")),
        sa.Column("soak_started_at", REAL),
        sa.Column("promoted", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("approved_wave", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("reason", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("updated_at", REAL, nullable=False),
        sa.Column("phase", sa.Text(), nullable=False, server_default=sa.text("'live'")),
        sa.Index("rollout_runs_state", "state"),
    )
    sa.Table(
        "rollout_members",
        metadata,
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.id")),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id")),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("wave", INT, nullable=False),
        sa.Column("wanted", sa.LargeBinary(), nullable=False),
        sa.Column("previous", sa.LargeBinary()),
        sa.Column("set_at", REAL),
        sa.Column("shadow_set_at", REAL),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
        sa.Index("rollout_members_device", "device_id", "tenant"),
    )
    sa.Table(
        "rollout_events",
        metadata,
        sa.Column("id", INT, sa.Identity(), primary_key=True),
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.id"), nullable=False),
        sa.Column("at", REAL, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("wave", INT, nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Index("rollout_events_rollout", "rollout_id", "id"),
        sqlite_autoincrement=True,
    )
    # Registry: lineage and stage of a version (immutable but for the stage), its artifact variants.
    sa.Table(
        "version_details",
        metadata,
        sa.Column("name", sa.Text()),
        sa.Column("version", sa.Text()),
        sa.Column("parent_version", sa.Text(), nullable=False),
        sa.Column("dataset_digest", sa.Text(), nullable=False),
        sa.Column("code_version", sa.Text(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("sensor_kind", sa.Text(), nullable=False),
        sa.Column("gate", REAL, nullable=False),
        sa.Column("calibration_digest", sa.Text(), nullable=False),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column("stage_changed_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
        sa.ForeignKeyConstraint(["name", "version"], ["model_versions.name", "model_versions.version"]),
    )
    sa.Table(
        "variants",
        metadata,
        sa.Column("name", sa.Text()),
        sa.Column("version", sa.Text()),
        sa.Column("variant", sa.Text()),
        sa.Column("format", sa.Text(), nullable=False),
        sa.Column("precision", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("progress", REAL, nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("size", INT, nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("outputs", sa.Text(), nullable=False),
        sa.Column("opset", INT, nullable=False),
        sa.Column("runtime", sa.Text(), nullable=False),
        sa.Column("runtime_version", sa.Text(), nullable=False),
        sa.Column("latency_ms", REAL),
        sa.Column("report", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("signature", sa.LargeBinary()),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", "variant"),
        sa.ForeignKeyConstraint(["name", "version"], ["model_versions.name", "model_versions.version"]),
    )
    # Device classes (firmware_profiles/*.toml as registered) and which class each device is.
    sa.Table(
        "profiles",
        metadata,
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
    )
    sa.Table(
        "device_profiles",
        metadata,
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id"), primary_key=True),
        sa.Column("profile_id", sa.Text(), sa.ForeignKey("profiles.id"), nullable=False),
    )
    # Which variant each device of a rollout was sent, or why it was sent nothing.
    sa.Table(
        "rollout_targets",
        metadata,
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.id")),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id")),
        sa.Column("variant", sa.Text(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("skipped", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    # Each model version's signature (controller.signature; inferred on upload, editable) and
    # the sample inputs it travels with: an artifact ("uploaded" or "synthesized" from the signature).
    sa.Table(
        "version_signatures",
        metadata,
        sa.Column("name", sa.Text()),
        sa.Column("version", sa.Text()),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("sample_digest", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("sample_size", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("sample_count", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("sample_origin", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("updated_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
        sa.ForeignKeyConstraint(["name", "version"], ["model_versions.name", "model_versions.version"]),
    )
    # Monitoring: telemetry rolled up per device, model version and time bucket.
    # Latency is the inference-weighted mean of the windows' p50/p95 (kept as sums) and the max p99.
    sa.Table(
        "telemetry_rollups",
        metadata,
        sa.Column("device_id", sa.Text()),
        sa.Column("tenant", sa.Text()),
        sa.Column("model_name", sa.Text()),
        sa.Column("model_version", sa.Text()),
        sa.Column("bucket_start_ms", INT),
        sa.Column("windows", INT, nullable=False),
        sa.Column("inference_count", INT, nullable=False),
        sa.Column("error_count", INT, nullable=False),
        sa.Column("latency_p50_sum", REAL, nullable=False),
        sa.Column("latency_p95_sum", REAL, nullable=False),
        sa.Column("latency_p99_max", REAL, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("model_name", "model_version", "bucket_start_ms", "device_id", "tenant"),
        sa.Index("telemetry_rollups_age", "bucket_start_ms"),
    )
    # Drift: each window's sketch, and each model version's baseline (spec = bin edges).
    sa.Table(
        "drift_sketches",
        metadata,
        sa.Column("id", INT, sa.Identity(), primary_key=True),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("window_start_ms", INT, nullable=False),
        sa.Column("window_end_ms", INT, nullable=False),
        sa.Column("received_at", REAL, nullable=False),
        sa.Column("samples", INT, nullable=False),
        # A serialised DriftSketch (older SQLite databases declare TEXT and hold the same bytes).
        sa.Column("sketch", sa.LargeBinary(), nullable=False),
        sa.Index("drift_sketches_version", "model_name", "model_version", "window_end_ms"),
        sa.Index("drift_sketches_device", "device_id", "received_at"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "drift_baselines",
        metadata,
        sa.Column("model_name", sa.Text()),
        sa.Column("model_version", sa.Text()),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("windows_needed", INT, nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("sketch", sa.Text()),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("model_name", "model_version"),
    )
    # Captured data sets (content-addressed files under DIR/datasets/) and their labels.
    sa.Table(
        "datasets",
        metadata,
        sa.Column("digest", sa.Text(), primary_key=True),
        sa.Column("size", INT, nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("policy_id", sa.Text(), nullable=False),
        sa.Column("start_ms", INT, nullable=False),
        sa.Column("end_ms", INT, nullable=False),
        sa.Column("samples", INT, nullable=False),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("labels", sa.Text()),
        sa.Column("labels_digest", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", REAL, nullable=False),
        sa.Index("datasets_model", "model_name", "model_version", "created_at"),
    )
    # Retraining: policies are versioned (a change adds a version); each run names the version that fired.
    sa.Table(
        "retraining_policies",
        metadata,
        sa.Column("name", sa.Text()),
        sa.Column("version", INT),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
    )
    sa.Table(
        "retraining_runs",
        metadata,
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("policy_name", sa.Text(), nullable=False),
        sa.Column("policy_version", INT, nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("fired", sa.Text(), nullable=False),
        sa.Column("datasets", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("attempts", INT, nullable=False),
        sa.Column("result_version", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
        sa.Index("retraining_runs_policy", "policy_name", "created_at"),
    )
    # What each tenant running a model captures for retraining (sent in the desired state).
    sa.Table(
        "capture_policies",
        metadata,
        sa.Column("model_name", sa.Text()),
        sa.Column("tenant", sa.Text()),
        sa.Column("version", INT, nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("model_name", "tenant"),
    )
    # Tenant apps the controller declares on each device (sent in its desired state).
    sa.Table(
        "device_tenants",
        metadata,
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id"), primary_key=True),
        sa.Column("tenants", sa.Text(), nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
    )
    # Per device and tenant totals of the tenant stats in telemetry (exported on /metrics).
    sa.Table(
        "tenant_counters",
        metadata,
        sa.Column("device_id", sa.Text()),
        sa.Column("tenant", sa.Text()),
        sa.Column("inferences", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("dropped", INT, nullable=False, server_default=sa.text("0")),
        sa.Column("errors", INT, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("device_id", "tenant"),
    )
    # What each device's agent could not deliver (its outbox's loss counts in telemetry), totalled
    # per device from the counts of its newest window (last_*): controller.outbox_losses.
    sa.Table(
        "outbox_losses",
        metadata,
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id"), primary_key=True),
        sa.Column("seq", INT, nullable=False),
        sa.Column("window_end_ms", INT, nullable=False),
        sa.Column("last_bound", INT, nullable=False),
        sa.Column("last_space", INT, nullable=False),
        sa.Column("last_unwritable", INT, nullable=False),
        sa.Column("dropped_at_bound", INT, nullable=False),
        sa.Column("dropped_for_space", INT, nullable=False),
        sa.Column("unwritable", INT, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
    )
    # Client certificates issued from the controller's CA, per device, and the devices revoked
    # (controller.revocation): a revoked device's certificates are on the CA's revocation list.
    sa.Table(
        "device_certificates",
        metadata,
        sa.Column("serial", sa.Text(), primary_key=True),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("issued_at", REAL, nullable=False),
        sa.Column("not_after", REAL, nullable=False),
        sa.Column("revoked_at", REAL),
        sa.Column("temporary", INT, nullable=False, server_default=sa.text("0")),
        sa.Index("device_certificates_device", "device_id"),
    )
    sa.Table(
        "device_revocations",
        metadata,
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id"), primary_key=True),
        sa.Column("revoked_at", REAL, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    # Messages refused or cut short (per topic kind and reason; per device for rate limits,
    # storage quotas and bytes served): controller.message_counters, exported on /metrics.
    sa.Table(
        "message_counters",
        metadata,
        sa.Column("counter", sa.Text()),
        sa.Column("device_id", sa.Text()),
        sa.Column("kind", sa.Text()),
        sa.Column("reason", sa.Text()),
        sa.Column("value", INT, nullable=False),
        sa.PrimaryKeyConstraint("counter", "device_id", "kind", "reason"),
    )
    # Operator accounts (controller.auth): tokens with a role (hash only), console sessions.
    sa.Table(
        "operator_tokens",
        metadata,
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.Text(), nullable=False, unique=True),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("expires_at", REAL),
        sa.Column("revoked_at", REAL),
    )
    sa.Table(
        "console_sessions",
        metadata,
        sa.Column("session_hash", sa.Text(), primary_key=True),
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("csrf", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("expires_at", REAL, nullable=False),
        sa.Index("console_sessions_token", "token_hash"),
    )
    # Every state-changing request (controller.audit): who, what, when, and its status.
    sa.Table(
        "audit_log",
        metadata,
        sa.Column("id", INT, sa.Identity(), primary_key=True),
        sa.Column("at", REAL, nullable=False),
        sa.Column("actor_id", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("via", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("route", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("status", INT, nullable=False),
        sa.Index("audit_log_at", "at"),
        sqlite_autoincrement=True,
    )
    # Device groups (controller.groups): static (its members listed) or dynamic (a saved query
    # over tags and profile, resolved when read); and maintenance windows (controller.maintenance)
    # of a group or of one device.
    sa.Table(
        "device_groups",
        metadata,
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.Column("updated_at", REAL, nullable=False),
    )
    sa.Table(
        "group_members",
        metadata,
        sa.Column("group_name", sa.Text(), sa.ForeignKey("device_groups.name", ondelete="CASCADE")),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id")),
        sa.PrimaryKeyConstraint("group_name", "device_id"),
    )
    sa.Table(
        "maintenance_windows",
        metadata,
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("group_name", sa.Text(), sa.ForeignKey("device_groups.name", ondelete="CASCADE")),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id")),
        sa.Column("cron", sa.Text(), nullable=False),
        sa.Column("duration_s", REAL, nullable=False),
        sa.Column("timezone", sa.Text(), nullable=False),
        sa.Column("created_at", REAL, nullable=False),
        sa.CheckConstraint("(group_name IS NULL) != (device_id IS NULL)"),
    )
    # Devices an operator sent a rollout's version again after their update failed, and the
    # desired generation that carried it (until the device reports on it, its old failure is stale).
    sa.Table(
        "rollout_retries",
        metadata,
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.id")),
        sa.Column("device_id", sa.Text(), sa.ForeignKey("devices.device_id")),
        sa.Column("generation", INT, nullable=False),
        sa.Column("at", REAL, nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )

    return metadata


def upgrade() -> None:
    bind = op.get_bind()
    metadata = schema(bind.dialect.name)
    existing = set(sa.inspect(bind).get_table_names())
    metadata.create_all(bind, checkfirst=True)
    for table in metadata.sorted_tables:
        if table.name not in existing:
            continue
        # A table from before migrations: the columns and indexes added to it since it was made.
        have = {c["name"] for c in sa.inspect(bind).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                op.add_column(table.name, column._copy())
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    schema(bind.dialect.name).drop_all(bind)

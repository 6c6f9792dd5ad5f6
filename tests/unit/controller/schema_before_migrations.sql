-- The controller's schema as the last controller without migrations created it (its Store's
-- SCHEMA), kept to test that such a database is adopted. Never edit: it is history.
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL REFERENCES models(name),
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    format TEXT NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    tags TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    status_at_ms INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '',
    last_seen REAL,
    reported TEXT,
    reported_at_ms INTEGER NOT NULL DEFAULT 0,
    reported_received_at REAL,
    desired_generation INTEGER NOT NULL DEFAULT 0,
    desired BLOB
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    tenant TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    generation INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    received_at REAL NOT NULL,
    seq INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    system TEXT NOT NULL,
    models TEXT NOT NULL,
    outbox_dropped INTEGER NOT NULL
);
-- The agent's outbox delivers at least once: a resent window is the same record.
CREATE UNIQUE INDEX IF NOT EXISTS telemetry_once ON telemetry (device_id, seq, window_start_ms);
CREATE INDEX IF NOT EXISTS telemetry_newest ON telemetry (device_id, window_end_ms, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    received_at REAL NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    attributes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_newest ON events (device_id, at_ms, id);
-- The rollout engine's state (one row per rollout), its members and its event log.
CREATE TABLE IF NOT EXISTS rollout_runs (
    rollout_id TEXT PRIMARY KEY REFERENCES rollouts(id),
    plan TEXT NOT NULL,
    state TEXT NOT NULL,
    wave INTEGER NOT NULL DEFAULT -1,
    soak_started_at REAL,
    promoted INTEGER NOT NULL DEFAULT 0,
    approved_wave INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_runs_state ON rollout_runs (state);
CREATE TABLE IF NOT EXISTS rollout_members (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    tenant TEXT NOT NULL,
    wave INTEGER NOT NULL,
    wanted BLOB NOT NULL,
    previous BLOB,
    set_at REAL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_members_device ON rollout_members (device_id, tenant);
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    wave INTEGER NOT NULL,
    device_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id);
-- Registry: lineage and stage of a version (immutable but for the stage), its artifact variants.
CREATE TABLE IF NOT EXISTS version_details (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    parent_version TEXT NOT NULL,
    dataset_digest TEXT NOT NULL,
    code_version TEXT NOT NULL,
    metrics TEXT NOT NULL,
    task TEXT NOT NULL,
    sensor_kind TEXT NOT NULL,
    gate REAL NOT NULL,
    calibration_digest TEXT NOT NULL,
    stage TEXT NOT NULL,
    stage_changed_at REAL NOT NULL,
    PRIMARY KEY (name, version),
    FOREIGN KEY (name, version) REFERENCES model_versions(name, version)
);
CREATE TABLE IF NOT EXISTS variants (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    variant TEXT NOT NULL,
    format TEXT NOT NULL,
    precision TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    opset INTEGER NOT NULL,
    runtime TEXT NOT NULL,
    runtime_version TEXT NOT NULL,
    latency_ms REAL,
    report TEXT NOT NULL,
    reason TEXT NOT NULL,
    signature BLOB,
    key_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, version, variant),
    FOREIGN KEY (name, version) REFERENCES model_versions(name, version)
);
-- Device classes (firmware_profiles/*.toml as registered) and which class each device is.
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS device_profiles (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    profile_id TEXT NOT NULL REFERENCES profiles(id)
);
-- Which variant each device of a rollout was sent, or why it was sent nothing.
CREATE TABLE IF NOT EXISTS rollout_targets (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    variant TEXT NOT NULL,
    digest TEXT NOT NULL,
    skipped TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
-- Each model version's signature (controller.signature; inferred on upload, editable) and
-- the sample inputs it travels with: an artifact ("uploaded" or "synthesized" from the signature).
CREATE TABLE IF NOT EXISTS version_signatures (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    signature TEXT NOT NULL,
    sample_digest TEXT NOT NULL DEFAULT '',
    sample_size INTEGER NOT NULL DEFAULT 0,
    sample_count INTEGER NOT NULL DEFAULT 0,
    sample_origin TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, version),
    FOREIGN KEY (name, version) REFERENCES model_versions(name, version)
);
-- Monitoring (issue 6): telemetry rolled up per device, model version and time bucket.
-- Latency is the inference-weighted mean of the windows' p50/p95 (kept as sums) and the max p99.
CREATE TABLE IF NOT EXISTS telemetry_rollups (
    device_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    bucket_start_ms INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    inference_count INTEGER NOT NULL,
    error_count INTEGER NOT NULL,
    latency_p50_sum REAL NOT NULL,
    latency_p95_sum REAL NOT NULL,
    latency_p99_max REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (model_name, model_version, bucket_start_ms, device_id, tenant)
);
CREATE INDEX IF NOT EXISTS telemetry_rollups_age ON telemetry_rollups (bucket_start_ms);
CREATE INDEX IF NOT EXISTS telemetry_received ON telemetry (received_at);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
-- Drift: each window's sketch, and each model version's baseline (spec = bin edges).
CREATE TABLE IF NOT EXISTS drift_sketches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    received_at REAL NOT NULL,
    samples INTEGER NOT NULL,
    sketch TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drift_sketches_version ON drift_sketches (model_name, model_version, window_end_ms);
-- A device's sketches count towards its telemetry quota (controller.device_quotas).
CREATE INDEX IF NOT EXISTS drift_sketches_device ON drift_sketches (device_id, received_at);
CREATE TABLE IF NOT EXISTS drift_baselines (
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    source TEXT NOT NULL,
    windows_needed INTEGER NOT NULL,
    spec TEXT NOT NULL,
    sketch TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (model_name, model_version)
);
-- Captured data sets (content-addressed files under DIR/datasets/) and their labels.
CREATE TABLE IF NOT EXISTS datasets (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    labels TEXT,
    labels_digest TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_model ON datasets (model_name, model_version, created_at);
-- Retraining: policies are versioned (a change adds a version); each run names the version that fired.
CREATE TABLE IF NOT EXISTS retraining_policies (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS retraining_runs (
    id TEXT PRIMARY KEY,
    policy_name TEXT NOT NULL,
    policy_version INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fired TEXT NOT NULL,
    datasets TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    result_version TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS retraining_runs_policy ON retraining_runs (policy_name, created_at);
-- What each tenant running a model captures for retraining (sent in the desired state).
CREATE TABLE IF NOT EXISTS capture_policies (
    model_name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (model_name, tenant)
);
-- Tenant apps the controller declares on each device (sent in its desired state).
CREATE TABLE IF NOT EXISTS device_tenants (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    tenants TEXT NOT NULL,
    updated_at REAL NOT NULL
);
-- Per device and tenant totals of the tenant stats in telemetry (exported on /metrics).
CREATE TABLE IF NOT EXISTS tenant_counters (
    device_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    inferences INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, tenant)
);
-- What each device's agent could not deliver (its outbox's loss counts in telemetry), totalled
-- per device from the counts of its newest window (last_*): controller.outbox_losses.
CREATE TABLE IF NOT EXISTS outbox_losses (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    seq INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    last_bound INTEGER NOT NULL,
    last_space INTEGER NOT NULL,
    last_unwritable INTEGER NOT NULL,
    dropped_at_bound INTEGER NOT NULL,
    dropped_for_space INTEGER NOT NULL,
    unwritable INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
-- Client certificates issued from the controller's CA, per device, and the devices revoked
-- (controller.revocation): a revoked device's certificates are on the CA's revocation list.
CREATE TABLE IF NOT EXISTS device_certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    revoked_at REAL,
    -- Issued by the controller to end a revoked device's session, and revoked right after.
    temporary INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS device_certificates_device ON device_certificates (device_id);
CREATE TABLE IF NOT EXISTS device_revocations (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    revoked_at REAL NOT NULL,
    reason TEXT NOT NULL
);
-- Messages refused or cut short (per topic kind and reason; per device for rate limits,
-- storage quotas and bytes served): controller.message_counters, exported on /metrics.
CREATE TABLE IF NOT EXISTS message_counters (
    counter TEXT NOT NULL,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (counter, device_id, kind, reason)
);
-- Operator accounts (controller.auth): tokens with a role (hash only), console sessions.
CREATE TABLE IF NOT EXISTS operator_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS console_sessions (
    session_hash TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS console_sessions_token ON console_sessions (token_hash);
-- Every state-changing request (controller.audit): who, what, when, and its status.
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    via TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    target TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
-- Device groups (controller.groups): static (its members listed) or dynamic (a saved query
-- over tags and profile, resolved when read); and maintenance windows (controller.maintenance)
-- of a group or of one device.
CREATE TABLE IF NOT EXISTS device_groups (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    query TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    group_name TEXT NOT NULL REFERENCES device_groups(name) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    PRIMARY KEY (group_name, device_id)
);
CREATE TABLE IF NOT EXISTS maintenance_windows (
    id TEXT PRIMARY KEY,
    group_name TEXT REFERENCES device_groups(name) ON DELETE CASCADE,
    device_id TEXT REFERENCES devices(device_id),
    cron TEXT NOT NULL,
    duration_s REAL NOT NULL,
    timezone TEXT NOT NULL,
    created_at REAL NOT NULL,
    CHECK ((group_name IS NULL) != (device_id IS NULL))
);
-- Devices an operator sent a rollout's version again after their update failed, and the
-- desired generation that carried it (until the device reports on it, its old failure is stale).
CREATE TABLE IF NOT EXISTS rollout_retries (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    generation INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);

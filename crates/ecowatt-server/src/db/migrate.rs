//! The schema and its migrations, applied in order on start. Each migration is
//! written once with `{pk}` standing for the dialect's auto-increment key, `{blob}` for
//! its binary type and `{json:column.field}` for a JSON text field; a statement that
//! starts with `{postgres}` runs on PostgreSQL only.

use sqlx::{Executor, Row};

use super::{Db, Dialect, StoreError, StoreResult};

/// `(version, statements)`; never edit a released migration, add one.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE devices (
    id {pk},
    name TEXT NOT NULL UNIQUE,
    device_key TEXT NOT NULL,
    key_version BIGINT NOT NULL,
    rated_w BIGINT NOT NULL,
    enabled BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_seen_ms BIGINT
);
CREATE TABLE tokens (
    id {pk},
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE TABLE audit_log (
    id {pk},
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE device_configs (
    device_id BIGINT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    desired_version BIGINT NOT NULL,
    desired TEXT NOT NULL,
    desired_ms BIGINT NOT NULL,
    reported_version BIGINT,
    reported TEXT,
    rejected TEXT,
    reported_ms BIGINT,
    legacy_served_version BIGINT NOT NULL DEFAULT 0,
    legacy_served_count BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE config_history (
    id {pk},
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    config TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    UNIQUE (device_id, version)
);
CREATE TABLE commands (
    id {pk},
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    parameters TEXT NOT NULL,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    delivered_ms BIGINT,
    first_delivered_ms BIGINT,
    delivery_count BIGINT NOT NULL DEFAULT 0,
    completed_ms BIGINT,
    executed_ms BIGINT,
    result_message TEXT,
    exception_code BIGINT,
    result_value BIGINT,
    confirmed_ms BIGINT
);
CREATE INDEX commands_by_device ON commands (device_id, status, id);
CREATE INDEX commands_by_expiry ON commands (status, expires_ms)
"#,
    ),
    (
        2,
        r#"
ALTER TABLE devices ADD COLUMN previous_key TEXT;
ALTER TABLE devices ADD COLUMN previous_key_version BIGINT;
ALTER TABLE devices ADD COLUMN replay_high BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN replay_bitmap BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN prev_replay_high BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN prev_replay_bitmap BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN down_counter BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN firmware TEXT;
CREATE TABLE security_events (
    id {pk},
    at_ms BIGINT NOT NULL,
    device TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX security_events_by_time ON security_events (at_ms)
"#,
    ),
    (
        3,
        r#"
ALTER TABLE devices ADD COLUMN dropped_total BIGINT NOT NULL DEFAULT 0;
CREATE TABLE telemetry_batches (
    id {pk},
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    sample_count BIGINT NOT NULL,
    first_ms BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    registers BIGINT NOT NULL,
    codec BIGINT NOT NULL,
    data {blob} NOT NULL,
    received_ms BIGINT NOT NULL,
    UNIQUE (device_id, first_seq, last_seq)
);
CREATE INDEX telemetry_by_time ON telemetry_batches (device_id, last_ms)
"#,
    ),
    (
        4,
        r#"
CREATE TABLE firmware (
    id {pk},
    version TEXT NOT NULL,
    target TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    security_counter BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    manifest TEXT NOT NULL,
    data {blob} NOT NULL,
    uploaded_ms BIGINT NOT NULL,
    uploaded_by TEXT NOT NULL,
    UNIQUE (version, target)
)
"#,
    ),
    (
        5,
        r#"
CREATE TABLE rollouts (
    id {pk},
    firmware_id BIGINT NOT NULL REFERENCES firmware(id),
    state TEXT NOT NULL,
    waves TEXT NOT NULL,
    current_wave BIGINT NOT NULL,
    failure_threshold_pct BIGINT NOT NULL,
    reason TEXT,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE rollout_devices (
    rollout_id BIGINT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    wave BIGINT NOT NULL,
    state TEXT NOT NULL,
    done BIGINT NOT NULL DEFAULT 0,
    total BIGINT NOT NULL DEFAULT 0,
    reason TEXT,
    token TEXT NOT NULL UNIQUE,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id, rollout_id)
"#,
    ),
    (
        6,
        // The expiry sweep's index covers only the commands it sweeps. As
        // (status, expires_ms) it also served `status = 'succeeded'`: the
        // ingest group's per-device count of unconfirmed writes ran on it in
        // the fleet bench (PostgreSQL's plan cached on the connection),
        // reading every succeeded command of the fleet for each device in
        // each group — a cost that grew with every command sent.
        r#"
DROP INDEX commands_by_expiry;
CREATE INDEX commands_by_expiry ON commands (expires_ms) WHERE status IN ('queued', 'delivered')
"#,
    ),
    (
        7,
        // Security events are tallies: refusals of one kind from one source
        // address within a minute, one row with a count (`security/refusals.rs`).
        // Retention deletes by `last_ms`, audit entries by `at_ms`.
        r#"
ALTER TABLE security_events ADD COLUMN source TEXT;
ALTER TABLE security_events ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
ALTER TABLE security_events ADD COLUMN last_ms BIGINT NOT NULL DEFAULT 0;
UPDATE security_events SET last_ms = at_ms;
DROP INDEX security_events_by_time;
CREATE INDEX security_events_by_time ON security_events (last_ms);
CREATE INDEX audit_by_time ON audit_log (at_ms)
"#,
    ),
    (
        8,
        // The highest `seq` stored per device: an upload starting at or below
        // it may repeat stored samples, and only those are looked up
        // (`telemetry/ingest.rs`), so a resent batch that grew stores only what it adds.
        r#"
ALTER TABLE devices ADD COLUMN stored_seq BIGINT NOT NULL DEFAULT 0;
UPDATE devices SET stored_seq = COALESCE((SELECT MAX(last_seq) FROM telemetry_batches b WHERE b.device_id = devices.id), 0)
"#,
    ),
    (
        9,
        // One row `/healthz` writes (at most once a second): a store that
        // cannot write (a full disk) is reported unhealthy.
        r#"
CREATE TABLE store_health (id BIGINT PRIMARY KEY, at_ms BIGINT NOT NULL)
"#,
    ),
    (
        10,
        // A command's action in typed columns: the rules that pick writes
        // to confirm match `op`, `register` and `value`, not JSON text.
        r#"
ALTER TABLE commands ADD COLUMN op TEXT;
ALTER TABLE commands ADD COLUMN register BIGINT;
ALTER TABLE commands ADD COLUMN value BIGINT;
UPDATE commands SET op = {json:action.op}, register = CAST({json:action.register} AS BIGINT), value = CAST({json:action.value} AS BIGINT);
ALTER TABLE commands DROP COLUMN action
"#,
    ),
    (
        11,
        // Grid-safe export control (`control/`): the installer's fail-safe
        // limit (NULL unset, -1 "no change", else %), what the device last
        // reported of its control (JSON; NULL: its firmware has none), its
        // default ramp rate (hundredths of % per second), a command's lease,
        // ramp and the curtailment it belongs to, tags for groups,
        // the episodes devices report, and curtailments of a group.
        r#"
ALTER TABLE devices ADD COLUMN failsafe BIGINT;
ALTER TABLE devices ADD COLUMN control_reported TEXT;
ALTER TABLE devices ADD COLUMN ramp_centi BIGINT;
ALTER TABLE commands ADD COLUMN lease_ms BIGINT;
ALTER TABLE commands ADD COLUMN ramp_centi BIGINT;
ALTER TABLE commands ADD COLUMN curtailment_id BIGINT;
CREATE INDEX commands_by_curtailment ON commands (curtailment_id) WHERE curtailment_id IS NOT NULL;
CREATE TABLE device_tags (
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag, device_id);
CREATE TABLE control_episodes (
    id {pk},
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    command_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    value BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    UNIQUE (device_id, command_id, kind, at_ms)
);
CREATE TABLE curtailments (
    id {pk},
    tag TEXT NOT NULL,
    percent BIGINT NOT NULL,
    lease_ms BIGINT,
    releases BIGINT,
    devices BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL
)
"#,
    ),
    (
        12,
        // Export-limit schedules (`control/plan.rs`): every version of a
        // device's schedule (its definition; NULL: cleared), the version the
        // device is to run, and commands that return a device to its
        // schedule (a curtailment's release; 1) rather than write their value.
        r#"
ALTER TABLE devices ADD COLUMN schedule_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN resume BIGINT NOT NULL DEFAULT 0;
CREATE TABLE schedules (
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    definition TEXT,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, version)
)
"#,
    ),
    (
        13,
        // Devices running the original firmware (`legacy/`): marked by an
        // operator, the last upload nonce accepted from each (the original
        // kept it in memory only), and the encoder state the server follows.
        r#"
ALTER TABLE devices ADD COLUMN legacy BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN legacy_nonce BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN legacy_state TEXT
"#,
    ),
    (
        14,
        // Rollouts whose image goes to each device encrypted under a key only
        // it can derive (`ecowatt_proto::delivery`).
        r#"
ALTER TABLE rollouts ADD COLUMN encrypted BIGINT NOT NULL DEFAULT 0
"#,
    ),
    (
        15,
        // Rollups written at ingest (telemetry/rollup.rs): energy and register
        // statistics per device and 5-minute, hour and day bucket; the site's
        // time zone (days); each device's newest stored sample and each
        // batch's first and last AC power (to integrate across uploads).
        r#"
ALTER TABLE devices ADD COLUMN timezone TEXT NOT NULL DEFAULT 'UTC';
ALTER TABLE devices ADD COLUMN tail_ms BIGINT;
ALTER TABLE devices ADD COLUMN tail_pac BIGINT;
ALTER TABLE telemetry_batches ADD COLUMN first_pac BIGINT;
ALTER TABLE telemetry_batches ADD COLUMN last_pac BIGINT;
CREATE INDEX telemetry_by_age ON telemetry_batches (received_ms);
CREATE TABLE telemetry_rollups (
    device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    level BIGINT NOT NULL,
    bucket_ms BIGINT NOT NULL,
    energy_wh DOUBLE PRECISION NOT NULL DEFAULT 0,
    covered_ms BIGINT NOT NULL DEFAULT 0,
    samples BIGINT NOT NULL DEFAULT 0,
    missing BIGINT NOT NULL DEFAULT 0,
    n0 BIGINT NOT NULL DEFAULT 0,
    min0 BIGINT,
    max0 BIGINT,
    sum0 BIGINT NOT NULL DEFAULT 0,
    n1 BIGINT NOT NULL DEFAULT 0,
    min1 BIGINT,
    max1 BIGINT,
    sum1 BIGINT NOT NULL DEFAULT 0,
    n2 BIGINT NOT NULL DEFAULT 0,
    min2 BIGINT,
    max2 BIGINT,
    sum2 BIGINT NOT NULL DEFAULT 0,
    n3 BIGINT NOT NULL DEFAULT 0,
    min3 BIGINT,
    max3 BIGINT,
    sum3 BIGINT NOT NULL DEFAULT 0,
    n4 BIGINT NOT NULL DEFAULT 0,
    min4 BIGINT,
    max4 BIGINT,
    sum4 BIGINT NOT NULL DEFAULT 0,
    n5 BIGINT NOT NULL DEFAULT 0,
    min5 BIGINT,
    max5 BIGINT,
    sum5 BIGINT NOT NULL DEFAULT 0,
    n6 BIGINT NOT NULL DEFAULT 0,
    min6 BIGINT,
    max6 BIGINT,
    sum6 BIGINT NOT NULL DEFAULT 0,
    n7 BIGINT NOT NULL DEFAULT 0,
    min7 BIGINT,
    max7 BIGINT,
    sum7 BIGINT NOT NULL DEFAULT 0,
    n8 BIGINT NOT NULL DEFAULT 0,
    min8 BIGINT,
    max8 BIGINT,
    sum8 BIGINT NOT NULL DEFAULT 0,
    n9 BIGINT NOT NULL DEFAULT 0,
    min9 BIGINT,
    max9 BIGINT,
    sum9 BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, level, bucket_ms)
);
CREATE INDEX telemetry_rollups_by_age ON telemetry_rollups (level, bucket_ms)
"#,
    ),
    (
        16,
        // Views for reading the rollups from outside (Grafana's PostgreSQL
        // data source, docs/grafana.md): one row per device and bucket, its
        // time as a timestamp, the device by name, energy in kWh and each
        // register's mean in engineering units; one view per level over
        // `rollups_all`. `{bucket_time}` and `{local_day}` are the
        // dialect's (see `statements`).
        r#"
CREATE VIEW rollups_all AS
SELECT {bucket_time} AS time,
    d.name AS device,
    r.level,
    d.timezone,
    r.energy_wh / 1000.0 AS energy_kwh,
    r.samples,
    r.missing,
    r.bucket_ms,
    r.min9 AS pac_min_w,
    r.max9 AS pac_max_w,
    CASE WHEN r.n0 > 0 THEN CAST(r.sum0 AS DOUBLE PRECISION) / 10 / r.n0 END AS vac1_v,
    CASE WHEN r.n1 > 0 THEN CAST(r.sum1 AS DOUBLE PRECISION) / 10 / r.n1 END AS iac1_a,
    CASE WHEN r.n2 > 0 THEN CAST(r.sum2 AS DOUBLE PRECISION) / 100 / r.n2 END AS fac1_hz,
    CASE WHEN r.n3 > 0 THEN CAST(r.sum3 AS DOUBLE PRECISION) / 10 / r.n3 END AS vpv1_v,
    CASE WHEN r.n4 > 0 THEN CAST(r.sum4 AS DOUBLE PRECISION) / 10 / r.n4 END AS vpv2_v,
    CASE WHEN r.n5 > 0 THEN CAST(r.sum5 AS DOUBLE PRECISION) / 10 / r.n5 END AS ipv1_a,
    CASE WHEN r.n6 > 0 THEN CAST(r.sum6 AS DOUBLE PRECISION) / 10 / r.n6 END AS ipv2_a,
    CASE WHEN r.n7 > 0 THEN CAST(r.sum7 AS DOUBLE PRECISION) / 10 / r.n7 END AS temp_c,
    CASE WHEN r.n8 > 0 THEN CAST(r.sum8 AS DOUBLE PRECISION) / r.n8 END AS export_limit_pct,
    CASE WHEN r.n9 > 0 THEN CAST(r.sum9 AS DOUBLE PRECISION) / r.n9 END AS pac_w
FROM telemetry_rollups r JOIN devices d ON d.id = r.device_id;
CREATE VIEW rollups_5m AS SELECT * FROM rollups_all WHERE level = 0;
CREATE VIEW rollups_1h AS SELECT * FROM rollups_all WHERE level = 1;
CREATE VIEW energy_daily AS SELECT {local_day} AS day, * FROM rollups_all WHERE level = 2
"#,
    ),
    (
        17,
        // PostgreSQL: raw telemetry partitioned by arrival time
        // (`received_ms`), so that retention drops whole partitions instead
        // of deleting rows (telemetry/partitions.rs makes them). Rows stored
        // before go to the default partition (retention deletes those row by
        // row). The key and the unique constraint carry the partition key. No
        // foreign key to `devices` (making or dropping a partition would lock
        // it, deadlocking with the ingest): deleting a device deletes its
        // batches itself.
        r#"
{postgres} ALTER TABLE telemetry_batches RENAME TO telemetry_batches_v16;
{postgres} ALTER INDEX telemetry_batches_pkey RENAME TO telemetry_batches_v16_pkey;
{postgres} ALTER INDEX telemetry_by_time RENAME TO telemetry_by_time_v16;
{postgres} ALTER INDEX telemetry_by_age RENAME TO telemetry_by_age_v16;
{postgres} CREATE TABLE telemetry_batches (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY,
    device_id BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    sample_count BIGINT NOT NULL,
    first_ms BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    registers BIGINT NOT NULL,
    codec BIGINT NOT NULL,
    data BYTEA NOT NULL,
    received_ms BIGINT NOT NULL,
    first_pac BIGINT,
    last_pac BIGINT,
    PRIMARY KEY (id, received_ms),
    UNIQUE (device_id, first_seq, last_seq, received_ms)
) PARTITION BY RANGE (received_ms);
{postgres} CREATE INDEX telemetry_by_time ON telemetry_batches (device_id, last_ms);
{postgres} CREATE INDEX telemetry_by_age ON telemetry_batches (received_ms);
{postgres} CREATE TABLE telemetry_batches_default PARTITION OF telemetry_batches DEFAULT;
{postgres} INSERT INTO telemetry_batches (id, device_id, first_seq, last_seq, sample_count, first_ms, last_ms, registers, codec, data, received_ms, first_pac, last_pac) OVERRIDING SYSTEM VALUE
    SELECT id, device_id, first_seq, last_seq, sample_count, first_ms, last_ms, registers, codec, data, received_ms, first_pac, last_pac FROM telemetry_batches_v16;
{postgres} SELECT setval(pg_get_serial_sequence('telemetry_batches', 'id'),
    (SELECT COALESCE(MAX(id), 0) + 1 FROM telemetry_batches), false);
{postgres} DROP TABLE telemetry_batches_v16
"#,
    ),
];

/// `{json:COLUMN.FIELD}`: the text of a JSON column's field, in the dialect.
fn json_fields(statement: &str, dialect: Dialect) -> String {
    let mut out = String::with_capacity(statement.len());
    let mut rest = statement;
    while let Some(start) = rest.find("{json:") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closed {json:...}") + start;
        let (column, field) = rest[start + 6..end].split_once('.').expect("{json:column.field}");
        out.push_str(&match dialect {
            Dialect::Sqlite => format!("json_extract({column}, '$.{field}')"),
            Dialect::Postgres => format!("({column}::json ->> '{field}')"),
        });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A migration's statements as `dialect` runs them: placeholders filled in,
/// `{postgres}` statements kept on PostgreSQL only.
pub fn statements(sql: &str, dialect: Dialect) -> Vec<String> {
    let (pk, blob) = match dialect {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
        Dialect::Postgres => ("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "BYTEA"),
    };
    // A rollup's start as the dialect's time, and a day rollup's local date:
    // exact on PostgreSQL (the device's zone); on SQLite, which knows no
    // zones, the UTC date of the day's 12th hour (right for every zone
    // within 12 hours of UTC).
    let (bucket_time, local_day) = match dialect {
        Dialect::Sqlite => (
            "datetime(bucket_ms / 1000, 'unixepoch')",
            "date((bucket_ms + 43200000) / 1000, 'unixepoch')",
        ),
        Dialect::Postgres => (
            "to_timestamp(bucket_ms / 1000.0)",
            "(to_timestamp(bucket_ms / 1000.0) AT TIME ZONE timezone)::date",
        ),
    };
    let mut out = Vec::new();
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let statement = match statement.strip_prefix("{postgres}") {
            Some(_) if dialect != Dialect::Postgres => continue,
            Some(rest) => rest,
            None => statement,
        };
        out.push(
            json_fields(statement, dialect)
                .replace("{pk}", pk)
                .replace("{blob}", blob)
                .replace("{bucket_time}", bucket_time)
                .replace("{local_day}", local_day),
        );
    }
    out
}

/// Applies the migrations not applied yet, in one transaction (several
/// servers starting at once on PostgreSQL migrate one after the other).
/// Returns whether the database was empty.
pub async fn run(db: &Db) -> StoreResult<bool> {
    let mut tx = db.write().await?;
    if db.dialect() == Dialect::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7426000)").execute(&mut *tx).await?;
    }
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
    )
    .await?;
    let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("version"))
        .collect::<Result<_, _>>()?;
    // A store a newer version migrated: this one would misread it.
    let known = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0);
    if let Some(newest) = applied.iter().copied().max().filter(|v| *v > known) {
        return Err(StoreError::Unusable(format!(
            "the store's schema is version {newest}, newer than this EcoWatt knows ({known}): \
             it was migrated by a newer release; run that release (or newer), or restore a backup \
             taken before the upgrade (docs/operations.md)"
        )));
    }
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        for statement in statements(sql, db.dialect()) {
            tx.execute(statement.as_str()).await?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
            .bind(*version)
            .bind(crate::now_ms())
            .execute(&mut *tx)
            .await?;
        tracing::info!(version, backend = db.backend(), "applied schema migration");
    }
    tx.commit().await?;
    Ok(applied.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_fields_read_in_each_dialect() {
        let sql = "SET op = {json:action.op}, v = {json:action.value}";
        assert_eq!(
            super::json_fields(sql, super::Dialect::Sqlite),
            "SET op = json_extract(action, '$.op'), v = json_extract(action, '$.value')"
        );
        assert_eq!(
            super::json_fields(sql, super::Dialect::Postgres),
            "SET op = (action::json ->> 'op'), v = (action::json ->> 'value')"
        );
    }
}

//! Telemetry at the edges: resent batches that grew, overlapping batches with
//! other values, and sample times outside the range the server keeps.

use axum::http::StatusCode;
use ecowatt_proto::codec::{self, Sample};
use ecowatt_proto::messages::{MessageType, TelemetryAck, TelemetryUpload};
use ecowatt_testkit::server::TempDb;

use crate::api::Client;
use crate::protocol::{Probe, error_code, post_to};

fn samples(seqs: std::ops::RangeInclusive<u64>, t0: u64, base: u16) -> Vec<Sample> {
    seqs.map(|i| Sample { seq: i, unix_ms: t0 + 5_000 * i, values: vec![base + i as u16, 100] })
        .collect()
}

/// An upload of `samples` (registers Vac1 and Pac, codec v1).
pub fn upload(samples: &[Sample]) -> TelemetryUpload {
    TelemetryUpload {
        first_seq: samples[0].seq,
        count: samples.len() as u16,
        dropped_total: 0,
        codec: codec::CODEC_V1,
        batch: codec::encode(0x0201, samples).unwrap(),
    }
}

/// Uploads; the acknowledged `seq`, or the status and error code.
pub async fn send(
    c: &Client,
    dev: &mut Probe,
    up: &TelemetryUpload,
) -> Result<u64, (StatusCode, String)> {
    let sealed = dev.raw(MessageType::TelemetryUpload, &up.encode());
    let (status, body) = post_to(&c.server.state, "/api/v1/device/telemetry", sealed).await;
    if status != StatusCode::OK {
        return Err((status, error_code(&body)));
    }
    let (_, plain) = dev.open(&body).unwrap();
    Ok(TelemetryAck::decode(&plain).unwrap().acked_through)
}

/// Vac1 of every sample of `device` the API reads back, in order.
async fn volts(c: &Client, device: &str) -> Vec<f64> {
    let path = format!("/api/v1/devices/{device}/telemetry?from_ms=0&registers=0");
    let data = c.ok("GET", &path, None).await;
    data["points"].as_array().unwrap().iter().map(|p| p["v"][0].as_f64().unwrap()).collect()
}

#[tokio::test]
async fn a_resent_batch_that_grew_stores_only_what_it_adds_on_both_backends() {
    for db in TempDb::each().await {
        let c = Client::start(&db, false).await;
        let mut dev = Probe::provision(&c, "d").await;
        let t0 = ecowatt_formats::time::now_ms() as u64 - 3_600_000;
        assert_eq!(send(&c, &mut dev, &upload(&samples(1..=5, t0, 2300))).await, Ok(5));
        // The acknowledgement was lost; the device resends with more samples.
        assert_eq!(send(&c, &mut dev, &upload(&samples(1..=8, t0, 2300))).await, Ok(8));
        // And again, exactly (a second lost acknowledgement).
        assert_eq!(send(&c, &mut dev, &upload(&samples(1..=8, t0, 2300))).await, Ok(8));
        // A batch overlapping stored samples with other values: the stored ones stand.
        assert_eq!(send(&c, &mut dev, &upload(&samples(6..=10, t0, 4000))).await, Ok(10));
        let v = c.ok("GET", "/api/v1/devices/d/completeness", None).await;
        assert_eq!(
            (v["received"].as_i64(), v["duplicates"].as_i64(), v["missing"].as_i64()),
            (Some(10), Some(0), Some(0)),
            "{}: {v}",
            db.backend()
        );
        let batches = c.server.state.telemetry.range("d", 0, i64::MAX).await.unwrap();
        let ranges: Vec<_> = batches.iter().map(|b| (b.first_seq, b.last_seq, b.count)).collect();
        assert_eq!(ranges, [(1, 5, 5), (6, 8, 3), (9, 10, 2)], "{}", db.backend());
        let volts = volts(&c, "d").await;
        assert_eq!(volts[5..8], [230.6, 230.7, 230.8], "the first stored values of 6..=8 stand");
        assert_eq!(volts[8..], [400.9, 401.0], "only 9 and 10 came from the overlapping batch");
        c.server.stop().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn the_ingest_takes_a_new_connection_when_postgresql_drops_the_one_it_keeps() {
    use sqlx::Connection;
    let Some(db) = TempDb::postgres().await else { return };
    let c = Client::start(&db, false).await;
    let mut dev = Probe::provision(&c, "d").await;
    let t0 = ecowatt_formats::time::now_ms() as u64 - 3_600_000;
    assert_eq!(send(&c, &mut dev, &upload(&samples(1..=5, t0, 2300))).await, Ok(5));
    // PostgreSQL ends every other session of the database (a restart, a
    // failover, an administrator): the ingest's kept connection among them.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!ended.is_empty());
    admin.close().await.unwrap();
    // The group that meets the dead connection fails (the device is told
    // `storage_unavailable` and keeps its samples); the next takes a new one.
    let batch = upload(&samples(6..=10, t0, 2300));
    assert_eq!(
        send(&c, &mut dev, &batch).await,
        Err((StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable".to_owned()))
    );
    assert_eq!(send(&c, &mut dev, &batch).await, Ok(10));
    let v = c.ok("GET", "/api/v1/devices/d/completeness", None).await;
    assert_eq!(v["received"], 10, "{v}");
    c.server.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn sample_times_outside_the_kept_range_are_refused_before_acknowledgement() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut dev = Probe::provision(&c, "d").await;
    let now = ecowatt_formats::time::now_ms() as u64;
    let cases: [(&str, Vec<Sample>); 5] = [
        ("1970: a clock never set", samples(1..=3, 10_000, 2300)),
        ("2019", samples(1..=3, 1_546_300_800_000, 2300)),
        ("two days ahead", samples(1..=3, now + 2 * 86_400_000, 2300)),
        (
            "at 2^63 (negative once stored)",
            vec![Sample { seq: 1, unix_ms: 1 << 63, values: vec![1, 2] }],
        ),
        (
            "a step back below 0 (the codec's deltas wrap)",
            vec![
                Sample { seq: 1, unix_ms: 1_000, values: vec![1, 2] },
                Sample { seq: 2, unix_ms: 1_000u64.wrapping_sub(5_000), values: vec![1, 2] },
            ],
        ),
    ];
    for (what, batch) in cases {
        assert_eq!(
            send(&c, &mut dev, &upload(&batch)).await,
            Err((StatusCode::UNPROCESSABLE_ENTITY, "sample_time_out_of_range".to_owned())),
            "{what}"
        );
    }
    let v = c.ok("GET", "/api/v1/devices/d/completeness", None).await;
    assert_eq!(v["received"], 0, "nothing refused was stored: {v}");
    // Within the range (an hour ago, and a clock a few hours fast): stored and shown.
    let ok = [samples(1..=2, now - 3_600_000, 2300), samples(3..=4, now + 3 * 3_600_000, 2300)];
    for batch in ok {
        assert!(send(&c, &mut dev, &upload(&batch)).await.is_ok());
    }
    let v = c.ok("GET", "/api/v1/devices/d/completeness", None).await;
    assert_eq!((v["received"].as_i64(), v["missing"].as_i64()), (Some(4), Some(0)));
    let data = c
        .ok(
            "GET",
            &format!("/api/v1/devices/d/telemetry?from_ms=0&to_ms={}", now + 86_400_000),
            None,
        )
        .await;
    assert_eq!(data["points"].as_array().unwrap().len(), 4, "everything acknowledged is visible");
    c.server.stop().await;
}

#[tokio::test]
async fn malformed_paths_queries_and_huge_ranges_get_json_errors() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    c.ok("POST", "/api/v1/devices", Some(serde_json::json!({"name": "d"}))).await;
    let cases = [
        ("/api/v1/commands/abc", "invalid_path"),
        ("/api/v1/devices/d/telemetry?from_ms=yesterday", "invalid_query"),
        ("/api/v1/devices/d/telemetry?max_points=-1", "invalid_query"),
        (
            "/api/v1/devices/d/telemetry?from_ms=-9223372036854775808&to_ms=9223372036854775807",
            "invalid_field",
        ),
        ("/api/v1/devices/d/completeness?to_ms=9223372036854775807", "invalid_field"),
    ];
    for (path, code) in cases {
        let (status, v) = c.call("GET", path, None).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{path}: {v}"
        );
    }
    c.server.stop().await;
}

#[tokio::test]
async fn averaged_points_lie_at_their_samples_times_not_at_a_buckets_middle() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut dev = Probe::provision(&c, "d").await;
    // Ten samples 5 s apart, an hour ago.
    let t0 = ecowatt_formats::time::now_ms() as u64 - 3_600_000;
    assert_eq!(send(&c, &mut dev, &upload(&samples(1..=10, t0, 2300))).await, Ok(10));
    let first = (t0 + 5_000) as i64;
    let last = (t0 + 50_000) as i64;
    // From 1970 to now, in two points: each bucket spans ~28 years, and its
    // middle lies decades away from any sample.
    let v =
        c.ok("GET", "/api/v1/devices/d/telemetry?from_ms=0&registers=0&max_points=2", None).await;
    assert_eq!(v["downsampled"], true, "{v}");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 1, "one bucket holds the data: {v}");
    let t = points[0]["t"].as_i64().unwrap();
    assert!((first..=last).contains(&t), "the point at {t} lies outside the data {first}..={last}");
    assert_eq!(t, (first + last) / 2, "the mean of the samples' times");
    assert_eq!(points[0]["v"][0], 230.55, "the mean of 230.1..=231.0: {v}");
    // `/latest` says when the next upload is due: an interval after the newest batch.
    let v = c.ok("GET", "/api/v1/devices/d/latest", None).await;
    let interval = v["upload_interval_ms"].as_i64().expect("the interval");
    assert_eq!(v["next_upload_due_ms"].as_i64(), Some(last + interval), "{v}");
    c.server.stop().await;
}

fn upload_v2(samples: &[Sample]) -> TelemetryUpload {
    TelemetryUpload {
        codec: codec::CODEC_V2,
        batch: codec::encode_as(codec::CODEC_V2, 0x0201, samples).unwrap(),
        ..upload(samples)
    }
}

#[tokio::test]
async fn v1_and_v2_batches_are_stored_as_sent_trimmed_in_their_own_version_and_read_alike() {
    for db in TempDb::each().await {
        let c = Client::start(&db, false).await;
        let mut dev = Probe::provision(&c, "d").await;
        let t0 = ecowatt_formats::time::now_ms() as u64 - 3_600_000;
        assert_eq!(send(&c, &mut dev, &upload(&samples(1..=5, t0, 2300))).await, Ok(5));
        assert_eq!(send(&c, &mut dev, &upload_v2(&samples(6..=10, t0, 2300))).await, Ok(10));
        // A v2 resend that grew: only 11..=12 are new, stored re-encoded in v2.
        assert_eq!(send(&c, &mut dev, &upload_v2(&samples(6..=12, t0, 2300))).await, Ok(12));
        let batches = c.server.state.telemetry.range("d", 0, i64::MAX).await.unwrap();
        let stored: Vec<_> = batches.iter().map(|b| (b.first_seq, b.last_seq, b.codec)).collect();
        assert_eq!(stored, [(1, 5, 1), (6, 10, 2), (11, 12, 2)], "{}", db.backend());
        assert_eq!(batches[2].data[0], codec::CODEC_V2);
        let volts = volts(&c, "d").await;
        let expected: Vec<f64> = (1..=12).map(|i| f64::from(2300 + i) / 10.0).collect();
        assert_eq!(volts, expected, "{}", db.backend());
        c.server.stop().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn a_codec_the_server_does_not_offer_is_refused_and_nothing_is_stored() {
    let db = TempDb::sqlite();
    let file = ecowatt_server::settings::SettingsFile {
        telemetry_codecs: Some(vec![1]),
        ..Default::default()
    };
    let c = Client::start_tuned(&db, file).await;
    let mut dev = Probe::provision(&c, "d").await;
    let t0 = ecowatt_formats::time::now_ms() as u64 - 3_600_000;
    let refused = send(&c, &mut dev, &upload_v2(&samples(1..=5, t0, 2300))).await;
    assert_eq!(refused, Err((StatusCode::UNPROCESSABLE_ENTITY, "codec_not_offered".into())));
    let mut unknown = upload(&samples(1..=5, t0, 2300));
    unknown.codec = 7;
    let refused = send(&c, &mut dev, &unknown).await;
    assert_eq!(refused, Err((StatusCode::UNPROCESSABLE_ENTITY, "codec_not_offered".into())));
    assert!(c.server.state.telemetry.range("d", 0, i64::MAX).await.unwrap().is_empty());
    // The same samples in v1 go through.
    assert_eq!(send(&c, &mut dev, &upload(&samples(1..=5, t0, 2300))).await, Ok(5));
    c.server.flush_security_events().await;
    let events = c.ok("GET", "/api/v1/security-events", None).await;
    assert!(events.to_string().contains("codec_not_offered"), "{events}");
    c.server.stop().await;
}

#[test]
fn telemetry_codecs_must_name_known_versions_and_include_v1() {
    use ecowatt_server::settings::{Settings, SettingsFile};
    let with = |v: Vec<u8>| {
        Settings::resolve(SettingsFile { telemetry_codecs: Some(v), ..Default::default() })
            .map(|s| s.codecs)
    };
    assert_eq!(with(vec![1, 2]), Ok(0b110));
    assert_eq!(with(vec![1]), Ok(0b10));
    assert!(with(vec![2]).unwrap_err().contains("must include 1"));
    assert!(with(vec![1, 3]).unwrap_err().contains("codec 3 unknown"));
    let default = Settings::resolve(SettingsFile::default()).unwrap();
    assert_eq!(default.codecs, ecowatt_proto::codec::SUPPORTED);
}

//! Energy from the rollups written at ingest: a known power profile over a
//! DST day, uploaded as a device would (with a gap in sampling, resends, a
//! retry that grew, and a batch arriving late), integrates to within 0.1 %
//! of its integral; the fleet view; raw-batch retention; bad requests.

use ecowatt_proto::codec::Sample;
use ecowatt_testkit::server::TempDb;
use serde_json::json;

use crate::api::Client;
use crate::protocol::Probe;
use crate::telemetry::{send, upload};

/// Europe/Berlin's 2026-03-29: 00:00 local is 23:00 UTC the day before; clocks
/// jump from 02:00 to 03:00, so the day has 23 hours.
const DAY_START: u64 = 1_774_738_800_000;
const DAY_MS: u64 = 23 * 3_600_000;
const STEP: u64 = 5_000;
/// No samples from 10:00 to 10:20 local (08:00 UTC): the inverter did not answer.
const GAP: (u64, u64) =
    (DAY_START + 10 * 3_600_000 - 3_600_000, DAY_START + 10 * 3_600_000 - 3_600_000 + 1_200_000);

/// AC power at `t`, W: a smooth day (never negative).
fn power(t: u64) -> f64 {
    let x = (t - DAY_START) as f64 / DAY_MS as f64;
    (4000.0 * (std::f64::consts::PI * x).sin()).max(0.0) + 150.0
}

/// The profile's samples: every 5 s from local midnight to the last step
/// before the next, except in the gap, with consecutive seqs.
fn profile() -> Vec<Sample> {
    let mut out = Vec::new();
    let mut t = DAY_START;
    while t < DAY_START + DAY_MS {
        if !(GAP.0 < t && t < GAP.1) {
            let seq = out.len() as u64 + 1;
            out.push(Sample { seq, unix_ms: t, values: vec![2300, power(t).round() as u16] });
        }
        t += STEP;
    }
    out
}

/// The integral of the profile, Wh, over the sampled time less the gap
/// (what was not sampled is not invented).
fn expected_wh(samples: &[Sample]) -> f64 {
    let (first, last) = (samples[0].unix_ms, samples.last().unwrap().unix_ms);
    let gap_from = samples.iter().rev().find(|s| s.unix_ms <= GAP.0).unwrap().unix_ms;
    let gap_to = samples.iter().find(|s| s.unix_ms >= GAP.1).unwrap().unix_ms;
    let integral = |a: u64, b: u64| {
        let mut sum = 0.0;
        let mut t = a;
        while t < b {
            let dt = 1000.min(b - t);
            sum += (power(t) + power(t + dt)) / 2.0 * dt as f64;
            t += dt;
        }
        sum / 3_600_000.0
    };
    integral(first, gap_from) + integral(gap_to, last)
}

#[tokio::test]
async fn the_energy_of_a_known_profile_over_a_dst_day_matches_its_integral_on_both_backends() {
    let samples = profile();
    let expected = expected_wh(&samples);
    let batches: Vec<&[Sample]> = samples.chunks(60).collect();
    for db in TempDb::each().await {
        // The day is months ago: keep its 5-minute rollups.
        let file = ecowatt_server::settings::SettingsFile {
            rollup_5m_retention_days: Some(0),
            ..Default::default()
        };
        let c = Client::start_tuned(&db, file).await;
        let mut dev = Probe::provision(&c, "roof").await;
        c.ok("PUT", "/api/v1/devices/roof/timezone", Some(json!({"timezone": "Europe/Berlin"})))
            .await;
        for (i, b) in batches.iter().enumerate() {
            match i {
                // Batch 11 arrives after batch 12 (a retry that crossed the next upload).
                11 => continue,
                12 => {
                    send(&c, &mut dev, &upload(b)).await.unwrap();
                    send(&c, &mut dev, &upload(batches[11])).await.unwrap();
                }
                // Resent as it was (its acknowledgement was lost).
                40 => {
                    send(&c, &mut dev, &upload(b)).await.unwrap();
                    send(&c, &mut dev, &upload(b)).await.unwrap();
                }
                // Sent half, then again whole (a retry that grew).
                70 => {
                    send(&c, &mut dev, &upload(&b[..30])).await.unwrap();
                    send(&c, &mut dev, &upload(b)).await.unwrap();
                }
                _ => {
                    send(&c, &mut dev, &upload(b)).await.unwrap();
                }
            }
        }
        let v =
            c.ok("GET", "/api/v1/devices/roof/energy?from=2026-03-29&to=2026-03-29", None).await;
        let got = v["total_kwh"].as_f64().unwrap() * 1000.0;
        let err = (got - expected).abs() / expected;
        assert!(
            err < 0.001,
            "{}: {got} Wh against {expected} Wh ({:.4} %)",
            db.backend(),
            err * 100.0
        );
        // And exactly the trapezoids of the samples as stored: every interval
        // once (one missed or doubled 5 s interval is ~6 Wh, under the 0.1 %).
        let exact: f64 = samples
            .windows(2)
            .filter(|w| w[1].unix_ms - w[0].unix_ms <= 600_000)
            .map(|w| {
                let (p0, p1) = (f64::from(w[0].values[1]), f64::from(w[1].values[1]));
                (p0 + p1) / 2.0 * (w[1].unix_ms - w[0].unix_ms) as f64 / 3_600_000.0
            })
            .sum();
        assert!((got - exact).abs() < 1e-6, "{}: {got} Wh against {exact} Wh", db.backend());
        let day = &v["periods"][0];
        assert_eq!(day["period"], "2026-03-29", "{v}");
        assert_eq!(day["samples"].as_u64(), Some(samples.len() as u64), "{v}");
        // The gap: 20 minutes, 239 samples of 5 s missing.
        assert_eq!(day["missing"].as_i64(), Some(239), "{v}");
        assert_eq!(v["periods"].as_array().unwrap().len(), 1, "one local day, 23 hours: {v}");
        // The 5-minute and hour rollups add up to the same.
        for level in ["5m", "1h"] {
            let path = format!(
                "/api/v1/devices/roof/rollups?level={level}&registers=Pac&from_ms={DAY_START}&to_ms={}",
                DAY_START + DAY_MS
            );
            let r = c.ok("GET", &path, None).await;
            let points = r["points"].as_array().unwrap();
            let sum: f64 = points.iter().map(|p| p["energy_wh"].as_f64().unwrap()).sum();
            assert!((sum - got).abs() < 1e-6 * got, "{level}: {sum} against {got}");
            // The gap leaves three 5-minute buckets with nothing in them (no row).
            let n = if level == "1h" { 23 } else { 23 * 12 - 3 };
            assert_eq!(points.len(), n, "{level}");
        }
        // A long range picks its level by itself; means in engineering units.
        let path = format!(
            "/api/v1/devices/roof/rollups?registers=Pac&from_ms={}&to_ms={}",
            DAY_START - 86_400_000 * 300,
            DAY_START + DAY_MS
        );
        let r = c.ok("GET", &path, None).await;
        // 301 days: hours (7,224 buckets), 8 to a point.
        assert_eq!((r["level"].as_str(), r["step_ms"].as_i64()), (Some("1h"), Some(8 * 3_600_000)));
        let points = r["points"].as_array().unwrap();
        assert!(points.len() <= 1000);
        // Merged by the database: the day's energy and samples in 3 points of 8 hours.
        assert_eq!(points.len(), 3, "{r}");
        let sum: f64 = points.iter().map(|p| p["energy_wh"].as_f64().unwrap()).sum();
        assert!((sum - got).abs() < 1e-6 * got, "{sum} against {got}");
        let n: i64 = points.iter().map(|p| p["samples"].as_i64().unwrap()).sum();
        assert_eq!(n, samples.len() as i64);
        let max = points.iter().map(|p| p["max"][0].as_f64().unwrap()).fold(0.0, f64::max);
        let top = samples.iter().map(|s| f64::from(s.values[1])).fold(0.0, f64::max);
        assert_eq!(max, top, "the maximum of the merged buckets");
        let mean = r["points"][0]["mean"][0].as_f64().unwrap();
        assert!((1000.0..4000.0).contains(&mean), "{r}");
        // Months and years sum the days.
        let m = c
            .ok(
                "GET",
                "/api/v1/devices/roof/energy?period=month&from=2026-01-01&to=2026-12-31",
                None,
            )
            .await;
        assert_eq!(m["periods"][0]["period"], "2026-03");
        assert!((m["total_kwh"].as_f64().unwrap() * 1000.0 - got).abs() < 1e-6);
        c.server.stop().await;
        db.cleanup().await;
    }
}

/// Day points are the site's local days, one each, across a DST change:
/// Europe/Berlin's 23-hour 2026-03-29 and the next day are two points (a
/// grouping by 24 hours put both in one).
#[tokio::test]
async fn daily_points_are_local_days_across_a_dst_change() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let mut dev = Probe::provision(&c, "roof").await;
    c.ok("PUT", "/api/v1/devices/roof/timezone", Some(json!({"timezone": "Europe/Berlin"}))).await;
    // A minute at noon local on each day (10:00 UTC on the 29th, CEST).
    for (k, day) in [DAY_START, DAY_START + DAY_MS].into_iter().enumerate() {
        let noon = day + 12 * 3_600_000;
        let s: Vec<Sample> = (0..12u64)
            .map(|i| Sample {
                seq: k as u64 * 12 + i + 1,
                unix_ms: noon + i * STEP,
                values: vec![2300, 1000],
            })
            .collect();
        send(&c, &mut dev, &upload(&s)).await.unwrap();
    }
    let path = format!(
        "/api/v1/devices/roof/rollups?level=1d&registers=Pac&from_ms={DAY_START}&to_ms={}",
        DAY_START + DAY_MS + 86_400_000 - 1
    );
    let r = c.ok("GET", &path, None).await;
    let t: Vec<i64> =
        r["points"].as_array().unwrap().iter().map(|p| p["t"].as_i64().unwrap()).collect();
    assert_eq!(t, [DAY_START as i64, (DAY_START + DAY_MS) as i64], "{r}");
    assert!(r["points"].as_array().unwrap().iter().all(|p| p["samples"] == 12), "{r}");
    c.server.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn bad_energy_requests_get_clear_errors() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    Probe::provision(&c, "roof").await;
    let cases = [
        ("/api/v1/devices/roof/energy?period=week", 400, "invalid_field"),
        ("/api/v1/devices/roof/energy?from=2026-03-02&to=2026-03-01", 400, "invalid_field"),
        ("/api/v1/devices/roof/energy?from=2026-3-x", 400, "invalid_field"),
        ("/api/v1/devices/roof/energy?from=2000-01-01&to=2026-01-01", 400, "invalid_field"),
        ("/api/v1/devices/nobody/energy", 404, "not_found"),
        ("/api/v1/devices/roof/rollups?max_points=0", 400, "invalid_field"),
        ("/api/v1/devices/roof/rollups?level=1w", 400, "invalid_field"),
        ("/api/v1/devices/roof/rollups?from_ms=10&to_ms=5", 400, "invalid_field"),
        ("/api/v1/devices/roof/rollups?to_ms=999999999999999999", 400, "invalid_field"),
        ("/api/v1/devices/roof/rollups?from_ms=-1", 400, "invalid_field"),
    ];
    for (path, status, code) in cases {
        let (s, body) = c.call("GET", path, None).await;
        assert_eq!(
            (s.as_u16(), body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    let (s, body) = c
        .call("PUT", "/api/v1/devices/roof/timezone", Some(json!({"timezone": "Mars/Olympus"})))
        .await;
    assert_eq!(s.as_u16(), 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("IANA"), "{body}");
    c.server.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn the_fleet_view_is_one_request_with_power_now_energy_today_and_groups() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let now = ecowatt_formats::time::now_ms() as u64;
    // Three sites producing alike, one at a tenth; all tagged.
    for (name, pac) in [("a", 3000u16), ("b", 3100), ("c", 2900), ("d", 300)] {
        let body = json!({"name": name, "tags": ["north"], "rated_power_w": 10000});
        let v = c.ok("POST", "/api/v1/devices", Some(body)).await;
        let mut dev = Probe::from_provisioning(&v["provisioning"]);
        let t0 = now - 60_000;
        let s: Vec<Sample> = (0..12u64)
            .map(|i| Sample { seq: i + 1, unix_ms: t0 + i * STEP, values: vec![2300, pac] })
            .collect();
        send(&c, &mut dev, &upload(&s)).await.unwrap();
    }
    let v = c.ok("GET", "/api/v1/fleet/energy", None).await;
    assert_eq!(v["devices"], 4);
    assert_eq!(v["online"], 4);
    assert_eq!(v["power_now_w"], 3000 + 3100 + 2900 + 300);
    let today = v["energy_today_kwh"].as_f64().unwrap();
    // 55 s at each power (unless the minute crossed UTC midnight).
    let want = (3000.0 + 3100.0 + 2900.0 + 300.0) * 55.0 / 3_600_000.0;
    assert!(today == 0.0 || (today - want).abs() < 1e-6, "{v}");
    assert_eq!(v["groups"][0]["tag"], "north");
    assert_eq!(v["groups"][0]["power_now_w"], 9300);
    // The dashboard's fleet page: one request, every device with its alarms.
    let f = c.ok("GET", "/api/v1/fleet", None).await;
    assert_eq!((f["devices"].as_i64(), f["online"].as_i64()), (Some(4), Some(4)), "{f}");
    assert_eq!(f["power_now_w"], 9300);
    let d = &f["rows"][3];
    assert_eq!(d["name"], "d");
    assert_eq!((d["power_w"].as_i64(), d["desired_version"].as_i64()), (Some(300), Some(1)), "{f}");
    assert_eq!((d["dropped"].as_i64(), d["failed_commands"].as_i64()), (Some(0), Some(0)));
    if today > 0.0 {
        assert_eq!(v["underperforming"]["devices"][0]["device"], "d", "{v}");
        assert_eq!(v["underperforming"]["devices"].as_array().unwrap().len(), 1);
    }
    c.server.stop().await;
    db.cleanup().await;
}

/// The samples a device's year of rollups counts.
async fn rollup_samples(c: &Client, device: &str) -> i64 {
    let path = format!("/api/v1/devices/{device}/energy?period=year&from=2020-01-01");
    let v = c.ok("GET", &path, None).await;
    v["periods"].as_array().unwrap().iter().map(|p| p["samples"].as_i64().unwrap()).sum()
}

#[tokio::test]
async fn retention_removes_exactly_the_raw_batches_received_before_the_limit_on_both_backends() {
    use ecowatt_server::telemetry::partitions::wanted;
    for db in TempDb::each().await {
        let b = db.backend();
        let c = Client::start(&db, false).await;
        let t = &c.server.state.telemetry;
        let mut dev = Probe::provision(&c, "roof").await;
        let now = ecowatt_formats::time::now_ms() as u64;
        // PostgreSQL: today's partition made before the uploads (the
        // server's sweep makes it too; whichever comes first).
        let day = 86_400_000;
        t.make_partitions(&wanted(now as i64, day, day)).await.unwrap();
        // Four batches received one after the other (samples of four days ago);
        // the limit falls between the second and the third.
        let mut cutoff = 0;
        for k in 0..4u64 {
            let t = now - (4 - k) * 86_400_000;
            let s: Vec<Sample> = (0..3u64)
                .map(|i| Sample {
                    seq: k * 3 + i + 1,
                    unix_ms: t + i * STEP,
                    values: vec![2300, 1000],
                })
                .collect();
            send(&c, &mut dev, &upload(&s)).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            if k == 1 {
                cutoff = ecowatt_formats::time::now_ms();
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        }
        let seqs = async || -> Vec<(i64, i64)> {
            let left = t.range("roof", 0, i64::MAX).await.unwrap();
            left.iter().map(|b| (b.first_seq, b.last_seq)).collect()
        };
        if b == "sqlite" {
            // Rows, oldest first, in chunks.
            assert_eq!(t.purge_raw(cutoff, 1).await.unwrap(), 1, "{b}: in chunks");
            assert_eq!(t.purge_raw(cutoff, 1000).await.unwrap(), 1);
            assert_eq!(t.purge_raw(cutoff, 1000).await.unwrap(), 0);
            assert_eq!(seqs().await, [(7, 9), (10, 12)], "{b}");
        } else {
            // Whole partitions: today's ends after the limit, so all four stay
            // (no row is deleted)...
            assert_eq!(t.drop_partitions(cutoff).await.unwrap(), 0, "{b}");
            assert_eq!(
                t.purge_raw(cutoff, 1000).await.unwrap(),
                0,
                "{b}: none in the default partition"
            );
            assert_eq!(seqs().await.len(), 4, "{b}");
            // ... until a limit past its end drops it whole.
            let tomorrow = (now as i64).div_euclid(day) * day + day;
            assert!(t.drop_partitions(tomorrow).await.unwrap() >= 1, "{b}");
            assert_eq!(seqs().await, [], "{b}");
        }
        // The rollups stay: every day still has its samples.
        assert_eq!(rollup_samples(&c, "roof").await, 12, "{b}");
        c.server.stop().await;
        db.cleanup().await;
    }
}

/// SQLite: under a retention limit the ingest groups delete the batches
/// past it themselves (oldest first, a few more than each group stores), so
/// that a busy server needs no separate sweep on its one writer.
#[tokio::test]
async fn sqlite_ingest_groups_delete_raw_batches_past_the_retention_limit() {
    let db = TempDb::sqlite();
    let c = Client::start(&db, false).await;
    let t = &c.server.state.telemetry;
    let ingest = c.server.state.store.ingest();
    let mut dev = Probe::provision(&c, "roof").await;
    let now = ecowatt_formats::time::now_ms() as u64 - 3_600_000;
    let batch = |k: u64| -> Vec<Sample> {
        (0..3u64)
            .map(|i| Sample {
                seq: k * 3 + i + 1,
                unix_ms: now + (k * 3 + i) * STEP,
                values: vec![2300, 1000],
            })
            .collect()
    };
    let seqs = async || -> Vec<(i64, i64)> {
        let left = t.range("roof", 0, i64::MAX).await.unwrap();
        left.iter().map(|b| (b.first_seq, b.last_seq)).collect()
    };
    // No limit: nothing goes.
    for k in 0..20 {
        send(&c, &mut dev, &upload(&batch(k))).await.unwrap();
    }
    assert_eq!(seqs().await.len(), 20);
    // A limit all twenty are past: each group deletes as many as it
    // stores plus 16, oldest first, never the batch it stores now.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    ingest.keep_raw(Some(std::time::Duration::from_millis(50)));
    send(&c, &mut dev, &upload(&batch(20))).await.unwrap();
    let left = seqs().await;
    assert_eq!(left.len(), 21 - 17, "{left:?}");
    assert_eq!(left[0], (52, 54), "the oldest went first: {left:?}");
    assert_eq!(left.last(), Some(&(61, 63)));
    assert_eq!(ingest.take_purged(), 17, "counted for the metrics");
    assert_eq!(ingest.take_purged(), 0);
    send(&c, &mut dev, &upload(&batch(21))).await.unwrap();
    let left = seqs().await;
    assert!(left.iter().all(|r| r.0 >= 61), "the rest went: {left:?}");
    assert_eq!(left.last(), Some(&(64, 66)), "not the new batch: {left:?}");
    // The rollups stay.
    assert_eq!(rollup_samples(&c, "roof").await, 66);
    c.server.stop().await;
    db.cleanup().await;
}

/// PostgreSQL's raw telemetry partitions: a batch goes to the partition of
/// its arrival time, or to the default partition when none holds it;
/// retention drops exactly the partitions that end by the limit, and
/// deletes exactly the default partition's rows received before it.
#[tokio::test]
async fn postgresql_retention_drops_whole_partitions_and_empties_the_default_one() {
    use sqlx::{Connection, Row};
    let Some(db) = TempDb::postgres().await else {
        eprintln!("skipped: no PostgreSQL (set ECOWATT_TEST_PG_URL)");
        return;
    };
    // No retention of its own: the rows below are from 2001.
    let file = ecowatt_server::settings::SettingsFile {
        telemetry_retention_days: Some(0.0),
        ..Default::default()
    };
    let c = Client::start_tuned(&db, file).await;
    let t = &c.server.state.telemetry;
    Probe::provision(&c, "roof").await;
    // The server's sweep made partitions for now and ahead.
    let now = ecowatt_formats::time::now_ms();
    let mut parts = t.partitions().await.unwrap();
    for _ in 0..50 {
        if parts.iter().any(|p| p.1 <= now && now < p.2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        parts = t.partitions().await.unwrap();
    }
    assert!(parts.iter().any(|p| p.1 <= now && now < p.2), "{parts:?}");
    // Two partitions of 10 s in 2001, and rows received in them, between
    // them and after them.
    let t0: i64 = 1_000_000_000_000;
    assert_eq!(
        t.make_partitions(&[(t0, t0 + 10_000), (t0 + 10_000, t0 + 20_000)]).await.unwrap(),
        2
    );
    assert_eq!(t.make_partitions(&[(t0, t0 + 10_000)]).await.unwrap(), 0, "made once");
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for (seq, received) in [(1, t0 - 5_000), (2, t0 + 1_000), (3, t0 + 12_000), (4, t0 + 25_000)] {
        sqlx::query(
            "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
             last_ms, registers, codec, data, received_ms) \
             SELECT id, $1, $1, 1, $2, $2, 512, 1, '\\x00'::bytea, $2 FROM devices WHERE name = 'roof'",
        )
        .bind(seq)
        .bind(received)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let where_is = async |conn: &mut sqlx::PgConnection| -> Vec<(i64, String)> {
        sqlx::query("SELECT first_seq, tableoid::regclass::text AS part FROM telemetry_batches ORDER BY first_seq")
            .fetch_all(conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("first_seq"), r.get("part")))
            .collect()
    };
    let p = |ms: i64| format!("telemetry_batches_p{ms}");
    let d = "telemetry_batches_default".to_owned();
    assert_eq!(
        where_is(&mut conn).await,
        [(1, d.clone()), (2, p(t0)), (3, p(t0 + 10_000)), (4, d.clone())]
    );
    // The limit at t0 + 15 s: the first partition ends before it, the second after.
    let limit = t0 + 15_000;
    assert_eq!(t.drop_partitions(limit).await.unwrap(), 1);
    assert_eq!(t.purge_raw(limit, 1000).await.unwrap(), 1, "the default partition's older row");
    assert_eq!(where_is(&mut conn).await, [(3, p(t0 + 10_000)), (4, d.clone())]);
    let names: Vec<String> = t.partitions().await.unwrap().into_iter().map(|p| p.0).collect();
    assert!(!names.contains(&p(t0)) && names.contains(&p(t0 + 10_000)), "{names:?}");
    conn.close().await.unwrap();
    c.server.stop().await;
    db.cleanup().await;
}

#[test]
fn retention_settings_are_checked() {
    use ecowatt_server::settings::{Settings, SettingsFile};
    let with = |days: Option<f64>| {
        Settings::resolve(SettingsFile { telemetry_retention_days: days, ..Default::default() })
            .map(|s| s.telemetry_retention)
    };
    assert_eq!(with(None).unwrap(), Some(std::time::Duration::from_secs(90 * 86_400)));
    assert_eq!(with(Some(0.0)).unwrap(), None);
    assert_eq!(with(Some(0.5)).unwrap(), Some(std::time::Duration::from_secs(43_200)));
    assert!(with(Some(-1.0)).unwrap_err().contains("telemetry_retention_days"));
}

/// The views Grafana reads (docs/grafana.md) say what the API says, on both
/// backends; on PostgreSQL every query of the ready dashboard
/// (docs/grafana/ecowatt-dashboard.json) runs as a role granted the views
/// and nothing else, which cannot read the devices' keys.
#[tokio::test]
async fn the_grafana_views_match_the_api_and_the_dashboard_runs_on_the_views_alone() {
    use sqlx::{Connection, Row};
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../../docs/grafana/ecowatt-dashboard.json"))
            .unwrap();
    sqlx::any::install_default_drivers();
    for db in TempDb::each().await {
        let b = db.backend();
        let c = Client::start(&db, false).await;
        let mut dev = Probe::provision(&c, "roof").await;
        c.ok("PUT", "/api/v1/devices/roof/timezone", Some(json!({"timezone": "Europe/Berlin"})))
            .await;
        // Two hours at 5 s, ending ten minutes ago.
        let now = ecowatt_formats::time::now_ms() as u64;
        let start = (now - 7_800_000) / STEP * STEP;
        let samples: Vec<Sample> = (0..1_440u64)
            .map(|i| Sample {
                seq: i + 1,
                unix_ms: start + i * STEP,
                values: vec![2300 + (i % 7) as u16, 1000 + (i % 600) as u16],
            })
            .collect();
        for chunk in samples.chunks(60) {
            send(&c, &mut dev, &upload(chunk)).await.unwrap();
        }
        let api = c.ok("GET", "/api/v1/devices/roof/energy?from=2026-01-01", None).await;
        let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        let days = sqlx::query(
            "SELECT CAST(day AS TEXT) AS day, energy_kwh, samples FROM energy_daily \
             WHERE device = 'roof' ORDER BY time",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let periods = api["periods"].as_array().unwrap();
        assert_eq!(days.len(), periods.len(), "{b}: {api}");
        for (row, p) in days.iter().zip(periods) {
            assert_eq!(row.get::<String, _>("day"), p["period"].as_str().unwrap(), "{b}");
            let kwh: f64 = row.get("energy_kwh");
            assert!((kwh - p["energy_kwh"].as_f64().unwrap()).abs() < 1e-9, "{b}: {kwh} {p}");
        }
        let hours = sqlx::query(
            "SELECT bucket_ms, samples, pac_w, vac1_v FROM rollups_1h WHERE device = 'roof' ORDER BY time",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let path = format!(
            "/api/v1/devices/roof/rollups?level=1h&registers=Pac,Vac1&from_ms={start}&to_ms={now}"
        );
        let r = c.ok("GET", &path, None).await;
        let points = r["points"].as_array().unwrap();
        assert_eq!(hours.len(), points.len(), "{b}: {r}");
        for (row, p) in hours.iter().zip(points) {
            assert_eq!(row.get::<i64, _>("bucket_ms"), p["t"].as_i64().unwrap(), "{b}");
            assert_eq!(row.get::<i64, _>("samples"), p["samples"].as_i64().unwrap(), "{b}");
            let (pac, vac): (f64, f64) = (row.get("pac_w"), row.get("vac1_v"));
            // The API rounds to a thousandth of the unit.
            assert!((pac - p["mean"][0].as_f64().unwrap()).abs() <= 0.0005, "{b}: {pac} {p}");
            assert!((vac - p["mean"][1].as_f64().unwrap()).abs() <= 0.0005, "{b}: {vac} {p}");
            assert!((230.0..231.0).contains(&vac), "{b}: volts, not tenths: {vac}");
        }
        let fives: i64 = sqlx::query("SELECT COUNT(*) AS n FROM rollups_5m WHERE device = 'roof'")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get("n");
        assert!((24..=25).contains(&fives), "{b}: two hours in 5-minute buckets: {fives}");
        conn.close().await.unwrap();
        if b == "postgres" {
            // The dashboard's default range: the last 7 days.
            dashboard_runs_as_a_grafana_role(&db.url, &dashboard, now - 7 * 86_400_000, now).await;
        }
        c.server.stop().await;
        db.cleanup().await;
    }
}

/// Every query of `dashboard` (panels and variables, Grafana's macros filled
/// in as Grafana would) runs as a role with only docs/grafana.md's grants;
/// the devices table stays closed to it.
async fn dashboard_runs_as_a_grafana_role(
    url: &str,
    dashboard: &serde_json::Value,
    from_ms: u64,
    to_ms: u64,
) {
    use sqlx::Connection;
    use sqlx::postgres::{PgConnectOptions, PgConnection};
    let database = url.rsplit('/').next().unwrap().to_owned();
    let role = format!("grafana_{database}");
    let mut admin = PgConnection::connect(url).await.unwrap();
    for grant in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT ON rollups_5m, rollups_1h, energy_daily TO {role}"),
    ] {
        sqlx::query(&grant).execute(&mut admin).await.unwrap();
    }
    let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().username(&role);
    let mut grafana = PgConnection::connect_with(&options).await.unwrap();
    let fill = |sql: &str| {
        sql.replace(
            "$__timeFilter(time)",
            &format!(
                "time BETWEEN to_timestamp({}) AND to_timestamp({})",
                from_ms / 1000,
                to_ms / 1000 + 1
            ),
        )
        .replace("$device", "'roof'")
    };
    let mut queries: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["query"].as_str().unwrap().to_owned())
        .collect();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            queries.push(t["rawSql"].as_str().unwrap().to_owned());
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    for q in &queries {
        let rows = sqlx::query(&fill(q))
            .fetch_all(&mut grafana)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        if q.contains("$__timeFilter") || q.contains("DISTINCT device") {
            assert!(!rows.is_empty(), "no rows: {q}");
        }
    }
    let keys = sqlx::query("SELECT device_key FROM devices").fetch_all(&mut grafana).await;
    assert!(
        keys.is_err_and(|e| e.to_string().contains("permission denied")),
        "the role reads the devices' keys"
    );
    grafana.close().await.unwrap();
    for drop in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        // The role owns nothing; its grants go with DROP OWNED.
        sqlx::query(&drop).execute(&mut admin).await.unwrap();
    }
    admin.close().await.unwrap();
}

/// `GET path` with the admin token: status, content type, body bytes.
async fn download(c: &Client, path: &str) -> (u16, String, bytes::Bytes) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .uri(path)
        .header("authorization", format!("Bearer {}", c.token))
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = ecowatt_server::api::app(c.server.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .map_or(String::new(), |v| v.to_str().unwrap().to_owned());
    (status, kind, resp.into_body().collect().await.unwrap().to_bytes())
}

/// Raw samples and rollups export as CSV and Parquet with every row, in
/// engineering units, on both backends; bad requests get clear errors.
#[tokio::test]
async fn samples_and_rollups_export_as_csv_and_parquet_with_every_row() {
    use arrow_array::{Array, Float64Array, Int64Array, TimestampMillisecondArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let read = |bytes: bytes::Bytes| -> Vec<arrow_array::RecordBatch> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
        reader.map(Result::unwrap).collect()
    };
    for db in TempDb::each().await {
        let b = db.backend();
        let c = Client::start(&db, false).await;
        let mut dev = Probe::provision(&c, "roof").await;
        let start = (ecowatt_formats::time::now_ms() as u64 - 3_600_000) / 300_000 * 300_000;
        let samples: Vec<Sample> = (0..240u64)
            .map(|i| Sample {
                seq: i + 1,
                unix_ms: start + i * STEP,
                values: vec![2300 + (i % 3) as u16, 500 + i as u16],
            })
            .collect();
        for chunk in samples.chunks(60) {
            send(&c, &mut dev, &upload(chunk)).await.unwrap();
        }
        let (from, to) = (start, start + 240 * STEP);
        // Samples as CSV: every one, in units.
        let (s, kind, body) =
            download(&c, &format!("/api/v1/devices/roof/export?from_ms={from}&to_ms={to}")).await;
        assert_eq!((s, kind.as_str()), (200, "text/csv; charset=utf-8"), "{b}");
        let csv = String::from_utf8(body.to_vec()).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "time,unix_ms,seq,Vac1_V,Iac1_A,Fac1_Hz,Vpv1_V,Vpv2_V,Ipv1_A,Ipv2_A,Temp_degC,Pow_pct,Pac_W"
        );
        assert_eq!(lines.len(), 241, "{b}: a header and every sample");
        assert!(lines[1].ends_with(",1,230,,,,,,,,,500"), "{b}: {}", lines[1]);
        // Samples as Parquet, two registers.
        let (s, kind, body) = download(
            &c,
            &format!("/api/v1/devices/roof/export?format=parquet&registers=Pac,Vac1&from_ms={from}&to_ms={to}"),
        )
        .await;
        assert_eq!((s, kind.as_str()), (200, "application/vnd.apache.parquet"), "{b}");
        let batches = read(body);
        let rows: usize = batches.iter().map(|x| x.num_rows()).sum();
        assert_eq!(rows, 240, "{b}");
        let first = &batches[0];
        let names: Vec<String> = first.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["time", "seq", "Pac_W", "Vac1_V"], "{b}");
        let time = first.column(0).as_any().downcast_ref::<TimestampMillisecondArray>().unwrap();
        assert_eq!(time.value(0), start as i64);
        let pac = first.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!((pac.value(0), pac.value(10)), (500.0, 510.0));
        let vac = first.column(3).as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(vac.value(1), 230.1);
        // Rollups at 5 minutes: four buckets of 60 samples, with the samples' energy.
        let (s, _, body) = download(
            &c,
            &format!("/api/v1/devices/roof/export?data=rollups&level=5m&format=parquet&registers=Pac&from_ms={from}&to_ms={to}"),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let batches = read(body);
        let x = &batches[0];
        assert_eq!(x.num_rows(), 4, "{b}");
        let energy = x.column(1).as_any().downcast_ref::<Float64Array>().unwrap();
        let n = x.column(3).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!((0..4).map(|i| n.value(i)).collect::<Vec<_>>(), [60; 4], "{b}");
        let exported: f64 = (0..energy.len()).map(|i| energy.value(i)).sum();
        let wh = samples
            .windows(2)
            .map(|w| (f64::from(w[0].values[1]) + f64::from(w[1].values[1])) / 2.0 * 5.0 / 3600.0)
            .sum::<f64>();
        assert!((exported - wh).abs() < 1e-6, "{b}: {exported} Wh against {wh}");
        let (s, _, body) = download(
            &c,
            &format!(
                "/api/v1/devices/roof/export?data=rollups&from_ms={from}&to_ms={to}&registers=Pac"
            ),
        )
        .await;
        let csv = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(s, 200);
        assert!(
            csv.starts_with(
                "time,unix_ms,energy_wh,covered_ms,samples,missing,Pac_mean_W,Pac_min_W,Pac_max_W\n"
            ),
            "{csv}"
        );
        // Bad requests: nothing but a clear error.
        let day = 86_400_000u64;
        for (path, status, field) in [
            ("/api/v1/devices/roof/export?format=xlsx".to_owned(), 400, "format"),
            ("/api/v1/devices/roof/export?data=events".to_owned(), 400, "data"),
            (format!("/api/v1/devices/roof/export?from_ms={to}&to_ms={from}"), 400, "from_ms"),
            (
                format!("/api/v1/devices/roof/export?from_ms={}&to_ms={to}", to - 8 * day),
                400,
                "to_ms",
            ),
            ("/api/v1/devices/roof/export?level=1h".to_owned(), 400, "level"),
            ("/api/v1/devices/roof/export?data=rollups&level=1w".to_owned(), 400, "level"),
            (
                format!(
                    "/api/v1/devices/roof/export?data=rollups&level=5m&from_ms={}&to_ms={to}",
                    to - 400 * day
                ),
                400,
                "to_ms",
            ),
            ("/api/v1/devices/roof/export?registers=Watts".to_owned(), 400, "registers"),
        ] {
            let (s, body) = c.call("GET", &path, None).await;
            assert_eq!(s.as_u16(), status, "{path}: {body}");
            assert_eq!(body["error"]["code"], "invalid_field", "{path}: {body}");
            assert_eq!(body["error"]["field"], field, "{path}: {body}");
        }
        let (s, body) = c.call("GET", "/api/v1/devices/nobody/export", None).await;
        assert_eq!((s.as_u16(), body["error"]["code"].as_str()), (404, Some("not_found")));
        c.server.stop().await;
        db.cleanup().await;
    }
}

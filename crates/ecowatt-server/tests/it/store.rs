//! The same store suite on every backend.

use ecowatt_server::commands::{Action, CommandRequest, CommandStatus};
use ecowatt_server::commands::{CommandFilter, CommandOutcome};
use ecowatt_server::config::Rejection;
use ecowatt_server::config::{ConfigPatch, DeviceConfig};
use ecowatt_server::db::StoreError;
use ecowatt_server::devices::{DeviceId, KeyLookup};
use ecowatt_server::operators::Role;
use ecowatt_server::protocol::Upload;
use ecowatt_server::store::Store;
use ecowatt_server::telemetry::StoredBatch;
use ecowatt_testkit::server::TempDb;
use std::collections::HashMap;

const T0: i64 = 1_800_000_000_000;
const KEY: &str = "00112233445566778899aabbccddeeff";

async fn each(test: impl AsyncFn(&Store, &str)) {
    for db in TempDb::each().await {
        let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{}: {e}", db.backend()));
        test(&store, db.backend()).await;
        store.close().await;
        db.cleanup().await;
    }
}

/// An upload of `batch` from a device that has dropped `dropped_total` samples.
fn upload(batch: &StoredBatch, dropped_total: i64) -> Upload {
    // Some batches here are stand-ins, not decodable: no rollups for them.
    let decoded = ecowatt_proto::codec::decode(&batch.data)
        .unwrap_or(ecowatt_proto::codec::Batch { registers: 0, samples: Vec::new() });
    Upload { batch: batch.clone(), decoded: decoded.into(), dropped_total, export_limit: None }
}

/// A one-sample batch with sequence number `seq`.
fn small_batch(seq: u64) -> StoredBatch {
    StoredBatch {
        first_seq: seq as i64,
        last_seq: seq as i64,
        count: 1,
        first_ms: T0,
        last_ms: T0,
        registers: 1,
        codec: 1,
        data: vec![1; 8],
    }
}

fn set_pct(p: i64) -> CommandRequest {
    CommandRequest::SetPowerPercentage { percentage: p }
}

#[tokio::test]
async fn devices_lifecycle() {
    each(async |s, b| {
        let d = ecowatt_server::registration::register(
            &s.devices(),
            "inv-1",
            8_000,
            KEY,
            "alice#1",
            T0,
        )
        .await
        .unwrap();
        assert_eq!(
            (d.name.as_str(), d.rated_power_w, d.enabled, d.key_version),
            ("inv-1", 8_000, true, 1),
            "{b}"
        );
        assert!(
            matches!(
                ecowatt_server::registration::register(&s.devices(), "inv-1", 8_000, KEY, "a", T0)
                    .await,
                Err(StoreError::Conflict(_))
            ),
            "{b}"
        );
        assert!(
            matches!(
                ecowatt_server::registration::register(
                    &s.devices(),
                    "bad name!",
                    8_000,
                    KEY,
                    "a",
                    T0
                )
                .await,
                Err(StoreError::Invalid(_))
            ),
            "{b}"
        );
        assert!(
            matches!(
                ecowatt_server::registration::register(&s.devices(), "x", 10, KEY, "a", T0).await,
                Err(StoreError::Invalid(_))
            ),
            "{b}"
        );
        ecowatt_server::registration::register(&s.devices(), "inv-0", 10_000, KEY, "alice#1", T0)
            .await
            .unwrap();
        let names: Vec<String> =
            s.devices().list().await.unwrap().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["inv-0", "inv-1"], "{b}");

        assert!(!s.devices().set_enabled("inv-1", false, "a", T0).await.unwrap().enabled);
        assert!(!s.devices().get("inv-1").await.unwrap().enabled, "{b}");
        let rotated = s
            .devices()
            .rotate_key("inv-1", "ffeeddccbbaa99887766554433221100", "a", T0)
            .await
            .unwrap();
        assert_eq!(rotated.key_version, 2, "{b}");
        let (_, key) = s.devices().with_key("inv-1").await.unwrap();
        assert_eq!(key, "ffeeddccbbaa99887766554433221100", "{b}");
        // Legacy devices' last-seen times are written in batches, never back.
        let hot = ecowatt_server::legacy::hot::Hot::new(s.db().clone());
        hot.seen("inv-1", T0 + 5);
        hot.seen("inv-1", T0 + 3);
        hot.flush_seen().await.unwrap();
        assert_eq!(s.devices().get("inv-1").await.unwrap().last_seen_ms, Some(T0 + 5), "{b}");
        hot.seen("inv-1", T0 + 4);
        hot.flush_seen().await.unwrap();
        assert_eq!(s.devices().get("inv-1").await.unwrap().last_seen_ms, Some(T0 + 5), "{b}");

        s.devices().delete("inv-1", "a", T0).await.unwrap();
        assert!(matches!(s.devices().get("inv-1").await, Err(StoreError::NotFound(_))), "{b}");
        assert!(
            matches!(s.devices().delete("inv-1", "a", T0).await, Err(StoreError::NotFound(_))),
            "{b}"
        );
        let actions: Vec<String> =
            s.operators().audit(None, 100).await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(
            actions,
            ["device.remove", "device.rotate_key", "device.disable", "device.add", "device.add"],
            "{b}: every change audited, newest first"
        );
    })
    .await;
}

#[tokio::test]
async fn tokens_and_audit_paging() {
    each(async |s, b| {
        assert_eq!(s.operators().count().await.unwrap(), 0);
        let t = s.operators().create("ci", Role::Viewer, "hash-1", "system", T0).await.unwrap();
        assert_eq!(
            s.operators().by_hash("hash-1").await.unwrap().unwrap().role,
            Role::Viewer,
            "{b}"
        );
        assert!(s.operators().by_hash("nope").await.unwrap().is_none());
        s.operators().revoke(t.id, "admin#1", T0 + 1).await.unwrap();
        assert!(
            s.operators().by_hash("hash-1").await.unwrap().is_none(),
            "{b}: revoked tokens stop working"
        );
        assert!(matches!(
            s.operators().revoke(t.id, "admin#1", T0).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.operators().list().await.unwrap()[0].revoked_ms, Some(T0 + 1));
        let page1 = s.operators().audit(None, 1).await.unwrap();
        let page2 = s.operators().audit(Some(page1[0].id), 1).await.unwrap();
        assert_eq!(
            (page1[0].action.as_str(), page2[0].action.as_str()),
            ("token.revoke", "token.create"),
            "{b}"
        );
        assert_eq!(page1[0].actor, "admin#1");
    })
    .await;
}

#[tokio::test]
async fn config_shadow_versions_validation_and_reports() {
    each(async |s, b| {
        ecowatt_server::registration::register(&s.devices(), "d", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        let c = s.configs().shadow("d").await.unwrap();
        assert_eq!(
            (c.desired_version, c.desired.clone(), c.reported_version),
            (1, DeviceConfig::default(), None),
            "{b}"
        );

        let patch = ConfigPatch {
            poll_interval_ms: Some(10_000),
            upload_interval_ms: Some(60_000),
            ..Default::default()
        };
        let c = s.configs().update("d", &patch, "op#2", T0 + 1).await.unwrap();
        assert_eq!(
            (c.desired_version, c.desired.poll_interval_ms, c.desired.upload_interval_ms),
            (2, 10_000, 60_000)
        );
        let bad = ConfigPatch { poll_interval_ms: Some(100), ..Default::default() };
        match s.configs().update("d", &bad, "op#2", T0 + 2).await {
            Err(StoreError::Invalid(i)) => assert_eq!(i.field, "poll_interval_ms"),
            other => panic!("{b}: {other:?}"),
        }
        assert_eq!(
            s.configs().shadow("d").await.unwrap().desired_version,
            2,
            "{b}: a refused change stores nothing"
        );
        let history = s.configs().history("d", 10).await.unwrap();
        assert_eq!(history.iter().map(|v| v.version).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(history[0].actor, "op#2");

        let rejected = [Rejection { field: "registers".into(), reason: "not supported".into() }];
        let c = s.configs().report("d", 2, &c.desired, &rejected, T0 + 3).await.unwrap();
        assert_eq!((c.reported_version, c.rejected.len()), (Some(2), 1), "{b}");
        assert!(matches!(
            s.configs().report("d", 3, &c.desired, &[], T0).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(s.configs().shadow("nope").await, Err(StoreError::NotFound(_))));
    })
    .await;
}

#[tokio::test]
async fn legacy_config_poll_repeats_a_change_then_counts_it_applied() {
    each(async |s, b| {
        ecowatt_server::registration::register(&s.devices(), "d", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        // A device nobody changed is told nothing (it keeps its own timers).
        let quiet = s.configs().legacy_poll("d", 1, T0).await.unwrap();
        assert!(!quiet.changed && !quiet.poll_changed && !quiet.upload_changed, "{b}");
        s.configs()
            .update(
                "d",
                &ConfigPatch { poll_interval_ms: Some(10_000), ..Default::default() },
                "a",
                T0,
            )
            .await
            .unwrap();
        let polls: Vec<(bool, bool, bool)> = {
            let mut v = vec![];
            for i in 0..5 {
                let c = s.configs().legacy_poll("d", 3, T0 + i).await.unwrap();
                v.push((c.changed, c.poll_changed, c.upload_changed));
            }
            v
        };
        let flagged = (true, true, false);
        let done = (false, false, false);
        assert_eq!(polls, [flagged, flagged, flagged, done, done], "{b}: repeated, per timer");
        assert_eq!(s.configs().shadow("d").await.unwrap().reported_version, Some(2));
        // The guide's default: flagged once, then reset.
        s.configs()
            .update(
                "d",
                &ConfigPatch { upload_interval_ms: Some(600_000), ..Default::default() },
                "a",
                T0,
            )
            .await
            .unwrap();
        let first = s.configs().legacy_poll("d", 1, T0 + 10).await.unwrap();
        assert_eq!(
            (first.changed, first.poll_changed, first.upload_changed),
            (true, false, true),
            "{b}"
        );
        assert_eq!(first.config.upload_interval_ms, 600_000);
        assert!(!s.configs().legacy_poll("d", 1, T0 + 11).await.unwrap().changed, "{b}");
        // A change undone before it was sent is no change.
        for poll in [20_000, 10_000] {
            let patch = ConfigPatch { poll_interval_ms: Some(poll), ..Default::default() };
            s.configs().update("d", &patch, "a", T0).await.unwrap();
        }
        assert!(!s.configs().legacy_poll("d", 1, T0 + 12).await.unwrap().changed, "{b}");
    })
    .await;
}

#[tokio::test]
async fn command_lifecycle() {
    each(async |s, b| {
        ecowatt_server::registration::register(&s.devices(), "d", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        ecowatt_server::registration::register(&s.devices(), "other", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        let r = set_pct(30);
        let c = s.commands().queue("d", &r, 60, "op#1", T0).await.unwrap();
        assert_eq!(
            (c.status, c.kind.as_str(), c.expires_ms),
            (CommandStatus::Queued, "set_power_percentage", T0 + 60_000)
        );
        assert_eq!(c.action, Action::Write { register: 8, value: 30 });

        // Delivered, not again right away, again after the redelivery window.
        let got = s.commands().deliver("d", 10_000, 10, T0 + 100).await.unwrap();
        assert_eq!(
            (got.len(), got[0].status, got[0].delivery_count),
            (1, CommandStatus::Delivered, 1),
            "{b}"
        );
        assert!(s.commands().deliver("d", 10_000, 10, T0 + 5_000).await.unwrap().is_empty());
        assert!(s.commands().deliver("other", 10_000, 10, T0 + 5_000).await.unwrap().is_empty());
        let again = s.commands().deliver("d", 10_000, 10, T0 + 10_100).await.unwrap();
        assert_eq!(again[0].delivery_count, 2, "{b}: delivered again until a result arrives");

        let ok = CommandOutcome {
            success: true,
            message: Some("ok".into()),
            exception_code: None,
            value: Some(30),
            executed_ms: Some(T0 + 10_200),
        };
        assert!(
            matches!(
                s.commands().record_result("other", c.id, &ok, T0).await,
                Err(StoreError::NotFound(_))
            ),
            "{b}"
        );
        // Each upload's answer says whether writes await confirmation.
        let d = s.devices().get("d").await.unwrap();
        let sent = std::sync::atomic::AtomicU64::new(0);
        let unconfirmed = async || {
            let c = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let b = small_batch(c);
            let up = s.protocol().upload(d.id, d.key_version, c, &upload(&b, 0), T0).await.unwrap();
            up.expect("accepted").unconfirmed
        };
        assert!(!unconfirmed().await, "{b}: nothing awaits confirmation yet");
        let done = s.commands().record_result("d", c.id, &ok, T0 + 10_300).await.unwrap();
        assert!(unconfirmed().await, "{b}: a succeeded write awaits a reading");
        assert_eq!(
            (done.status, done.result_value, done.completed_ms),
            (CommandStatus::Succeeded, Some(30), Some(T0 + 10_300))
        );
        let failed = CommandOutcome { success: false, ..ok.clone() };
        let same = s.commands().record_result("d", c.id, &failed, T0 + 20_000).await.unwrap();
        assert_eq!(
            (same.status, same.completed_ms),
            (CommandStatus::Succeeded, Some(T0 + 10_300)),
            "{b}: recorded once"
        );
        assert!(
            s.commands().deliver("d", 0, 10, T0 + 30_000).await.unwrap().is_empty(),
            "{b}: finished commands stay finished"
        );
        assert!(matches!(s.commands().cancel(c.id, "op", T0).await, Err(StoreError::Conflict(_))));

        // A reading with the value confirms it; another value does not.
        assert_eq!(s.commands().confirm(d.id, 8, 31, T0 + 40_000).await.unwrap(), 0);
        assert_eq!(s.commands().confirm(d.id, 8, 30, T0 + 40_000).await.unwrap(), 1, "{b}");
        assert_eq!(s.commands().get(c.id).await.unwrap().status, CommandStatus::Confirmed);
        assert!(!unconfirmed().await, "{b}: confirmed");
        // A succeeded read is never confirmed and does not count.
        let read = CommandRequest::ReadRegister { register_address: 9 };
        let rc = s.commands().queue("d", &read, 60, "op#1", T0).await.unwrap();
        s.commands().deliver("d", 0, 10, T0 + 40_100).await.unwrap();
        s.commands().record_result("d", rc.id, &ok, T0 + 40_200).await.unwrap();
        assert!(!unconfirmed().await, "{b}: reads await no confirmation");

        // Cancel, expiry.
        let c2 = s.commands().queue("d", &r, 60, "op#1", T0).await.unwrap();
        assert_eq!(
            s.commands().cancel(c2.id, "op#1", T0 + 1).await.unwrap().status,
            CommandStatus::Cancelled
        );
        let c3 = s.commands().queue("d", &r, 60, "op#1", T0).await.unwrap();
        assert_eq!(s.commands().expire(T0 + 59_999).await.unwrap(), 0);
        assert_eq!(s.commands().expire(T0 + 60_000).await.unwrap(), 1, "{b}");
        assert_eq!(s.commands().get(c3.id).await.unwrap().status, CommandStatus::Expired);
        assert!(c3.id > c2.id && c2.id > c.id, "{b}: ids increase");
    })
    .await;
}

#[tokio::test]
async fn filters_paging_and_statistics() {
    each(async |s, b| {
        ecowatt_server::registration::register(&s.devices(), "a", 10_000, KEY, "x", T0)
            .await
            .unwrap();
        ecowatt_server::registration::register(&s.devices(), "z", 10_000, KEY, "x", T0)
            .await
            .unwrap();
        let r = set_pct(50);
        let read = CommandRequest::ReadRegister { register_address: 9 };
        for i in 0..5 {
            s.commands().queue("a", &r, 60, "x", T0 + i).await.unwrap();
        }
        s.commands().queue("z", &read, 60, "x", T0).await.unwrap();
        let all =
            s.commands().list(&CommandFilter { limit: 100, ..Default::default() }).await.unwrap();
        assert_eq!(all.len(), 6, "{b}");
        let page = s
            .commands()
            .list(&CommandFilter { device: Some("a".into()), limit: 2, ..Default::default() })
            .await
            .unwrap();
        let next = s
            .commands()
            .list(&CommandFilter {
                device: Some("a".into()),
                limit: 2,
                before_id: Some(page[1].id),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            page[0].id > page[1].id && page[1].id > next[0].id,
            "{b}: newest first, pages continue"
        );
        let reads = s
            .commands()
            .list(&CommandFilter {
                kind: Some("read_register".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].device, "z");

        let d = s.commands().deliver("a", 30_000, 2, T0 + 1_000).await.unwrap();
        let ok = CommandOutcome {
            success: true,
            message: None,
            exception_code: None,
            value: Some(50),
            executed_ms: None,
        };
        s.commands().record_result("a", d[0].id, &ok, T0 + 2_000).await.unwrap();
        let bad = CommandOutcome {
            success: false,
            message: Some("exception 04".into()),
            exception_code: Some(4),
            value: None,
            executed_ms: None,
        };
        s.commands().record_result("a", d[1].id, &bad, T0 + 4_000).await.unwrap();
        let delivered = s
            .commands()
            .list(&CommandFilter {
                status: Some(CommandStatus::Failed),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(delivered[0].exception_code, Some(4), "{b}");

        let st = s.commands().stats(Some("a")).await.unwrap();
        assert_eq!(st.total_commands, 5, "{b}");
        assert_eq!(
            (st.by_status["succeeded"], st.by_status["failed"], st.by_status["queued"]),
            (1, 1, 3)
        );
        assert_eq!(st.success_rate, 50.0);
        assert_eq!(st.average_completion_ms, Some(2_999.5), "{b}: (2000 + 3999) / 2");
        assert_eq!(st.average_delivery_ms, Some(999.5), "{b}: (1000 + 999) / 2");
        assert_eq!(s.commands().stats(None).await.unwrap().total_commands, 6);
    })
    .await;
}

#[tokio::test]
async fn everything_survives_a_restart_and_ids_are_never_reused() {
    for db in TempDb::each().await {
        let b = db.backend();
        let s = Store::open(&db.url).await.unwrap();
        ecowatt_server::registration::register(&s.devices(), "d", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        let r = set_pct(40);
        let c1 = s.commands().queue("d", &r, 600, "a", T0).await.unwrap();
        s.configs()
            .update(
                "d",
                &ConfigPatch { poll_interval_ms: Some(7_000), ..Default::default() },
                "a",
                T0,
            )
            .await
            .unwrap();
        s.close().await;

        let s = Store::open(&db.url).await.unwrap();
        assert_eq!(s.commands().get(c1.id).await.unwrap().status, CommandStatus::Queued, "{b}");
        assert_eq!(s.configs().shadow("d").await.unwrap().desired.poll_interval_ms, 7_000);
        // Remove the device (and so its commands), then queue again: a new id.
        s.devices().delete("d", "a", T0).await.unwrap();
        ecowatt_server::registration::register(&s.devices(), "d", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        s.close().await;
        let s = Store::open(&db.url).await.unwrap();
        let c2 = s.commands().queue("d", &r, 600, "a", T0).await.unwrap();
        assert!(c2.id > c1.id, "{b}: id {} reused after {}", c2.id, c1.id);
        s.close().await;
        db.cleanup().await;
    }
}

/// For every device, two tasks race to send counters 1..=`n` with `send`, one
/// ascending and one descending (so each counter's second send is a replay).
/// Returns how often each (device, counter) was accepted and each device's
/// answer counters; only `disabled` may be refused as disabled.
async fn race<F, Fut>(
    s: &std::sync::Arc<Store>,
    ids: &[DeviceId],
    n: u64,
    send: F,
    disabled: DeviceId,
    backend: &str,
) -> (HashMap<(DeviceId, u64), u32>, HashMap<DeviceId, Vec<u64>>)
where
    F: Fn(std::sync::Arc<Store>, DeviceId, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, ecowatt_server::protocol::SyncRefusal>> + Send,
{
    use ecowatt_server::protocol::SyncRefusal;
    let mut tasks = Vec::new();
    for &id in ids {
        for ascending in [true, false] {
            let (s, send) = (s.clone(), send.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for c in 1..=n {
                    let c = if ascending { c } else { n + 1 - c };
                    out.push((id, c, send(s.clone(), id, c).await));
                }
                out
            }));
        }
    }
    let (mut seen, mut downs) = (HashMap::new(), HashMap::<DeviceId, Vec<u64>>::new());
    for t in tasks {
        for (id, c, r) in t.await.unwrap() {
            match r {
                Ok(down) => {
                    *seen.entry((id, c)).or_default() += 1;
                    downs.entry(id).or_default().push(down);
                }
                Err(SyncRefusal::Replay(_)) => {}
                Err(SyncRefusal::Disabled) => assert_eq!(id, disabled, "{backend}"),
                Err(SyncRefusal::StaleKey) => panic!("{backend}: no key was rotated"),
            }
        }
    }
    (seen, downs)
}

/// Uploads from many devices at once (SQLite writes them in groups): each
/// counter is accepted once, replays and a disabled device are refused, every
/// accepted batch is stored once, and answer counters are distinct per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_are_checked_one_by_one_and_stored_once() {
    use std::sync::Arc;
    each(async |s: &Store, backend: &str| {
        let s = Arc::new(s.clone());
        let mut ids = Vec::new();
        for i in 0..12 {
            ids.push(
                ecowatt_server::registration::register(
                    &s.devices(),
                    &format!("u{i}"),
                    10_000,
                    KEY,
                    "t",
                    T0,
                )
                .await
                .unwrap()
                .id,
            );
        }
        s.devices().set_enabled("u11", false, "t", T0).await.unwrap();
        let batch = |seq: i64| StoredBatch {
            first_seq: seq,
            last_seq: seq,
            count: 1,
            first_ms: T0 + seq,
            last_ms: T0 + seq,
            registers: 1,
            codec: 1,
            data: vec![seq as u8; 40],
        };
        // Every device sends counters 1..=25 twice (the second time a replay),
        // from two tasks racing each other.
        let upload = move |s: Arc<Store>, id, c: u64| async move {
            let b = batch(c as i64);
            let up = s.protocol().upload(id, 1, c, &upload(&b, c as i64), T0).await.unwrap();
            up.map(|a| a.down_counter)
        };
        let (seen, mut accepted) = race(&s, &ids, 25, upload, ids[11], backend).await;
        assert!(!accepted.contains_key(&ids[11]), "{backend}: a disabled device stores nothing");
        for (i, &id) in ids[..11].iter().enumerate() {
            let mut downs = accepted.remove(&id).unwrap_or_default();
            downs.sort_unstable();
            downs.dedup();
            assert_eq!(downs.len(), 25, "{backend}: device {i}: each counter accepted once");
            for c in 1..=25 {
                assert_eq!(seen.get(&(id, c)), Some(&1), "{backend}: device {i} counter {c}");
            }
            let stored = s.telemetry().range(&format!("u{i}"), 0, i64::MAX).await.unwrap();
            assert_eq!(stored.len(), 25, "{backend}: device {i}: every batch stored once");
            assert_eq!(
                s.telemetry().dropped_total(&format!("u{i}")).await.unwrap(),
                25,
                "{backend}"
            );
        }
    })
    .await;
}

/// Quiet long polls (nothing to record or deliver) are admitted through the
/// same group commit as uploads: racing syncs, uploads and their replays,
/// every counter is accepted once whichever kind carried it. A sync that has
/// news (a command, a new desired config, a changed report) still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_syncs_share_the_window_with_uploads_and_never_hide_news() {
    use ecowatt_server::protocol::{SyncRefusal, SyncReport};
    use std::sync::Arc;
    let report = |counter: u64, applied: Option<(i64, DeviceConfig)>| SyncReport {
        key_version: 1,
        counter,
        applied,
        rejected: vec![],
        results: vec![],
        firmware: None,
        ota: None,
        control: None,
        schedule: None,
    };
    each(async |s: &Store, backend: &str| {
        let s = Arc::new(s.clone());
        let mut ids = Vec::new();
        for i in 0..6 {
            let name = format!("q{i}");
            ids.push(
                ecowatt_server::registration::register(&s.devices(), &name, 10_000, KEY, "t", T0)
                    .await
                    .unwrap()
                    .id,
            );
            s.configs().report(&name, 1, &DeviceConfig::default(), &[], T0).await.unwrap();
        }
        s.devices().set_enabled("q5", false, "t", T0).await.unwrap();
        // Every third counter is a quiet sync, the rest are uploads.
        let send = move |s: Arc<Store>, id, c: u64| async move {
            if c % 3 == 0 {
                let d = s.protocol().sync(id, &report(c, None), true, 0, T0).await.unwrap();
                d.map(|d| {
                    assert!(d.commands.is_empty() && d.config.is_none());
                    d.down_counter
                })
            } else {
                let b = small_batch(c);
                let up = s.protocol().upload(id, 1, c, &upload(&b, 0), T0).await.unwrap();
                up.map(|a| a.down_counter)
            }
        };
        let (seen, mut downs) = race(&s, &ids, 30, send, ids[5], backend).await;
        for (i, &id) in ids[..5].iter().enumerate() {
            for c in 1..=30 {
                assert_eq!(seen.get(&(id, c)), Some(&1), "{backend}: q{i} counter {c}");
            }
            let mut d = downs.remove(&id).unwrap();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 30, "{backend}: q{i}: answer counters distinct");
            let stored = s.telemetry().range(&format!("q{i}"), 0, i64::MAX).await.unwrap();
            assert_eq!(stored.len(), 20, "{backend}: q{i}: every upload stored once");
        }
        assert!(!downs.contains_key(&ids[5]), "{backend}: a disabled device is refused");
        let seen_ms = s.devices().get("q0").await.unwrap().last_seen_ms;
        assert_eq!(seen_ms, Some(T0), "{backend}: a quiet sync records the device as seen");

        // News is never hidden by the quiet path.
        let req = set_pct(40);
        let cmd = s.commands().queue("q0", &req, 60, "op", T0).await.unwrap();
        let d =
            s.protocol().sync(ids[0], &report(31, None), true, 0, T0 + 1).await.unwrap().unwrap();
        assert_eq!(d.commands.iter().map(|c| c.id).collect::<Vec<_>>(), [cmd.id], "{backend}");
        let patch = ConfigPatch { poll_interval_ms: Some(10_000), ..Default::default() };
        let desired = s.configs().update("q1", &patch, "op", T0).await.unwrap();
        let d =
            s.protocol().sync(ids[1], &report(31, None), true, 0, T0 + 1).await.unwrap().unwrap();
        assert_eq!(d.config.map(|(v, _)| v), Some(desired.desired_version), "{backend}");
        // The device reports the new config: recorded (not quiet), then quiet.
        let applied = Some((desired.desired_version, desired.desired.clone()));
        let d = s.protocol().sync(ids[1], &report(32, applied.clone()), true, 0, T0 + 2).await;
        assert!(d.unwrap().unwrap().config.is_none(), "{backend}");
        let c = s.configs().shadow("q1").await.unwrap();
        assert_eq!(c.reported_version, Some(desired.desired_version), "{backend}");
        let d = s.protocol().sync(ids[1], &report(33, applied), true, 0, T0 + 3).await.unwrap();
        assert!(d.unwrap().config.is_none(), "{backend}");
        // A replayed quiet sync is refused.
        let again = s.protocol().sync(ids[1], &report(33, None), true, 0, T0 + 4).await.unwrap();
        assert!(matches!(again, Err(SyncRefusal::Replay(_))), "{backend}");
    })
    .await;
}

/// Devices' keys are kept in memory, so another server process (here a second
/// store on the same database) can rotate a key behind this one's back. That
/// is caught when a message is admitted: a message sealed with the key that
/// became the previous one is checked against that key's replay window, one
/// sealed with a key rotated out is refused as stale (and the kept copy is
/// dropped), and a version the kept copy does not know is read again.
#[tokio::test]
async fn kept_keys_are_checked_against_the_row_when_a_message_is_admitted() {
    use ecowatt_server::protocol::{SyncRefusal, SyncReport};
    const KEY2: &str = "0f0e0d0c0b0a09080706050403020100";
    const KEY3: &str = "ffeeddccbbaa99887766554433221100";
    for db in TempDb::each().await {
        let b = db.backend();
        let here = Store::open(&db.url).await.unwrap();
        let other = Store::open(&db.url).await.unwrap();
        let d = ecowatt_server::registration::register(&here.devices(), "k", 10_000, KEY, "t", T0)
            .await
            .unwrap();
        here.configs().report("k", 1, &DeviceConfig::default(), &[], T0).await.unwrap();
        let up = async |store: &Store, version: i64, c: u64| {
            let batch = small_batch(c);
            let answer =
                store.protocol().upload(d.id, version, c, &upload(&batch, 0), T0).await.unwrap();
            answer.map(|a| a.down_counter)
        };
        let sync = async |version: i64, c: u64, deliver: bool| {
            let report = SyncReport {
                key_version: version,
                counter: c,
                applied: None,
                rejected: vec![],
                results: vec![],
                firmware: None,
                ota: None,
                control: None,
                schedule: None,
            };
            here.protocol().sync(d.id, &report, deliver, 0, T0).await.unwrap().map(|_| ())
        };

        let keys = async |store: &Store, id: DeviceId, version: u8| match store
            .devices()
            .crypto(id, version, true)
            .await
            .unwrap()
        {
            KeyLookup::Found(c) => Some(c),
            KeyLookup::Unknown => None,
            KeyLookup::NotLookedUp => panic!("asked to read"),
        };
        let kept = keys(&here, d.id, 1).await.unwrap();
        assert_eq!((kept.key_version, kept.key_hex.as_str(), &kept.previous), (1, KEY, &None));
        assert!(up(&here, 1, 5).await.is_ok(), "{b}");

        // Rotated by the other process: this one still holds key 1 as current.
        other.devices().rotate_key("k", KEY2, "t", T0).await.unwrap();
        let still = keys(&here, d.id, 1).await.unwrap();
        assert_eq!(still, kept, "{b}: the kept copy, not read again");
        assert!(
            matches!(up(&here, 1, 5).await, Err(SyncRefusal::Replay(_))),
            "{b}: a replay under the rotated-out-of-current key is still a replay"
        );
        assert!(up(&here, 1, 6).await.is_ok(), "{b}: the previous key still works");
        let fresh = keys(&here, d.id, 2).await.unwrap();
        assert_eq!(
            (fresh.key_version, fresh.key_hex.as_str(), fresh.previous.map(|p| p.1)),
            (2, KEY2, Some(1)),
            "{b}: a version the kept copy lacks is read again"
        );
        assert!(up(&here, 2, 1).await.is_ok(), "{b}");

        // Rotated again elsewhere: key 1 is no longer the device's, whatever
        // this process kept; uploads, quiet syncs and full syncs refuse it.
        other.devices().rotate_key("k", KEY3, "t", T0).await.unwrap();
        assert!(matches!(up(&here, 1, 7).await, Err(SyncRefusal::StaleKey)), "{b}");
        assert!(matches!(sync(1, 8, true).await, Err(SyncRefusal::StaleKey)), "{b}: quiet");
        assert!(matches!(sync(1, 9, false).await, Err(SyncRefusal::StaleKey)), "{b}: full");
        assert!(up(&here, 2, 2).await.is_ok(), "{b}: key 2 is now the previous one");
        let after = keys(&here, d.id, 2).await.unwrap();
        assert_eq!(after.key_version, 3, "{b}: the stale copy was dropped and read again");

        // This process's own rotation and removal drop the copy at once.
        here.devices().rotate_key("k", KEY, "t", T0).await.unwrap();
        assert_eq!(keys(&here, d.id, 3).await.unwrap().key_version, 4, "{b}");
        here.devices().delete("k", "t", T0).await.unwrap();
        assert!(keys(&here, d.id, 3).await.is_none(), "{b}");

        other.close().await;
        here.close().await;
        db.cleanup().await;
    }
}

/// The expiry sweep's index holds only the commands the sweep can expire, so
/// no per-device query on other statuses (the ingest group's count of
/// succeeded writes awaiting confirmation) can be planned onto it: as
/// (status, expires_ms) it was, on PostgreSQL, and read every succeeded
/// command of the fleet for each device of each group.
#[tokio::test]
async fn the_expiry_index_covers_only_commands_that_can_expire() {
    use sqlx::Row;
    for db in TempDb::each().await {
        let b = db.backend();
        let store = Store::open(&db.url).await.unwrap();
        let sql = if b == "sqlite" {
            "SELECT sql AS def FROM sqlite_master WHERE name = 'commands_by_expiry'"
        } else {
            "SELECT indexdef AS def FROM pg_indexes WHERE indexname = 'commands_by_expiry'"
        };
        let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
        let def: String = sqlx::query(sql).fetch_one(&pool).await.unwrap().get("def");
        let def = def.to_lowercase().replace(['(', ')', '\'', '"'], "");
        assert!(def.contains("commands") && def.contains("where"), "{b}: {def}");
        assert!(def.contains("queued") && def.contains("delivered"), "{b}: {def}");
        assert!(!def.contains("succeeded"), "{b}: {def}");
        pool.close().await;
        store.close().await;
        db.cleanup().await;
    }
}

/// A database from before typed command columns: its commands' JSON actions
/// are read into `op`, `register` and `value` by the migration.
#[tokio::test]
async fn commands_stored_as_json_are_migrated_to_typed_columns() {
    use ecowatt_server::db::Dialect;
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    for db in TempDb::each().await {
        let b = db.backend();
        let mut c = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        let dialect = if b == "sqlite" { Dialect::Sqlite } else { Dialect::Postgres };
        schema_up_to(&mut c, dialect, 9).await;
        sqlx::query(
            "INSERT INTO devices (name, device_key, key_version, rated_w, enabled, created_ms) \
             VALUES ('old', '00', 1, 10000, 1, 0)",
        )
        .execute(&mut c)
        .await
        .unwrap();
        for (action, status) in [
            (r#"{"op":"write","register":8,"value":40}"#, "succeeded"),
            (r#"{"op":"read","register":9}"#, "queued"),
        ] {
            sqlx::query(
                "INSERT INTO commands (device_id, kind, parameters, action, status, created_ms, created_by, expires_ms, completed_ms) \
                 VALUES (1, 'k', '{}', $1, $2, 0, 'op', 1, 0)",
            )
            .bind(action)
            .bind(status)
            .execute(&mut c)
            .await
            .unwrap();
        }
        c.close().await.unwrap();
        let s = Store::open(&db.url).await.unwrap();
        let commands = s.commands();
        assert_eq!(
            commands.get(1).await.unwrap().action,
            Action::Write { register: 8, value: 40 },
            "{b}"
        );
        assert_eq!(commands.get(2).await.unwrap().action, Action::Read { register: 9 }, "{b}");
        // The migrated write awaits its reading, and one confirms it.
        assert_eq!(commands.confirm(DeviceId(1), 8, 40, 1).await.unwrap(), 1, "{b}");
        s.close().await;
        db.cleanup().await;
    }
}

/// Long polls woken together are delivered in one group: each device gets
/// its own commands and config, once, with its own down counter; a device
/// woken twice is answered twice; one that is gone gets `NotFound`.
#[tokio::test]
async fn woken_long_polls_are_delivered_in_groups() {
    each(async |s, b| {
        let mut ids = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let key = format!("{KEY:.30}{i:02}");
            let d = ecowatt_server::registration::register(
                &s.devices(),
                name,
                8_000,
                &key,
                "alice#1",
                T0,
            )
            .await
            .unwrap();
            ids.push(d.id);
        }
        let a1 = s.commands().queue("a", &set_pct(10), 600, "x", T0).await.unwrap();
        let a2 = s.commands().queue("a", &set_pct(20), 600, "x", T0).await.unwrap();
        let b1 = s.commands().queue("b", &set_pct(30), 600, "x", T0).await.unwrap();
        let p = s.protocol();
        let now = T0 + 1_000;
        let (da, db, dc, da2, gone) = tokio::join!(
            p.deliver(ids[0], 60_000, now),
            p.deliver(ids[1], 60_000, now),
            p.deliver(ids[2], 60_000, now),
            p.deliver(ids[0], 60_000, now),
            p.deliver(DeviceId(999_999), 60_000, now),
        );
        let (da, db, dc, da2) = (da.unwrap(), db.unwrap(), dc.unwrap(), da2.unwrap());
        let cmds = |d: &ecowatt_server::protocol::SyncDelivery| {
            d.commands.iter().map(|c| c.id).collect::<Vec<_>>()
        };
        // One of a's two answers hands its commands out; the other finds them
        // delivered within the redelivery time.
        let mut a_answers = [cmds(&da), cmds(&da2)];
        a_answers.sort();
        assert_eq!(a_answers, [vec![], vec![a1.id, a2.id]], "{b}");
        assert_eq!(cmds(&db), [b1.id], "{b}");
        assert!(cmds(&dc).is_empty(), "{b}");
        assert_eq!((da.device.as_str(), db.device.as_str(), dc.device.as_str()), ("a", "b", "c"));
        assert!(
            da.config.is_some() && dc.config.is_some(),
            "{b}: the config not reported yet goes"
        );
        assert_ne!(da.down_counter, da2.down_counter, "{b}: each answer its own counter");
        assert_eq!((db.down_counter, dc.down_counter), (1, 1), "{b}");
        assert!(matches!(gone, Err(StoreError::NotFound(_))), "{b}: {gone:?}");
        let shown = s.commands().get(b1.id).await.unwrap();
        assert_eq!((shown.status, shown.delivery_count), (CommandStatus::Delivered, 1), "{b}");
    })
    .await;
}

/// A store a newer release migrated is refused by this one, naming both
/// versions, rather than misread; the store is left as it was.
#[tokio::test]
async fn a_store_migrated_by_a_newer_release_is_refused_unchanged() {
    use ecowatt_server::db::migrate::MIGRATIONS;
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    for db in TempDb::each().await {
        let b = db.backend();
        Store::open(&db.url).await.unwrap().close().await;
        let newer = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap() + 1;
        let mut c = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        sqlx::query("INSERT INTO schema_migrations VALUES ($1, 0)")
            .bind(newer)
            .execute(&mut c)
            .await
            .unwrap();
        let err = Store::open(&db.url).await.err().expect("refused").to_string();
        assert!(err.contains(&format!("version {newer}, newer than")), "{b}: {err}");
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(rows as usize, MIGRATIONS.len() + 1, "{b}: nothing applied or removed");
        c.close().await.unwrap();
        db.cleanup().await;
    }
}

#[tokio::test]
async fn legacy_uploads_store_once_per_nonce_on_both_backends() {
    use ecowatt_server::legacy::{Legacy, Packet, Upload as LegacyUpload};
    each(async |s, b| {
        ecowatt_server::registration::register(&s.devices(), "old", 10_000, KEY, "a", T0)
            .await
            .unwrap();
        let legacy = Legacy::new(s.db().clone());
        let mut raw = vec![0x00, 20];
        (0..20u16).for_each(|v| raw.extend((1000 + v).to_le_bytes()));
        let upload = LegacyUpload {
            device: "old".into(),
            millis: Some(10_000),
            packets: vec![Packet { bytes: raw, layout: (0..10).collect(), millis: Some(10_000) }],
        };
        let refused = legacy.store_upload(&upload, 5, 5_000, T0).await.unwrap_err();
        assert!(matches!(refused, StoreError::Refused { code: "legacy_not_enabled", .. }), "{b}");
        legacy.mark("old", true, "a", T0).await.unwrap();
        let stored = legacy.store_upload(&upload, 5, 5_000, T0).await.unwrap();
        assert_eq!((stored.batches, stored.samples), (1, 2), "{b}");
        let again = legacy.store_upload(&upload, 5, 5_000, T0 + 1).await.unwrap_err();
        assert!(matches!(again, StoreError::Refused { code: "legacy_replay", .. }), "{b}");
        legacy.store_upload(&upload, 6, 5_000, T0 + 10_000).await.unwrap();
        let batches = s.telemetry().range("old", 0, i64::MAX).await.unwrap();
        let seqs: Vec<(i64, i64)> = batches.iter().map(|b| (b.first_seq, b.last_seq)).collect();
        assert_eq!(seqs, [(1, 2), (3, 4)], "{b}: new samples, new sequence numbers");
        assert_eq!((batches[0].first_ms, batches[0].last_ms), (T0 - 5_000, T0), "{b}");
        // Rollups as for any upload, the second bridged to the first (the
        // device's tail): four samples, three 5 s intervals, one of them
        // across the two uploads.
        let (id, _, _) = s.telemetry().zone_of("old").await.unwrap();
        let level = ecowatt_server::telemetry::rollup::Level::Day;
        let days = s.telemetry().rollups(id, level, 0, i64::MAX, &[9]).await.unwrap();
        let samples: i64 = days.iter().map(|d| d.samples).sum();
        let covered: i64 = days.iter().map(|d| d.covered_ms).sum();
        assert_eq!((samples, covered), (4, 15_000), "{b}: {days:?}");
    })
    .await;
}

/// A PostgreSQL store of schema 16 with raw telemetry: migration 17
/// partitions the table and keeps every batch (in the default partition),
/// readable as before, ids going on from the highest.
#[tokio::test]
async fn postgresql_telemetry_stored_before_partitioning_is_kept_and_read() {
    use ecowatt_server::db::Dialect;
    use sqlx::{Connection, Row};
    let Some(db) = TempDb::postgres().await else {
        eprintln!("skipped: no PostgreSQL (set ECOWATT_TEST_PG_URL)");
        return;
    };
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    schema_up_to(&mut c, Dialect::Postgres, 16).await;
    c.close().await.unwrap();
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO devices (name, device_key, key_version, rated_w, enabled, created_ms) \
         VALUES ('old', '00', 1, 10000, 1, 0)",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let samples: Vec<ecowatt_proto::codec::Sample> = (0..3u64)
        .map(|i| ecowatt_proto::codec::Sample {
            seq: i + 1,
            unix_ms: 1_000 + i,
            values: vec![i as u16],
        })
        .collect();
    let data = ecowatt_proto::codec::encode(1 << 9, &samples).unwrap();
    for (id, received) in [(41i64, 5_000i64), (42, 6_000)] {
        sqlx::query(
            "INSERT INTO telemetry_batches (id, device_id, first_seq, last_seq, sample_count, first_ms, \
             last_ms, registers, codec, data, received_ms) OVERRIDING SYSTEM VALUE \
             VALUES ($1, 1, $2, $2 + 2, 3, 1000, 1002, 512, 1, $3, $4)",
        )
        .bind(id)
        .bind((id - 41) * 3 + 1)
        .bind(&data)
        .bind(received)
        .execute(&mut c)
        .await
        .unwrap();
    }
    c.close().await.unwrap();
    let s = Store::open(&db.url).await.unwrap();
    let batches = s.telemetry().range("old", 0, i64::MAX).await.unwrap();
    let seqs: Vec<(i64, i64)> = batches.iter().map(|b| (b.first_seq, b.last_seq)).collect();
    assert_eq!(seqs, [(1, 3), (4, 6)]);
    assert_eq!(batches[0].data, data);
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM telemetry_batches_default WHERE received_ms IN (5000, 6000)",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("n"), 2, "in the default partition");
    let row = sqlx::query(
        "INSERT INTO telemetry_batches (device_id, first_seq, last_seq, sample_count, first_ms, \
         last_ms, registers, codec, data, received_ms) VALUES (1, 7, 7, 1, 1, 1, 512, 1, '\\x00', 7000) \
         RETURNING id",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(row.get::<i64, _>("id") > 42, "ids go on from the highest");
    let partitioned = sqlx::query(
        "SELECT relkind::text AS kind FROM pg_class WHERE relname = 'telemetry_batches'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(partitioned.get::<String, _>("kind"), "p");
    c.close().await.unwrap();
    s.close().await;
    db.cleanup().await;
}

/// A store's schema as the migrations up to `version` made it (for tests
/// of the migrations after it).
async fn schema_up_to(
    c: &mut sqlx::AnyConnection,
    dialect: ecowatt_server::db::Dialect,
    version: i64,
) {
    use ecowatt_server::db::migrate::{MIGRATIONS, statements};
    sqlx::query(
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
    )
    .execute(&mut *c)
    .await
    .unwrap();
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= version) {
        for statement in statements(sql, dialect) {
            sqlx::query(&statement).execute(&mut *c).await.unwrap();
        }
        sqlx::query("INSERT INTO schema_migrations VALUES ($1, 0)")
            .bind(*v)
            .execute(&mut *c)
            .await
            .unwrap();
    }
}

//! Many concurrent queue -> deliver -> result cycles, through two store
//! instances on one database (two server processes' worth of pools): nothing
//! lost, no id duplicated, each command delivered once and its result recorded once.

use std::collections::HashSet;
use std::sync::Arc;

use ecowatt_server::commands::{CommandFilter, CommandOutcome, CommandRequest, CommandStatus};
use ecowatt_server::store::Store;
use ecowatt_testkit::server::TempDb;

const DEVICES: usize = 4;
const PER_DEVICE: usize = 25;
const T0: i64 = 1_800_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cycles_lose_nothing_and_duplicate_nothing() {
    for db in TempDb::each().await {
        let b = db.backend();
        let (first, second) =
            (Store::open(&db.url).await.unwrap(), Store::open(&db.url).await.unwrap());
        let devices = first.devices();
        let one = Arc::new(first.commands());
        let two = Arc::new(second.commands());
        let servers = [one.clone(), two.clone()];
        for d in 0..DEVICES {
            ecowatt_server::registration::register(
                &devices,
                &format!("dev-{d}"),
                10_000,
                "00",
                "t",
                T0,
            )
            .await
            .unwrap();
        }

        // Operators queue through both servers at once.
        let mut queued = vec![];
        for d in 0..DEVICES {
            for i in 0..PER_DEVICE {
                let store = servers[i % 2].clone();
                queued.push(tokio::spawn(async move {
                    let r = CommandRequest::SetPowerPercentage { percentage: (i % 101) as i64 };
                    store.queue(&format!("dev-{d}"), &r, 3_600, "op", T0).await.unwrap().id
                }));
            }
        }
        // Meanwhile each device is served by both servers, each delivering and
        // reporting every result twice (a retried upload).
        let mut workers = vec![];
        for d in 0..DEVICES {
            for store in servers.clone() {
                workers.push(tokio::spawn(async move {
                    let name = format!("dev-{d}");
                    let mut mine = vec![];
                    for round in 0..400 {
                        let got = store.deliver(&name, 3_600_000, 5, T0 + 1).await.unwrap();
                        for c in &got {
                            let ok = CommandOutcome::succeeded();
                            store.record_result(&name, c.id, &ok, T0 + 2).await.unwrap();
                            store.record_result(&name, c.id, &ok, T0 + 3).await.unwrap();
                            mine.push(c.id);
                        }
                        if got.is_empty() && round > 50 {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    mine
                }));
            }
        }
        let mut ids = vec![];
        for q in queued {
            ids.push(q.await.unwrap());
        }
        let unique: HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), DEVICES * PER_DEVICE, "{b}: duplicate command ids");

        let mut delivered = vec![];
        for w in workers {
            delivered.extend(w.await.unwrap());
        }
        // Anything queued after the workers stopped looking is delivered now.
        for d in 0..DEVICES {
            let name = format!("dev-{d}");
            for c in one.deliver(&name, 3_600_000, 100, T0 + 1).await.unwrap() {
                let ok = CommandOutcome::succeeded();
                one.record_result(&name, c.id, &ok, T0 + 2).await.unwrap();
                delivered.push(c.id);
            }
        }
        let delivered_set: HashSet<i64> = delivered.iter().copied().collect();
        assert_eq!(delivered.len(), delivered_set.len(), "{b}: a command was delivered twice");
        assert_eq!(delivered_set, unique, "{b}: every command delivered");

        let all = one.list(&CommandFilter { limit: 10_000, ..Default::default() }).await.unwrap();
        assert_eq!(all.len(), DEVICES * PER_DEVICE, "{b}");
        for c in &all {
            assert_eq!(
                (c.status, c.delivery_count, c.completed_ms),
                (CommandStatus::Succeeded, 1, Some(T0 + 2)),
                "{b}: {c:?}"
            );
        }
        drop((servers, one, two));
        first.close().await;
        second.close().await;
        db.cleanup().await;
    }
}

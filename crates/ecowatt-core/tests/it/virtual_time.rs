//! The device's data path on a fake clock: two hours of virtual time with the
//! server unreachable for a whole hour, and a reboot in the middle of the
//! backlog. Every sample reaches the "server" once, in order, without gaps.

use std::collections::BTreeSet;

use ecowatt_core::kv::MemoryKv;
use ecowatt_core::samplelog::SampleLog;
use ecowatt_core::schedule::{BATCHES_PER_ROUND, Scheduler, Uploader};
use ecowatt_proto::codec;
use ecowatt_proto::messages::ConfigState;

const T0: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;

#[test]
fn an_hour_without_the_server_and_a_reboot_lose_nothing() {
    let config = ConfigState {
        version: 1,
        poll_interval_ms: 5_000,
        upload_interval_ms: 60_000,
        registers: 0x03FF,
    };
    let server_up = |t: u64| !(T0 + 600_000..T0 + 600_000 + HOUR).contains(&t);
    let reboot_at = T0 + 600_000 + HOUR - 60_000; // with most of an hour of backlog waiting

    let mut kv = MemoryKv::new();
    let mut log = SampleLog::open(&mut kv, 17_280).unwrap();
    let mut sched = Scheduler::new(&config, T0);
    let mut up = Uploader::new(&config, 60, T0);
    let mut appended = Vec::new();
    let mut stored = BTreeSet::new();
    let mut rebooted = false;
    let mut now = T0;
    let mut failures_seen = 0;
    while now < T0 + 2 * HOUR {
        if !rebooted && now >= reboot_at {
            assert!(log.len() > 60, "the reboot happens mid-backlog ({} waiting)", log.len());
            log = SampleLog::open(&mut kv, 17_280).unwrap();
            up = Uploader::new(&config, 60, now);
            rebooted = true;
        }
        if sched.poll_due(now) {
            let values = vec![(now / 1_000 % 65_536) as u16; 10];
            appended.push(log.append(&mut kv, now, 0x03FF, values).unwrap());
        }
        if up.due(now, log.len()) {
            for _ in 0..BATCHES_PER_ROUND {
                let (mask, batch) = log.batch(up.batch_max());
                if batch.is_empty() {
                    break;
                }
                if !server_up(now) {
                    up.on_failure(now);
                    failures_seen += 1;
                    break;
                }
                // The server decodes and stores; a retried batch changes nothing.
                let decoded = codec::decode(&codec::encode(mask, &batch).unwrap()).unwrap();
                stored.extend(decoded.samples.iter().map(|s| s.seq));
                log.ack(&mut kv, batch.last().unwrap().seq).unwrap();
                up.on_success(now);
            }
        }
        // The shell sleeps until the next thing is due; here time just jumps.
        now += 1_000;
    }
    assert!(
        failures_seen > 100,
        "uploads were refused for an hour, with backoff ({failures_seen})"
    );
    assert!(up.failures() == 0 && log.len() < 60, "caught up: {} waiting", log.len());
    let expected: BTreeSet<u64> = appended.iter().copied().filter(|s| *s <= log.acked()).collect();
    assert_eq!(stored, expected, "every sample stored");
    let seqs: Vec<u64> = appended.clone();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "no gap, no duplicate, across the reboot");
    assert_eq!(appended.len(), 1_440, "two hours at 5 s");
}

#[test]
fn a_new_poll_interval_takes_effect_within_one_interval() {
    let mut c = ConfigState {
        version: 1,
        poll_interval_ms: 60_000,
        upload_interval_ms: 900_000,
        registers: 0x3FF,
    };
    let mut s = Scheduler::new(&c, 0);
    assert!(s.poll_due(0));
    assert!(!s.poll_due(1_000));
    c.poll_interval_ms = 1_000;
    s.reconfigure(&c, 1_000);
    assert_eq!(s.next_poll(), 2_000);
    assert!(s.poll_due(2_500));
    assert_eq!(s.next_poll(), 3_000, "missed polls are skipped, not bunched");
}

#[test]
fn uploads_back_off_on_failure_and_a_full_batch_goes_at_once() {
    let c = ConfigState {
        version: 1,
        poll_interval_ms: 5_000,
        upload_interval_ms: 900_000,
        registers: 0x3FF,
    };
    let mut u = Uploader::new(&c, 10, 0);
    assert!(!u.due(1_000, 9));
    assert!(u.due(1_000, 10), "a full batch");
    assert!(u.due(900_000, 1), "the interval");
    u.on_failure(1_000);
    assert!(!u.due(1_400, 10) && u.due(2_000, 10));
    for _ in 0..10 {
        u.on_failure(0);
    }
    assert_eq!(Uploader::backoff_ms(u.failures()), 30_000);
    u.on_success(5);
    assert_eq!(u.failures(), 0);
}

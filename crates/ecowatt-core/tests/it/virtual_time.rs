//! The schedule on a fake clock. The whole device on virtual time (a day, an
//! outage, reboots, power cuts) is `machine.rs`, driving the one machine.

use ecowatt_core::schedule::{Scheduler, Uploader};
use ecowatt_proto::messages::ConfigState;

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
    assert!(!u.due(1_000, 0), "nothing to send");
    assert!(u.due(1_000, 1), "the first sample after a start goes at once");
    u.on_success(1_000);
    assert!(!u.due(2_000, 9));
    assert!(u.due(2_000, 10), "a full batch");
    assert!(u.due(901_000, 1), "the interval");
    u.on_failure(1_000);
    assert!(!u.due(1_400, 10) && u.due(2_000, 10));
    for _ in 0..10 {
        u.on_failure(0);
    }
    assert_eq!(Uploader::backoff_ms(u.failures()), 30_000);
    u.on_success(5);
    assert_eq!(u.failures(), 0);
}

#[test]
fn a_clock_set_forward_by_years_moves_the_next_poll_past_it() {
    let c = ConfigState {
        version: 1,
        poll_interval_ms: 5_000,
        upload_interval_ms: 900_000,
        registers: 0x3FF,
    };
    // A device without a clock counts from 0 until the server's time arrives.
    let mut s = Scheduler::new(&c, 1_000);
    assert!(s.poll_due(1_000));
    let set = 1_800_000_000_123;
    assert!(s.poll_due(set));
    assert!(s.next_poll() > set && s.next_poll() <= set + 5_000, "{}", s.next_poll());
}

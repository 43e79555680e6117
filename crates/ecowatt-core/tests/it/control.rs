//! Config validation on the device, and commands executed at most once.

use ecowatt_core::control::{DEFAULT_CONFIG, Journal, apply, load_config, store_config};
use ecowatt_core::kv::MemoryKv;
use ecowatt_proto::messages::{CommandResult, ConfigState, Operation};

#[test]
fn out_of_range_fields_keep_their_value_and_are_reported() {
    let desired = ConfigState {
        version: 4,
        poll_interval_ms: 500,
        upload_interval_ms: 60_000,
        registers: 0x0301,
    };
    let (applied, rejected) = apply(&DEFAULT_CONFIG, &desired);
    assert_eq!(
        applied,
        ConfigState {
            version: 4,
            poll_interval_ms: 5_000,
            upload_interval_ms: 60_000,
            registers: 0x0301
        }
    );
    assert_eq!(rejected.len(), 1);
    assert_eq!((rejected[0].field, rejected[0].reason), (1, 1));
    let mut kv = MemoryKv::new();
    assert_eq!(load_config(&mut kv).unwrap().0, DEFAULT_CONFIG);
    store_config(&mut kv, &applied, &rejected).unwrap();
    assert_eq!(load_config(&mut kv).unwrap(), (applied, rejected), "survives a reboot");
}

#[test]
fn a_command_delivered_twice_runs_once_even_across_a_reboot() {
    let mut kv = MemoryKv::new();
    let mut j = Journal::load(&mut kv).unwrap();
    assert!(j.begin(&mut kv, 7, WRITE_30).unwrap());
    let r = CommandResult {
        command_id: 7,
        succeeded: true,
        exception: None,
        value: Some(30),
        executed_ms: 5,
    };
    j.finish(&mut kv, r).unwrap();
    assert!(!j.begin(&mut kv, 7, WRITE_30).unwrap(), "delivered again: not run again");
    let mut j = Journal::load(&mut kv).unwrap();
    assert!(!j.begin(&mut kv, 7, WRITE_30).unwrap(), "nor after a reboot");
    assert_eq!(j.results(), [r], "its result waits for the server");
    j.acknowledged(&mut kv, &[r]).unwrap();
    assert!(Journal::load(&mut kv).unwrap().results().is_empty());
}

const WRITE_30: Operation = Operation::Write { register: 8, value: 30 };

#[test]
fn a_reboot_in_the_middle_of_a_command_reports_what_the_register_holds_and_never_reruns_it() {
    // The inverter holds the value (the write went through), holds another,
    // or cannot be read.
    for (read_back, succeeded) in [(Some(30), true), (Some(100), false), (None, false)] {
        let mut kv = MemoryKv::new();
        let mut j = Journal::load(&mut kv).unwrap();
        assert!(j.begin(&mut kv, 9, WRITE_30).unwrap());
        // Power cut before `finish`.
        let mut j = Journal::load(&mut kv).unwrap();
        assert_eq!(j.interrupted(), Some((9, Some(WRITE_30))));
        assert!(!j.begin(&mut kv, 9, WRITE_30).unwrap(), "never run again");
        j.resolve(&mut kv, read_back, 1_234).unwrap();
        assert_eq!(j.interrupted(), None);
        let r = j.results();
        assert_eq!(
            (r[0].command_id, r[0].succeeded, r[0].value, r[0].executed_ms),
            (9, succeeded, read_back, 1_234),
            "read back {read_back:?}"
        );
        // The result survives another reboot, and the id stays done.
        let mut j = Journal::load(&mut kv).unwrap();
        assert_eq!((j.interrupted(), j.results().len()), (None, 1));
        assert!(!j.begin(&mut kv, 9, WRITE_30).unwrap());
    }
}

#[test]
fn an_interrupted_command_left_unresolved_is_reported_unknown_before_the_next_runs() {
    let mut kv = MemoryKv::new();
    let mut j = Journal::load(&mut kv).unwrap();
    assert!(j.begin(&mut kv, 9, WRITE_30).unwrap());
    let mut j = Journal::load(&mut kv).unwrap();
    assert!(j.begin(&mut kv, 10, Operation::Read { register: 9 }).unwrap());
    let r = j.results();
    assert_eq!((r[0].command_id, r[0].succeeded, r[0].value), (9, false, None));
    assert!(!j.begin(&mut kv, 9, WRITE_30).unwrap());
}

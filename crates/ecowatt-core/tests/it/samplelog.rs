//! The sample log under power cuts at every write, reboots and overflow.

use ecowatt_core::kv::MemoryKv;
use ecowatt_core::samplelog::SampleLog;

const MASK: u16 = 0b11;

#[test]
fn a_reboot_loses_no_unacknowledged_sample() {
    let mut kv = MemoryKv::new();
    let mut log = SampleLog::open(&mut kv, 100).unwrap();
    for i in 0..10 {
        log.append(&mut kv, 1_000 + i, MASK, vec![i as u16, 7]).unwrap();
    }
    log.ack(&mut kv, 4).unwrap();
    let log = SampleLog::open(&mut kv, 100).unwrap();
    let (mask, batch) = log.batch(100);
    assert_eq!(mask, MASK);
    assert_eq!(batch.iter().map(|s| s.seq).collect::<Vec<_>>(), [5, 6, 7, 8, 9, 10]);
    assert_eq!(batch[0].values, [4, 7]);
    assert_eq!(log.next_seq(), 11, "no gap across a reboot");
}

#[test]
fn a_power_cut_at_any_write_loses_at_most_the_sample_being_written() {
    for cut in 0..40 {
        let mut kv = MemoryKv::new();
        let mut stored = Vec::new();
        let mut handed_out = Vec::new();
        {
            let mut log = SampleLog::open(&mut kv, 50).unwrap();
            kv.fail_after(cut);
            for i in 0..30u64 {
                match log.append(&mut kv, i, MASK, vec![i as u16, 0]) {
                    Ok(seq) => {
                        stored.push(seq);
                        handed_out.push(seq);
                    }
                    Err(_) => break, // power cut
                }
                if i == 10 && log.ack(&mut kv, stored[5]).is_err() {
                    break;
                }
            }
        }
        kv.heal();
        let mut log = SampleLog::open(&mut kv, 50).unwrap();
        let back: Vec<u64> = log.batch(1000).1.iter().map(|s| s.seq).collect();
        let acked = log.acked();
        let expected: Vec<u64> = stored.iter().copied().filter(|s| *s > acked).collect();
        assert_eq!(
            back, expected,
            "cut at write {cut}: every stored, unacknowledged sample is back"
        );
        let next = log.append(&mut kv, 99, MASK, vec![0, 0]).unwrap();
        assert!(handed_out.iter().all(|s| *s < next), "cut at write {cut}: seq {next} reused");
        assert_eq!(next, handed_out.last().map_or(1, |s| s + 1), "cut at write {cut}: no gap");
    }
}

#[test]
fn overflow_drops_the_oldest_and_counts_it() {
    let mut kv = MemoryKv::new();
    let mut log = SampleLog::open(&mut kv, 10).unwrap();
    for i in 0..25 {
        log.append(&mut kv, i, MASK, vec![0, 0]).unwrap();
    }
    assert_eq!(log.len(), 10);
    assert_eq!(log.dropped_total(), 15);
    assert_eq!(log.batch(100).1.first().unwrap().seq, 16, "the newest 10 are kept");
    let log = SampleLog::open(&mut kv, 10).unwrap();
    assert_eq!((log.len(), log.dropped_total()), (10, 15), "and so after a reboot");
}

#[test]
fn batches_share_one_register_mask_and_come_oldest_first() {
    let mut kv = MemoryKv::new();
    let mut log = SampleLog::open(&mut kv, 100).unwrap();
    for i in 0..5 {
        log.append(&mut kv, i, MASK, vec![1, 2]).unwrap();
    }
    log.append(&mut kv, 9, 0b111, vec![1, 2, 3]).unwrap();
    let (mask, batch) = log.batch(3);
    assert_eq!((mask, batch.len(), batch[0].seq), (MASK, 3, 1));
    let (mask, batch) = log.batch(100);
    assert_eq!((mask, batch.len()), (MASK, 5), "the mask change starts a new batch");
    log.ack(&mut kv, 5).unwrap();
    assert_eq!(log.batch(100), (0b111, log.batch(100).1));
    assert_eq!(log.batch(100).1[0].values, [1, 2, 3]);
}

/// The samples waiting, by `seq`, and the drop count.
fn waiting(log: &SampleLog) -> (Vec<u64>, u64) {
    (log.batch(100_000).1.iter().map(|s| s.seq).collect(), log.dropped_total())
}

#[test]
fn a_new_capacity_keeps_every_waiting_sample_that_fits_and_counts_the_rest() {
    for (before, after) in [(50, 20), (20, 50), (17, 16), (16, 17), (30, 30)] {
        let mut kv = MemoryKv::new();
        let mut log = SampleLog::open(&mut kv, before).unwrap();
        for i in 0..40u64 {
            log.append(&mut kv, 1_000 + i, MASK, vec![i as u16, 1]).unwrap();
        }
        log.ack(&mut kv, 12).unwrap();
        let (old_waiting, old_dropped) = waiting(&log);
        let newest = log.next_seq() - 1;
        let mut log = SampleLog::open(&mut kv, after).unwrap();
        let (seqs, dropped) = waiting(&log);
        let kept = old_waiting.len().min(after as usize);
        assert_eq!(seqs, old_waiting[old_waiting.len() - kept..], "{before} -> {after}");
        assert_eq!(
            dropped,
            old_dropped + (old_waiting.len() - kept) as u64,
            "{before} -> {after}: what does not fit is counted"
        );
        assert_eq!(log.next_seq(), newest + 1, "{before} -> {after}: no seq given twice");
        let next = log.append(&mut kv, 9_999, MASK, vec![0, 0]).unwrap();
        assert_eq!(next, newest + 1);
        // And the layout holds across another reboot at the new capacity.
        let log = SampleLog::open(&mut kv, after).unwrap();
        let (again, _) = waiting(&log);
        assert_eq!(again.last(), Some(&next), "{before} -> {after}");
        assert_eq!(again.len(), (kept + 1).min(after as usize));
    }
}

#[test]
fn a_power_cut_at_any_write_of_a_capacity_change_loses_and_repeats_nothing() {
    for cut in 0..200 {
        let mut kv = MemoryKv::new();
        let mut log = SampleLog::open(&mut kv, 40).unwrap();
        for i in 0..60u64 {
            log.append(&mut kv, i, MASK, vec![i as u16, 0]).unwrap();
        }
        log.ack(&mut kv, 25).unwrap();
        let (old_waiting, old_dropped) = waiting(&log);
        let newest = log.next_seq() - 1;
        kv.fail_after(cut);
        let first = SampleLog::open(&mut kv, 25);
        kv.heal();
        let mut log = SampleLog::open(&mut kv, 25).unwrap();
        let (seqs, dropped) = waiting(&log);
        assert_eq!(seqs, old_waiting[old_waiting.len() - 25..], "cut at write {cut}");
        assert_eq!(dropped, old_dropped + (old_waiting.len() - 25) as u64, "cut at write {cut}");
        assert_eq!(log.append(&mut kv, 99, MASK, vec![0, 0]).unwrap(), newest + 1, "cut {cut}");
        if first.is_ok() {
            // The change went through before the cut: nothing else to prove.
            assert!(cut > 20, "cut at write {cut}: the change cannot be done in so few writes");
        }
    }
}

#[test]
fn a_log_written_before_layouts_were_recorded_survives_a_capacity_change() {
    // What an earlier build left: slots `log.s.<seq % 30>`, no layout key.
    use ecowatt_core::kv::KeyValue;
    let mut kv = MemoryKv::new();
    for seq in 1..=45u64 {
        let mut entry = Vec::new();
        entry.extend_from_slice(&seq.to_be_bytes());
        entry.extend_from_slice(&(1_000 + seq).to_be_bytes());
        entry.extend_from_slice(&MASK.to_be_bytes());
        entry.extend_from_slice(&[0, seq as u8, 0, 7]);
        kv.set(&format!("log.s.{}", seq % 30), &entry).unwrap();
    }
    kv.set("log.acked", &20u64.to_be_bytes()).unwrap();
    for capacity in [10, 64] {
        let mut copy = kv.clone();
        let mut log = SampleLog::open(&mut copy, capacity).unwrap();
        let (seqs, dropped) = waiting(&log);
        let expected: Vec<u64> = (21..=45).collect();
        let kept = expected.len().min(capacity as usize);
        assert_eq!(seqs, expected[expected.len() - kept..], "to {capacity}");
        assert_eq!(dropped, (expected.len() - kept) as u64, "to {capacity}");
        assert_eq!(log.append(&mut copy, 0, MASK, vec![0, 0]).unwrap(), 46, "to {capacity}");
    }
}

#[test]
fn samples_the_server_refuses_leave_counted_as_dropped() {
    let mut kv = MemoryKv::new();
    let mut log = SampleLog::open(&mut kv, 100).unwrap();
    for i in 0..10 {
        log.append(&mut kv, i, MASK, vec![0, 0]).unwrap();
    }
    assert_eq!(log.discard(&mut kv, 4).unwrap(), 4);
    let log = SampleLog::open(&mut kv, 100).unwrap();
    assert_eq!(waiting(&log), ((5..=10).collect(), 4));
}

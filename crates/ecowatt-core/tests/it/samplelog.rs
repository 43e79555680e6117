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

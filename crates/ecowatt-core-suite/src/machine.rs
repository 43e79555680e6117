//! The device machine on virtual time: a whole day, outages, reboots and power
//! cuts at every storage write, updates (with a cut at every write), and bad
//! input from every side. No test sleeps.

use alloc::{vec, vec::Vec};

use ecowatt_core::machine::{MAX_ANSWER, Note};
use ecowatt_proto::firmware::Version;
use ecowatt_proto::messages::{ConfigState, OtaState, ota_reason};
use sha2::{Digest, Sha256};

use crate::doubles::idx;
use crate::world::{HOUR, MINUTE, SECOND, T0, World, image};

fn sampled(w: &World) -> Vec<u64> {
    w.notes
        .iter()
        .filter_map(|n| match n {
            Note::Sampled { seq } => Some(*seq),
            _ => None,
        })
        .collect()
}

/// Every sample the device stored reached the server once, with one content.
fn nothing_lost(w: &World) {
    assert_eq!(w.server.conflicts, 0, "a seq was reused for a different sample");
    assert_eq!(w.server.replays, 0, "a counter was reused");
    let waiting = w.device().log().len() as u64;
    for seq in sampled(w) {
        assert!(
            w.server.stored.contains_key(&seq) || seq > w.device().log().acked(),
            "sample {seq} lost ({waiting} waiting)"
        );
    }
}

pub fn a_day_of_a_device() {
    let mut w = World::new();
    w.run_until(T0 + 2 * HOUR);
    assert_eq!(w.device().config().version, 1, "the server's config is applied");
    // An hour without the server: sampling goes on, uploads back off.
    w.server.up = false;
    w.run_until(T0 + 3 * HOUR);
    assert!(w.device().log().len() >= 700, "an hour of backlog: {}", w.device().log().len());
    w.server.up = true;
    // Commands, one of them already expired, and a new config.
    w.server.command(1, 40, T0 + 24 * HOUR);
    w.server.command(2, 70, T0 + HOUR);
    w.server.desired = ConfigState {
        version: 2,
        poll_interval_ms: 10_000,
        upload_interval_ms: 120_000,
        registers: 0x0301,
    };
    w.run_until(T0 + 4 * HOUR);
    w.reboot();
    w.run_until(T0 + 24 * HOUR);

    nothing_lost(&w);
    let stored = w.stored_contiguous();
    let samples = sampled(&w).len() as u64;
    assert_eq!(stored + w.device().log().len() as u64, samples, "no gap, no duplicate");
    assert!(samples > 3 * 720 + 20 * 360 - 10, "a day of samples ({samples})");
    assert!(w.device().log().len() < 60, "caught up");
    assert_eq!(w.device().config().version, 2);
    assert_eq!(w.server.applied.unwrap().poll_interval_ms, 10_000);
    let last = w.server.stored.values().last().unwrap();
    assert_eq!(last.values.len(), 3, "the new register selection");
    assert_eq!(w.inverter.writes, vec![(8, 40)], "the expired command never ran");
    let (r, _) = w.server.results[&1];
    assert!(r.succeeded && r.value == Some(40), "confirmed by reading back: {r:?}");
    assert!(w.count(|n| matches!(n, Note::SyncFailed { .. })) > 50, "syncs backed off");
    assert_eq!(w.server.commands.len(), 1, "the expired command is still queued at the server");
}

pub fn a_power_cut_at_every_storage_write_loses_nothing() {
    power_cuts(World::new);
}

/// The same on the flash key-value store: the power goes at every flash
/// write and erase (a word half programmed, a sector half erased) as well.
pub fn a_device_on_flash_loses_nothing_at_a_power_cut_at_any_flash_operation() {
    power_cuts(World::on_flash);
}

/// The scenario of the two tests above, with the power cut at every write in
/// turn: nothing the device stored is lost or changed, no counter
/// is used twice, the command runs at most once and says what happened.
fn power_cuts(world: fn() -> World) {
    // One clean run counts the writes of the scenario; then the power goes at
    // each of them in turn.
    let scenario = |cut: Option<usize>| {
        let mut w = world();
        if let Some(n) = cut {
            w.power.cut_after(n);
        }
        w.server.command(7, 33, T0 + HOUR);
        w.run_until(T0 + 2 * MINUTE);
        w.server.up = false;
        w.run_until(T0 + 4 * MINUTE);
        w.server.up = true;
        w.run_until(T0 + 12 * MINUTE);
        w
    };
    let at_boot = world().power.writes();
    let clean = scenario(None);
    let writes = clean.power.writes() - at_boot;
    assert!(writes > 40, "the scenario writes ({writes})");
    let mut cuts = 0;
    for n in 0..writes {
        let w = scenario(Some(n));
        cuts += w.cuts;
        nothing_lost(&w);
        let writes_of_7 = w.inverter.writes.iter().filter(|wr| **wr == (8, 33)).count();
        assert!(writes_of_7 <= 1, "cut at write {n}: the command ran {writes_of_7} times");
        let (r, _) = w.server.results.get(&7).unwrap_or_else(|| panic!("cut at {n}: no result"));
        assert_eq!(r.succeeded, writes_of_7 == 1, "cut at {n}: the result says what happened");
        assert!(w.device().log().len() < 60, "cut at {n}: caught up");
    }
    assert!(cuts as usize >= writes, "every write was cut once ({cuts} of {writes})");
}

fn updated(w: &World) -> bool {
    let b = w.device().booted();
    b.running == Version::parse("1.1.0").unwrap() && !b.trial
}

pub fn an_update_installs_boots_on_trial_and_confirms() {
    let mut w = World::new();
    let img = image(50_000);
    w.run_until(T0 + MINUTE);
    w.server.offer_update("1.1.0", img.clone(), false);
    let ok = w.run_until_true(5 * MINUTE, updated);
    let notes: Vec<_> = w
        .notes
        .iter()
        .filter(|n| !matches!(n, Note::Sampled { .. } | Note::Uploaded { .. }))
        .collect();
    assert!(ok, "updated: {notes:?} {:?}", w.server.reports);
    let b = w.device().booted().clone();
    assert_eq!(Sha256::digest(&w.flash.borrow().slots[idx(b.slot)]), Sha256::digest(&img));
    let states: Vec<OtaState> = w.server.reports.iter().map(|r| r.state).collect();
    assert_eq!(states.first(), Some(&OtaState::Downloading));
    assert!(states.contains(&OtaState::Installing) && states.contains(&OtaState::Trial));
    w.server.offer = None;
    w.run_until(w.now + MINUTE);
    assert_eq!(w.server.reports.last().unwrap().state, OtaState::Succeeded);
    assert_eq!(w.server.firmware, "1.1.0");
    assert_eq!(w.boots, 2, "one restart");
    nothing_lost(&w);
}

pub fn an_update_with_a_power_cut_at_every_write_ends_on_a_verified_image() {
    // A cut before the new image confirmed itself looks like a crash to the
    // bootloader: the old image boots again and the rollback is reported.
    // Any other cut: the update resumes and completes.
    let img = image(20_000);
    let rolled_back = |w: &World| {
        w.device().booted().running == Version::parse("1.0.0").unwrap()
            && w.server.reports.last().is_some_and(|r| r.state == OtaState::RolledBack)
    };
    let succeeded = |w: &World| {
        updated(w) && w.server.reports.last().is_some_and(|r| r.state == OtaState::Succeeded)
    };
    let scenario = |cut: Option<usize>| {
        let mut w = World::new();
        w.run_until(T0 + 30 * SECOND);
        w.server.offer_update("1.1.0", img.clone(), false);
        if let Some(n) = cut {
            w.power.cut_after(n);
        }
        w.run_until_true(30 * MINUTE, |w| succeeded(w) || rolled_back(w));
        w
    };
    let clean = scenario(None);
    assert!(succeeded(&clean));
    let writes = clean.power.writes() - World::new().power.writes();
    let (mut completed, mut returned) = (0, 0);
    for n in 0..writes.min(150) {
        let w = scenario(Some(n));
        let b = w.device().booted();
        if succeeded(&w) {
            completed += 1;
            let flash = w.flash.borrow();
            let running = Sha256::digest(&flash.slots[idx(b.slot)]);
            assert_eq!(running, Sha256::digest(&img), "cut at write {n}: runs the verified image");
        } else {
            assert!(rolled_back(&w), "cut at write {n}: neither updated nor rolled back");
            assert_eq!(b.slot, ecowatt_core::ota::Slot::A, "cut at write {n}: the old slot");
            returned += 1;
        }
        nothing_lost(&w);
    }
    assert!(
        completed > 0 && returned > 0,
        "cuts before and during the trial ({completed}/{returned})"
    );
}

pub fn a_trial_image_that_cannot_reach_the_server_rolls_back() {
    let mut w = World::new();
    w.run_until(T0 + MINUTE);
    w.server.offer_update("1.1.0", image(10_000), false);
    assert!(w.run_until_true(5 * MINUTE, |w| w.device().booted().trial), "on trial");
    w.server.up = false;
    w.run_until(w.now + 2 * MINUTE); // the health check is 60 s
    assert!(w.count(|n| *n == Note::HealthCheckFailed) == 1);
    assert_eq!(w.device().booted().running, Version::parse("1.0.0").unwrap());
    w.server.offer = None;
    w.server.up = true;
    w.run_until(w.now + MINUTE);
    let last = w.server.reports.last().unwrap();
    assert_eq!((last.state, last.reason), (OtaState::RolledBack, ota_reason::HEALTH_CHECK));
    w.reboot();
    w.run_until(w.now + MINUTE);
    let rolled_back = w.server.reports.iter().filter(|r| r.state == OtaState::RolledBack).count();
    assert_eq!(rolled_back, 1, "reported once, then cleared");
}

pub fn a_forged_update_is_refused_before_a_byte_is_fetched() {
    let mut w = World::new();
    w.server.offer_update("1.1.0", image(10_000), true);
    w.run_until(T0 + 5 * MINUTE);
    let last = w.server.reports.last().unwrap();
    assert_eq!((last.state, last.reason), (OtaState::Failed, ota_reason::BAD_SIGNATURE));
    assert_eq!(w.flash.borrow().erases, 0, "the slot was not touched");
    assert_eq!(w.count(|n| matches!(n, Note::UpdateOffered { .. })), 1, "not tried again");
    assert_eq!(w.device().booted().running, Version::parse("1.0.0").unwrap());
}

pub fn a_broken_flash_fails_the_update_and_the_device_goes_on() {
    let mut w = World::new();
    w.flash.borrow_mut().broken = true;
    w.server.offer_update("1.1.0", image(10_000), false);
    w.run_until(T0 + 5 * MINUTE);
    let last = w.server.reports.last().unwrap();
    assert_eq!((last.state, last.reason), (OtaState::Failed, ota_reason::FLASH));
    nothing_lost(&w);
    assert!(w.server.stored.len() > 40, "telemetry went on");
}

pub fn an_update_whose_download_keeps_failing_is_reported_failed() {
    let mut w = World::new();
    w.run_until(T0 + 10 * SECOND);
    w.server.downloads = false;
    w.server.offer_update("1.1.0", image(100_000), false);
    w.run_until(w.now + 5 * MINUTE);
    let failed = w.server.reports.iter().find(|r| r.state == OtaState::Failed);
    let failed = failed.expect("reported failed");
    assert_eq!(failed.reason, ota_reason::DOWNLOAD_FAILED);
    assert!(w.count(|n| matches!(n, Note::FetchFailed { .. })) >= 7, "retried first");
}

pub fn garbage_and_oversized_answers_are_refused_and_nothing_is_lost() {
    let mut w = World::new();
    w.run_until(T0 + MINUTE);
    w.server.garbage = Some((ecowatt_core::machine::Channel::Sync, vec![0x55; 100]));
    w.run_until(w.now + MINUTE);
    w.server.garbage = Some((ecowatt_core::machine::Channel::Sync, vec![0; MAX_ANSWER + 1]));
    w.run_until(w.now + MINUTE);
    w.server.garbage = Some((ecowatt_core::machine::Channel::Upload, vec![1, 2, 3]));
    w.run_until(w.now + 10 * MINUTE);
    assert!(w.count(|n| matches!(n, Note::SyncFailed { .. })) >= 2);
    assert_eq!(w.count(|n| matches!(n, Note::UploadFailed { .. })), 1);
    nothing_lost(&w);
    assert_eq!(w.stored_contiguous() + w.device().log().len() as u64, sampled(&w).len() as u64);
}

pub fn a_silent_inverter_is_reported_and_the_device_stays_in_touch() {
    let mut w = World::new();
    w.inverter.silent = true;
    w.server.command(3, 20, T0 + HOUR);
    w.run_until(T0 + 10 * MINUTE);
    assert!(sampled(&w).is_empty());
    assert!(w.count(|n| matches!(n, Note::InverterUnreachable(_))) > 50);
    let (r, _) = w.server.results[&3];
    assert!(!r.succeeded && r.value.is_none() && r.exception.is_none(), "{r:?}");
    assert!(w.server.syncs > 5, "syncs go on");
    w.inverter.silent = false;
    w.run_until(w.now + 5 * MINUTE);
    assert!(!sampled(&w).is_empty(), "sampling resumes");
}

pub fn a_full_store_loses_no_acknowledged_sample() {
    let mut w = World::new();
    w.run_until(T0 + 3 * MINUTE);
    w.power.set_full(true);
    w.run_until(w.now + 5 * MINUTE);
    assert!(w.count(|n| matches!(n, Note::StorageFailed("sample", _))) > 10);
    w.power.set_full(false);
    w.run_until(w.now + 5 * MINUTE);
    nothing_lost(&w);
    assert!(w.device().log().len() < 60, "caught up after space came back");
    w.reboot();
    w.run_until(w.now + 3 * MINUTE);
    nothing_lost(&w);
}

pub fn uploads_use_the_newest_codec_both_sides_name_and_fall_back_when_refused() {
    use ecowatt_proto::codec::{CODEC_V1, CODEC_V2};
    let mut w = World::new();
    // Before any sync answer: v1, which every server takes.
    assert_eq!(w.device().codec_in_use(), CODEC_V1);
    w.run_until(T0 + 5 * MINUTE);
    assert!(w.server.codecs_asked, "the device states its codecs");
    assert_eq!(w.device().codec_in_use(), CODEC_V2);
    assert!(w.server.upload_codecs.contains(&CODEC_V2));
    // The server stops offering v2: the next v2 upload is refused, the device
    // falls back to v1 at once and loses nothing.
    w.server.codecs_offered = 1 << CODEC_V1;
    let before = w.server.upload_codecs.len();
    w.run_until(w.now + 5 * MINUTE);
    assert!(w.count(|n| matches!(n, Note::CodecInUse { version: 1 })) >= 1);
    assert!(w.server.upload_codecs[before..].iter().all(|c| *c == CODEC_V1));
    assert!(w.server.upload_codecs.len() > before, "uploads went on");
    nothing_lost(&w);
    // A restart starts from v1 again and hears the offer back.
    w.server.codecs_offered = ecowatt_proto::codec::SUPPORTED;
    w.reboot();
    assert_eq!(w.device().codec_in_use(), CODEC_V1);
    w.run_until(w.now + 3 * MINUTE);
    assert_eq!(w.device().codec_in_use(), CODEC_V2);
    nothing_lost(&w);
}

pub fn a_v1_only_device_states_no_codecs_and_keeps_v1() {
    let mut w = World::new();
    w.settings.codecs = 1 << ecowatt_proto::codec::CODEC_V1;
    // A protocol 1.2 device (the delivery extension would carry a v1-only codec block).
    w.settings.delivery = 0;
    w.reboot();
    w.run_until(T0 + 5 * MINUTE);
    assert!(!w.server.codecs_asked, "asks as a protocol 1.2 device");
    assert!(!w.server.upload_codecs.is_empty());
    assert!(w.server.upload_codecs.iter().all(|c| *c == ecowatt_proto::codec::CODEC_V1));
    nothing_lost(&w);
}

pub fn a_device_without_a_server_samples_and_takes_local_commands_checked_and_read_back() {
    use ecowatt_core::machine::LocalRefused;
    let mut w = World::new();
    w.settings.cloud = false;
    w.reboot();
    w.run_until(T0 + 5 * MINUTE);
    assert_eq!(w.server.syncs, 0, "no sync without a server");
    assert!(w.server.uploads.is_empty(), "no upload without a server");
    assert!(!sampled(&w).is_empty(), "it samples");
    assert_eq!(w.device().log().len(), 1, "only the newest sample is kept");
    let (_, newest) = w.device().log().newest().unwrap();
    assert_eq!(newest.seq, *sampled(&w).last().unwrap());
    // A local command: written, read back, noted.
    let id = w.command_local(40).unwrap();
    assert!(id >= ecowatt_core::machine::LOCAL_ID_BASE);
    w.run_until(w.now + 10 * SECOND);
    assert_eq!(w.inverter.regs[8], 40);
    let done = w.count(|n| {
        matches!(n, Note::CommandExecuted { result, .. }
            if result.command_id == id && result.succeeded && result.value == Some(40))
    });
    assert_eq!(done, 1);
    // Checked by the register map's rule; bounded.
    assert!(matches!(w.command_local(101), Err(LocalRefused::Invalid(_))));
    assert_eq!(w.command_local(101).unwrap_err().code(), "value_out_of_range");
    let mut taken = 0;
    while w.command_local(30).is_ok() {
        taken += 1;
        assert!(taken <= 9, "the queue is bounded");
    }
    assert_eq!(w.command_local(30), Err(LocalRefused::Busy));
    w.run_until(w.now + MINUTE);
    assert_eq!(w.inverter.regs[8], 30);
    assert_eq!(w.server.syncs, 0);
    // A device with a server takes commands from it only.
    let mut cloud = World::new();
    assert_eq!(cloud.command_local(40), Err(LocalRefused::HasServer));
}

pub fn samples_the_server_will_never_take_are_dropped_and_counted() {
    let mut w = World::new();
    w.server.refuse_times = true;
    w.run_until(T0 + 3 * MINUTE);
    assert!(w.count(|n| matches!(n, Note::SamplesRefused { .. })) >= 1);
    assert!(w.device().log().dropped_total() > 0);
    w.server.refuse_times = false;
    w.run_until(w.now + 3 * MINUTE);
    assert!(!w.server.stored.is_empty(), "later samples go through");
}

pub fn a_command_delivered_again_runs_once() {
    let mut w = World::new();
    w.server.command(5, 60, T0 + HOUR);
    w.run_until(T0 + MINUTE);
    assert_eq!(w.inverter.writes, vec![(8, 60)]);
    // The server delivers it again (as it does when a result is slow to come),
    // once now and once after a reboot.
    w.server.command(5, 60, T0 + HOUR);
    w.run_until(w.now + MINUTE);
    w.reboot();
    w.server.command(5, 60, T0 + HOUR);
    w.run_until(w.now + MINUTE);
    assert_eq!(w.inverter.writes, vec![(8, 60)], "written once");
    assert_eq!(w.server.commands.len(), 2, "the repeats get no new result");
}

pub fn a_cut_fetch_resumes_where_it_stopped() {
    let mut w = World::new();
    w.server.cut_fetch_at = Some(30_000);
    w.server.offer_update("1.1.0", image(50_000), false);
    assert!(w.run_until_true(5 * MINUTE, updated));
    let f = &w.server.fetches;
    let at = f.iter().position(|o| *o == 28_672).expect("the fetch that was cut");
    assert_eq!(f[at + 1], 28_672, "asked again from where it stopped, not from 0");
    assert!(f.windows(2).all(|p| p[1] >= p[0]), "never from the start again: {f:?}");
}

pub fn a_tampered_image_is_refused_after_download_and_never_boots() {
    let mut w = World::new();
    w.server.tamper_at = Some(12_345);
    w.server.offer_update("1.1.0", image(30_000), false);
    w.run_until(T0 + 5 * MINUTE);
    let last = w.server.reports.last().unwrap();
    assert_eq!((last.state, last.reason), (OtaState::Failed, ota_reason::HASH_MISMATCH));
    w.reboot();
    assert_eq!(w.device().booted().running, Version::parse("1.0.0").unwrap());
    assert_eq!(w.device().booted().slot, ecowatt_core::ota::Slot::A);
    assert_eq!(w.boots, 2, "no restart into it");
}

/// The stream offsets where chunks of `2^log2` bytes start.
fn chunk_starts(log2: u8) -> impl Fn(&u64) -> bool {
    move |o| o % ((1u64 << log2) + ecowatt_proto::delivery::TAG_LEN as u64) == 0
}

pub fn an_encrypted_update_is_decrypted_as_it_streams_resumes_at_a_chunk_and_confirms() {
    let mut w = World::new();
    let img = image(50_001);
    w.server.encrypt = Some(10);
    // The cut falls inside a chunk: the fetch again starts at that chunk.
    w.server.cut_fetch_at = Some(30_000);
    w.server.offer_update("1.1.0", img.clone(), false);
    assert!(w.run_until_true(5 * MINUTE, updated), "{:?}", w.server.reports);
    assert!(w.server.delivery_asked, "the device says it takes encrypted images");
    let b = w.device().booted().clone();
    assert_eq!(Sha256::digest(&w.flash.borrow().slots[idx(b.slot)]), Sha256::digest(&img));
    let f = &w.server.fetches;
    assert!(f.iter().all(chunk_starts(10)), "every fetch starts at a chunk: {f:?}");
    let cut = f.iter().position(|o| (*o..*o + 3_120).contains(&30_000)).expect("the cut fetch");
    assert_eq!(f[cut + 1], f[cut], "asked again from the chunk that was cut: {f:?}");
    assert!(f.windows(2).all(|p| p[1] >= p[0]), "never from the start again: {f:?}");
    // The device holds at most one fetch (whole chunks, within its chunk setting).
    let stream = 50_001 + 16 * 49;
    assert_eq!(f.len(), (stream as usize).div_ceil(3 * 1_040) + 1, "{f:?}");
    w.server.offer = None;
    w.run_until(w.now + MINUTE);
    assert_eq!(w.server.reports.last().unwrap().state, OtaState::Succeeded);
}

pub fn a_tampered_or_foreign_encrypted_chunk_is_refused_and_nothing_switches() {
    for foreign in [false, true] {
        let mut w = World::new();
        w.server.encrypt = Some(12);
        if foreign {
            w.server.encrypt_for_another = true;
        } else {
            // A bit of the stream flipped in its fourth chunk.
            w.server.tamper_at = Some(3 * 4_112 + 100);
        }
        w.server.offer_update("1.1.0", image(30_000), false);
        w.run_until(T0 + 5 * MINUTE);
        let last = w.server.reports.last().unwrap();
        assert_eq!((last.state, last.reason), (OtaState::Failed, ota_reason::DECRYPT_FAILED));
        // What was written before the bad chunk had authenticated; nothing after it.
        assert_eq!(last.done, if foreign { 0 } else { 3 * 4_096 }, "foreign {foreign}");
        assert!(
            !w.server.reports.iter().any(|r| r.state == OtaState::Installing),
            "never installed"
        );
        w.reboot();
        assert_eq!(w.device().booted().running, Version::parse("1.0.0").unwrap());
        assert_eq!(w.device().booted().slot, ecowatt_core::ota::Slot::A);
    }
}

pub fn a_device_that_takes_no_encrypted_images_gets_them_clear() {
    let mut w = World::new();
    w.settings.delivery = 0;
    w.reboot();
    w.server.encrypt = Some(12);
    w.server.offer_update("1.1.0", image(20_000), false);
    assert!(w.run_until_true(5 * MINUTE, updated), "{:?}", w.server.reports);
    assert!(!w.server.delivery_asked);
}

pub fn a_device_without_trusted_keys_refuses_every_update() {
    let mut w = World::new();
    w.settings.firmware_keys.clear();
    w.reboot();
    w.server.offer_update("1.1.0", image(10_000), false);
    w.run_until(T0 + 2 * MINUTE);
    let last = w.server.reports.last().unwrap();
    assert_eq!((last.state, last.reason), (OtaState::Failed, ota_reason::NO_TRUSTED_KEY));
    assert_eq!(w.flash.borrow().erases, 0);
}

pub fn a_backlog_goes_in_full_batches_and_the_rest_waits_for_the_interval() {
    let mut w = World::new();
    w.run_until(T0 + 10 * MINUTE);
    w.server.up = false;
    w.run_until(T0 + 40 * MINUTE);
    w.server.up = true;
    let back = w.now;
    w.run_until(T0 + 50 * MINUTE);
    let uploads = &w.server.uploads;
    let first = uploads.iter().find(|(t, _)| *t >= back).expect("uploads after the outage").0;
    let catch_up: Vec<usize> = uploads
        .iter()
        .filter(|(t, _)| (first..first + 10 * SECOND).contains(t))
        .map(|(_, n)| *n)
        .collect();
    assert!(catch_up.len() >= 6, "half an hour of backlog goes at once: {catch_up:?}");
    assert!(catch_up.iter().all(|n| *n == 60), "full batches only: {catch_up:?}");
    nothing_lost(&w);
    assert!(w.device().log().len() < 60, "the rest went with the next interval");
}

//! Firmware updates on A/B slots: verify before download, resume, hash check,
//! trial boot, confirmation, rollback; and a power cut at every write.

use alloc::vec::Vec;

use alloc::rc::Rc;

use ecowatt_core::kv::{KeyValue, MemoryKv};
use ecowatt_core::ota::{self, Boot, BootRecord, Download, OtaError, Slot, Slots};

use crate::doubles::{Flash, Kv, Power, idx};
use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

const KEY: [u8; 32] = [3; 32];
const TARGET: &str = "linux-x86_64";

fn factory() -> Version {
    Version::parse("1.0.0").unwrap()
}

fn signed(image: &[u8], version: &str, counter: u32, key: &[u8; 32]) -> (Manifest, [u8; 64]) {
    let m = Manifest {
        version: Version::parse(version).unwrap(),
        size: image.len() as u64,
        sha256: Sha256::digest(image).into(),
        security_counter: counter,
        target: TARGET.into(),
        created_ms: 1,
    };
    let sig = SigningKey::from_bytes(key).sign(&m.signed_bytes().unwrap()).to_bytes();
    (m, sig)
}

fn trusted() -> PublicKey {
    PublicKey::Ed25519(SigningKey::from_bytes(&KEY).verifying_key().to_bytes())
}

fn image() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 253) as u8).collect()
}

/// Downloads (resuming where a cut left it) in 4 KiB chunks and marks
/// pending; Err on the first failure.
fn update(
    kv: &mut impl KeyValue,
    slots: &mut impl Slots,
    img: &[u8],
    m: &Manifest,
    sig: &[u8; 64],
) -> Result<(), OtaError> {
    let mut d = Download::start(kv, slots, &factory(), TARGET, &trusted(), m.clone(), sig)?;
    let mut at = d.written() as usize;
    while at < img.len() {
        let end = (at + 4_096).min(img.len());
        d.chunk(kv, slots, at as u64, &img[at..end])?;
        at = end;
    }
    d.finish(kv, &factory())
}

pub fn a_good_update_boots_on_trial_and_is_kept_once_confirmed() {
    let (mut kv, mut flash, img) = (MemoryKv::new(), Flash::default(), image());
    let (m, sig) = signed(&img, "1.1.0", 1, &KEY);
    update(&mut kv, &mut flash, &img, &m, &sig).unwrap();
    assert_eq!(ota::boot(&mut kv, &factory()).unwrap(), Boot::Trial(Slot::B, m.version.clone()));
    ota::confirm(&mut kv, &factory()).unwrap();
    assert_eq!(
        ota::boot(&mut kv, &factory()).unwrap(),
        Boot::Confirmed(Slot::B, m.version.clone())
    );
    assert_eq!(flash.slots[1], img);
    // The next update goes to the other slot.
    let img2: Vec<u8> = img.iter().map(|b| b ^ 0x55).collect();
    let (m2, sig2) = signed(&img2, "1.2.0", 1, &KEY);
    update(&mut kv, &mut flash, &img2, &m2, &sig2).unwrap();
    assert_eq!(ota::boot(&mut kv, &factory()).unwrap(), Boot::Trial(Slot::A, m2.version));
}

pub fn nothing_is_switched_for_a_changed_byte_a_wrong_key_or_an_old_version() {
    let (mut kv, mut flash, img) = (MemoryKv::new(), Flash::default(), image());
    let (m, sig) = signed(&img, "1.1.0", 1, &KEY);
    let mut bad = img.clone();
    bad[123_456] ^= 1;
    assert_eq!(update(&mut kv, &mut flash, &bad, &m, &sig), Err(OtaError::HashMismatch));
    assert_eq!(ota::boot(&mut kv, &factory()).unwrap(), Boot::Confirmed(Slot::A, factory()));

    let (m, sig) = signed(&img, "1.1.0", 1, &[9; 32]);
    let erases = flash.erases;
    assert_eq!(update(&mut kv, &mut flash, &img, &m, &sig), Err(OtaError::BadSignature));
    assert_eq!(flash.erases, erases, "refused before touching the slot");

    let (m, sig) = signed(&img, "0.9.9", 1, &KEY);
    assert!(matches!(update(&mut kv, &mut flash, &img, &m, &sig), Err(OtaError::Downgrade { .. })));
    let (m, sig) = signed(&img, "1.0.0", 1, &KEY);
    assert!(
        matches!(update(&mut kv, &mut flash, &img, &m, &sig), Err(OtaError::Downgrade { .. })),
        "same version"
    );

    // Anti-rollback: after confirming counter 5, an image with counter 4 is refused.
    let (m, sig) = signed(&img, "1.1.0", 5, &KEY);
    update(&mut kv, &mut flash, &img, &m, &sig).unwrap();
    ota::boot(&mut kv, &factory()).unwrap();
    ota::confirm(&mut kv, &factory()).unwrap();
    let (m, sig) = signed(&img, "1.2.0", 4, &KEY);
    assert_eq!(
        update(&mut kv, &mut flash, &img, &m, &sig),
        Err(OtaError::SecurityCounter { own: 5, offered: 4 })
    );
}

pub fn an_image_that_fails_its_health_check_is_rolled_back() {
    let (mut kv, mut flash, img) = (MemoryKv::new(), Flash::default(), image());
    let (m, sig) = signed(&img, "1.1.0", 1, &KEY);
    update(&mut kv, &mut flash, &img, &m, &sig).unwrap();
    assert_eq!(ota::boot(&mut kv, &factory()).unwrap(), Boot::Trial(Slot::B, m.version.clone()));
    // It never confirms (could not reach the cloud); the device reboots.
    assert_eq!(ota::boot(&mut kv, &factory()).unwrap(), Boot::Confirmed(Slot::A, factory()));
    let record = BootRecord::load(&mut kv, &factory()).unwrap();
    assert_eq!(record.rolled_back, Some(m.version), "reported as rolled back");
    assert!(record.pending.is_none());
}

pub fn a_cut_download_resumes_where_it_stopped() {
    let (mut kv, mut flash, img) = (MemoryKv::new(), Flash::default(), image());
    let (m, sig) = signed(&img, "1.1.0", 1, &KEY);
    let mut d =
        Download::start(&mut kv, &mut flash, &factory(), TARGET, &trusted(), m.clone(), &sig)
            .unwrap();
    for at in (0..100_000).step_by(4_000) {
        d.chunk(&mut kv, &mut flash, at as u64, &img[at..at + 4_000]).unwrap();
    }
    drop(d); // the connection is cut
    let mut d =
        Download::start(&mut kv, &mut flash, &factory(), TARGET, &trusted(), m.clone(), &sig)
            .unwrap();
    assert_eq!(
        d.written(),
        68_000,
        "resumes from the last recorded point (every 64 KiB), not from 0"
    );
    flash.slots[1].truncate(68_000); // what is past the record is written again
    let mut at = 68_000;
    while at < img.len() {
        let end = (at + 4_000).min(img.len());
        d.chunk(&mut kv, &mut flash, at as u64, &img[at..end]).unwrap();
        at = end;
    }
    d.finish(&mut kv, &factory()).unwrap();
    assert_eq!(flash.slots[1], img);
}

pub fn a_power_cut_at_any_write_leaves_a_bootable_verified_image() {
    let img: Vec<u8> = (0..20_000u32).map(|i| (i % 249) as u8).collect();
    let (m, sig) = signed(&img, "1.1.0", 1, &KEY);
    let good = Sha256::digest(&img);
    let mut cut_somewhere = 0;
    for cut in 0..60 {
        let mut kv = MemoryKv::new();
        let power = Rc::new(Power::default());
        power.cut_after(cut);
        let mut flash = Flash { power: power.clone(), ..Flash::default() };
        // Everything the device does for one update, the power going at write `cut`
        // (flash and key-value writes counted together).
        let outcome = (|| -> Result<(), OtaError> {
            let mut store = Kv { inner: &mut kv, power: power.clone() };
            let mut d = Download::start(
                &mut store,
                &mut flash,
                &factory(),
                TARGET,
                &trusted(),
                m.clone(),
                &sig,
            )?;
            let mut at = 0;
            while at < img.len() {
                let end = (at + 1_000).min(img.len());
                d.chunk(&mut store, &mut flash, at as u64, &img[at..end])?;
                at = end;
            }
            d.finish(&mut store, &factory())?;
            ota::boot(&mut store, &factory())?;
            ota::confirm(&mut store, &factory())?;
            Ok(())
        })();
        if outcome.is_err() {
            cut_somewhere += 1;
        }
        // Power back: the bootloader chooses; the image it boots must be a verified one.
        power.restore();
        let mut store = Kv { inner: &mut kv, power: power.clone() };
        match ota::boot(&mut store, &factory()).unwrap() {
            Boot::Confirmed(Slot::A, v) => assert_eq!(v, factory(), "cut {cut}"),
            Boot::Trial(slot, v) | Boot::Confirmed(slot, v) => {
                assert_eq!(v, m.version, "cut {cut}");
                assert_eq!(
                    Sha256::digest(&flash.slots[idx(slot)]),
                    good,
                    "cut {cut}: boots a verified image"
                );
            }
        }
    }
    assert!(cut_somewhere >= 20, "the power went at every write of the update ({cut_somewhere})");
}

/// The chip's drivers: the boot record in `FlashKv`, the image in
/// `FlashSlots`, both on NOR flash, the power going at every flash write and
/// erase in turn (a word half programmed, a sector half erased). The device
/// comes back, resumes, and in the end boots the verified image on trial.
pub fn an_update_on_flash_slots_survives_a_power_cut_at_every_flash_operation() {
    use ecowatt_core::flashkv::FlashKv;
    use ecowatt_core::flashslots::FlashSlots;

    use crate::flashkv::{Nor, SECTOR};

    let img: Vec<u8> = (0..40_003u32).map(|i| (i.wrapping_mul(31) % 255) as u8).collect();
    let (m, sig) = signed(&img, "1.1.0", 1, &KEY);
    let run = |cut: Option<usize>| {
        let power = Rc::new(Power::default());
        let mut kv = FlashKv::mount(Nor::new(6, power.clone())).unwrap();
        let mut slots = FlashSlots::new(Nor::new(12, power.clone()), Nor::new(12, power.clone()));
        let base = power.writes();
        if let Some(n) = cut {
            power.cut_after(n);
        }
        let mut cuts = 0;
        loop {
            let attempt = update(&mut kv, &mut slots, &img, &m, &sig);
            match attempt {
                Ok(()) => break,
                Err(e) => {
                    assert!(power.is_cut(), "cut at {cut:?}: failed without a cut: {e}");
                    cuts += 1;
                    power.restore();
                    kv = FlashKv::mount(kv.into_flash()).expect("mounts after a cut");
                }
            }
        }
        // The restart; the power may go in the boot decision's own write too.
        let booted = loop {
            match ota::boot(&mut kv, &factory()) {
                Ok(b) => break b,
                Err(_) => {
                    cuts += 1;
                    power.restore();
                    kv = FlashKv::mount(kv.into_flash()).expect("mounts after a cut");
                }
            }
        };
        match booted {
            Boot::Trial(Slot::B, v) => assert_eq!(v, m.version, "cut at {cut:?}"),
            other => panic!("cut at {cut:?}: boots {other:?}"),
        }
        let [_, b] = slots.into_regions();
        assert_eq!(
            Sha256::digest(&b.bytes[..img.len()]),
            Sha256::digest(&img),
            "cut at {cut:?}: slot B holds the signed image"
        );
        assert!(b.bytes[img.len()..img.len().div_ceil(4) * 4].iter().all(|x| *x == 0xFF));
        (power.writes() - base, cuts)
    };
    let (ops, _) = run(None);
    assert!(ops > 10 + img.len() / SECTOR, "sector erases and writes ({ops})");
    let mut cut_somewhere = 0;
    for n in 0..ops {
        cut_somewhere += run(Some(n)).1;
    }
    assert!(cut_somewhere >= ops, "every operation was cut once ({cut_somewhere} of {ops})");
}

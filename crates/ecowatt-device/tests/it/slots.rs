//! A firmware update on the Linux shell's file-backed slots and key-value
//! store, including a cut download resumed after a "reboot" of the agent.

use ecowatt_core::ota::{self, Boot, Download, Slot};
use ecowatt_device::filekv::FileKv;
use ecowatt_device::slots::FileSlots;
use ecowatt_proto::firmware::{Manifest, Version};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

#[test]
fn an_update_on_files_resumes_after_a_restart_and_boots_on_trial() {
    let dir = tempfile::tempdir().unwrap();
    let factory = Version::parse("0.1.0").unwrap();
    let key = SigningKey::from_bytes(&[5; 32]);
    let image: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let manifest = Manifest {
        version: Version::parse("0.2.0").unwrap(),
        size: image.len() as u64,
        sha256: Sha256::digest(&image).into(),
        security_counter: 0,
        target: "linux-x86_64".into(),
        created_ms: 1,
    };
    let sig = key.sign(&manifest.signed_bytes().unwrap()).to_bytes();
    let trusted = ecowatt_proto::firmware::PublicKey::Ed25519(key.verifying_key().to_bytes());

    {
        let mut kv = FileKv::open(&dir.path().join("kv")).unwrap();
        let mut slots = FileSlots::open(&dir.path().join("slots")).unwrap();
        let mut d = Download::start(
            &mut kv,
            &mut slots,
            &factory,
            "linux-x86_64",
            &trusted,
            manifest.clone(),
            &sig,
        )
        .unwrap();
        d.chunk(&mut kv, &mut slots, 0, &image[..150_000]).unwrap();
        // The agent stops here (power, crash, restart).
    }
    let mut kv = FileKv::open(&dir.path().join("kv")).unwrap();
    let mut slots = FileSlots::open(&dir.path().join("slots")).unwrap();
    let mut d = Download::start(
        &mut kv,
        &mut slots,
        &factory,
        "linux-x86_64",
        &trusted,
        manifest.clone(),
        &sig,
    )
    .unwrap();
    let from = d.written() as usize;
    assert_eq!(from, 150_000, "resumes where the recorded progress is");
    d.chunk(&mut kv, &mut slots, from as u64, &image[from..]).unwrap();
    d.finish(&mut kv, &factory).unwrap();
    assert_eq!(
        ota::boot(&mut kv, &factory).unwrap(),
        Boot::Trial(Slot::B, manifest.version.clone())
    );
    assert_eq!(std::fs::read(slots.path(Slot::B)).unwrap(), image);
    ota::confirm(&mut kv, &factory).unwrap();
    assert_eq!(ota::boot(&mut kv, &factory).unwrap(), Boot::Confirmed(Slot::B, manifest.version));
}

//! Firmware updates on A/B slots, as a state machine over a slot trait and the
//! key-value store: verify the signed manifest *before* downloading, stream
//! into the inactive slot while hashing, resume after a cut, check the hash,
//! then mark the new slot pending and boot it on trial. The new image confirms
//! itself after a health check; a reboot without confirmation returns to the
//! old slot. A downgrade or a lower security counter is refused.
//!
//! The boot record is one key-value entry written atomically, so a power cut
//! at any write leaves a bootable device running a verified image.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use sha2::{Digest, Sha256};

use crate::kv::{KeyValue, KvError};

const BOOT_KEY: &str = "ota.boot";
const PROGRESS_KEY: &str = "ota.progress";

/// One of the two image slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    fn byte(self) -> u8 {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
    fn from_byte(b: u8) -> Slot {
        if b == 1 { Slot::B } else { Slot::A }
    }
}

/// Why a slot operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashError(pub String);

/// Image storage: erase a slot, write it front to back, read it back.
pub trait Slots {
    /// Erases `slot` (before any write to it).
    fn erase(&mut self, slot: Slot) -> Result<(), FlashError>;
    /// Writes `data` at `offset` of `slot`.
    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> Result<(), FlashError>;
    /// Reads `buf.len()` bytes at `offset` of `slot`.
    fn read(&mut self, slot: Slot, offset: u64, buf: &mut [u8]) -> Result<(), FlashError>;
}

/// What the device boots, kept in one key-value entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRecord {
    /// The confirmed slot.
    pub active: Slot,
    /// The confirmed image's version.
    pub version: Version,
    /// The highest security counter confirmed.
    pub security_counter: u32,
    /// A verified image waiting for its trial boot, with its version and counter.
    pub pending: Option<(Slot, Version, u32)>,
    /// The pending image has been booted once (a second boot without
    /// confirmation rolls back).
    pub trial_started: bool,
    /// The last update rolled back (reported, then cleared).
    pub rolled_back: Option<Version>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.push(s.len().min(255) as u8);
    b.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
}

/// Reads the boot record's fields in order.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at + n)?;
        self.at += n;
        Some(s)
    }
    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn version(&mut self) -> Option<Version> {
        let n = usize::from(self.byte()?);
        Version::parse(core::str::from_utf8(self.take(n)?).ok()?).ok()
    }
}

impl BootRecord {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.push(self.active.byte());
        put_str(&mut b, &alloc::format!("{}", self.version));
        b.extend_from_slice(&self.security_counter.to_be_bytes());
        match &self.pending {
            Some((slot, v, c)) => {
                b.push(1);
                b.push(slot.byte());
                put_str(&mut b, &alloc::format!("{v}"));
                b.extend_from_slice(&c.to_be_bytes());
            }
            None => b.push(0),
        }
        b.push(u8::from(self.trial_started));
        match &self.rolled_back {
            Some(v) => {
                b.push(1);
                put_str(&mut b, &alloc::format!("{v}"));
            }
            None => b.push(0),
        }
        b
    }

    fn decode(b: &[u8]) -> Option<BootRecord> {
        let mut r = Cursor { b, at: 0 };
        let active = Slot::from_byte(r.byte()?);
        let version = r.version()?;
        let security_counter = r.u32()?;
        let pending = match r.byte()? {
            0 => None,
            _ => Some((Slot::from_byte(r.byte()?), r.version()?, r.u32()?)),
        };
        let trial_started = r.byte()? == 1;
        let rolled_back = match r.byte()? {
            0 => None,
            _ => Some(r.version()?),
        };
        Some(BootRecord { active, version, security_counter, pending, trial_started, rolled_back })
    }

    /// Loads the record (a factory default when none is stored).
    pub fn load(kv: &mut impl KeyValue, factory: &Version) -> Result<BootRecord, KvError> {
        Ok(kv.get(BOOT_KEY)?.and_then(|b| BootRecord::decode(&b)).unwrap_or(BootRecord {
            active: Slot::A,
            version: factory.clone(),
            security_counter: 0,
            pending: None,
            trial_started: false,
            rolled_back: None,
        }))
    }

    fn save(&self, kv: &mut impl KeyValue) -> Result<(), KvError> {
        kv.set(BOOT_KEY, &self.encode())
    }
}

/// What the bootloader decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Boot the confirmed image.
    Confirmed(Slot, Version),
    /// Boot the new image on trial: it must call [`confirm`].
    Trial(Slot, Version),
}

/// The bootloader's decision, made once per boot: a pending image is booted
/// once on trial; if the device comes back without confirming, the old slot
/// boots and the update counts as rolled back.
pub fn boot(kv: &mut impl KeyValue, factory: &Version) -> Result<Boot, KvError> {
    let mut r = BootRecord::load(kv, factory)?;
    match r.pending.clone() {
        Some((slot, v, _)) if !r.trial_started => {
            r.trial_started = true;
            r.save(kv)?;
            Ok(Boot::Trial(slot, v))
        }
        Some((_, v, _)) => {
            r.pending = None;
            r.trial_started = false;
            r.rolled_back = Some(v);
            r.save(kv)?;
            Ok(Boot::Confirmed(r.active, r.version))
        }
        None => Ok(Boot::Confirmed(r.active, r.version)),
    }
}

/// The rollback recorded by [`boot`], if any, cleared once it has been reported.
pub fn take_rolled_back(kv: &mut impl KeyValue, factory: &Version) -> Result<(), KvError> {
    let mut r = BootRecord::load(kv, factory)?;
    if r.rolled_back.take().is_some() {
        r.save(kv)?;
    }
    Ok(())
}

/// The running trial image passed its health check: it becomes the confirmed one.
pub fn confirm(kv: &mut impl KeyValue, factory: &Version) -> Result<(), KvError> {
    let mut r = BootRecord::load(kv, factory)?;
    if let Some((slot, v, c)) = r.pending.take() {
        r.active = slot;
        r.version = v;
        r.security_counter = r.security_counter.max(c);
        r.trial_started = false;
        r.save(kv)?;
    }
    Ok(())
}

/// Why an update was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtaError {
    /// The manifest's signature does not verify against the device's key.
    BadSignature,
    /// Not newer than the running version.
    Downgrade {
        /// Running.
        running: Version,
        /// Offered.
        offered: Version,
    },
    /// Security counter below the device's own.
    SecurityCounter {
        /// The device's.
        own: u32,
        /// The image's.
        offered: u32,
    },
    /// For other hardware.
    WrongTarget,
    /// The downloaded bytes do not match the manifest (nothing was switched).
    HashMismatch,
    /// A chunk arrived for another offset than expected.
    OutOfOrder {
        /// Bytes written so far.
        expected: u64,
    },
    /// More bytes than the manifest's size.
    TooLong,
    /// Flash failed.
    Flash(FlashError),
    /// The key-value store failed.
    Storage(KvError),
}

impl fmt::Display for OtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OtaError::BadSignature => f.write_str("manifest signature does not verify"),
            OtaError::Downgrade { running, offered } => {
                write!(f, "{offered} is not newer than {running}")
            }
            OtaError::SecurityCounter { own, offered } => {
                write!(f, "security counter {offered} below {own}")
            }
            OtaError::WrongTarget => f.write_str("image for other hardware"),
            OtaError::HashMismatch => f.write_str("image does not match its manifest"),
            OtaError::OutOfOrder { expected } => write!(f, "expected the chunk at {expected}"),
            OtaError::TooLong => f.write_str("more bytes than the manifest says"),
            OtaError::Flash(e) => write!(f, "flash: {}", e.0),
            OtaError::Storage(e) => write!(f, "{e}"),
        }
    }
}

impl OtaError {
    /// The protocol's reason code for it (`ecowatt_proto::messages::ota_reason`).
    pub fn reason(&self) -> u8 {
        use ecowatt_proto::messages::ota_reason as r;
        match self {
            OtaError::BadSignature => r::BAD_SIGNATURE,
            OtaError::Downgrade { .. } => r::DOWNGRADE,
            OtaError::SecurityCounter { .. } => r::SECURITY_COUNTER,
            OtaError::WrongTarget => r::WRONG_TARGET,
            OtaError::HashMismatch => r::HASH_MISMATCH,
            OtaError::OutOfOrder { .. } | OtaError::TooLong => r::DOWNLOAD_FAILED,
            OtaError::Flash(_) => r::FLASH,
            OtaError::Storage(_) => r::STORAGE,
        }
    }
}

impl From<FlashError> for OtaError {
    fn from(e: FlashError) -> Self {
        OtaError::Flash(e)
    }
}

impl From<KvError> for OtaError {
    fn from(e: KvError) -> Self {
        OtaError::Storage(e)
    }
}

/// An update in progress: the verified manifest, the slot it goes to, how
/// much is written.
#[derive(Debug, Clone)]
pub struct Download {
    manifest: Manifest,
    slot: Slot,
    written: u64,
    hasher: Sha256,
}

impl Download {
    /// Checks an offer and prepares the inactive slot. Nothing is downloaded
    /// unless the signature verifies and the image is newer, allowed by the
    /// security counter, and for this hardware. If a download of the same
    /// image was cut, it resumes (the written part is re-hashed from flash).
    #[allow(clippy::too_many_arguments)] // each is one fact the decision needs
    pub fn start(
        kv: &mut impl KeyValue,
        slots: &mut impl Slots,
        factory: &Version,
        target: &str,
        trusted_key: &PublicKey,
        manifest: Manifest,
        signature: &[u8],
    ) -> Result<Download, OtaError> {
        trusted_key.verify(&manifest, signature).map_err(|_| OtaError::BadSignature)?;
        let r = BootRecord::load(kv, factory)?;
        if manifest.version <= r.version {
            return Err(OtaError::Downgrade { running: r.version, offered: manifest.version });
        }
        if manifest.security_counter < r.security_counter {
            return Err(OtaError::SecurityCounter {
                own: r.security_counter,
                offered: manifest.security_counter,
            });
        }
        if manifest.target != target {
            return Err(OtaError::WrongTarget);
        }
        let slot = r.active.other();
        let tag = manifest.sha256;
        let mut d = Download { manifest, slot, written: 0, hasher: Sha256::new() };
        // Resume: the same image was being written, up to `offset`.
        if let Some(p) = kv.get(PROGRESS_KEY)? {
            if p.len() == 40 && p[..32] == tag {
                let offset =
                    u64::from_be_bytes(p[32..40].try_into().expect("8 bytes")).min(d.manifest.size);
                let mut buf = [0u8; 1024];
                let mut at = 0;
                while at < offset {
                    let n = (offset - at).min(buf.len() as u64) as usize;
                    slots.read(slot, at, &mut buf[..n])?;
                    d.hasher.update(&buf[..n]);
                    at += n as u64;
                }
                d.written = offset;
                return Ok(d);
            }
        }
        slots.erase(slot)?;
        kv.set(PROGRESS_KEY, &[&tag[..], &0u64.to_be_bytes()].concat())?;
        Ok(d)
    }

    /// Bytes written so far (where a resumed download asks the server to start).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the next chunk; progress is recorded every 64 KiB for resuming.
    pub fn chunk(
        &mut self,
        kv: &mut impl KeyValue,
        slots: &mut impl Slots,
        offset: u64,
        data: &[u8],
    ) -> Result<(), OtaError> {
        if offset != self.written {
            return Err(OtaError::OutOfOrder { expected: self.written });
        }
        if self.written + data.len() as u64 > self.manifest.size {
            return Err(OtaError::TooLong);
        }
        slots.write(self.slot, offset, data)?;
        self.hasher.update(data);
        let before = self.written;
        self.written += data.len() as u64;
        if before / 65_536 != self.written / 65_536 {
            kv.set(
                PROGRESS_KEY,
                &[&self.manifest.sha256[..], &self.written.to_be_bytes()].concat(),
            )?;
        }
        Ok(())
    }

    /// Checks the hash and marks the new slot pending: the next boot tries it.
    pub fn finish(self, kv: &mut impl KeyValue, factory: &Version) -> Result<(), OtaError> {
        let digest: [u8; 32] = self.hasher.finalize().into();
        if self.written != self.manifest.size || digest != self.manifest.sha256 {
            kv.set(PROGRESS_KEY, &[])?;
            return Err(OtaError::HashMismatch);
        }
        let mut r = BootRecord::load(kv, factory)?;
        r.pending =
            Some((self.slot, self.manifest.version.clone(), self.manifest.security_counter));
        r.trial_started = false;
        r.save(kv)?;
        kv.set(PROGRESS_KEY, &[])?;
        Ok(())
    }
}

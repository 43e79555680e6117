//! The agent's side of a firmware update: take an offer from a sync answer,
//! check it, download the image into the inactive slot with range requests
//! (resuming where a cut left it), check the hash, mark the slot pending and
//! ask for a restart. The decisions are `ecowatt_core::ota`'s; this module
//! moves the bytes and keeps the report the sync loop sends.

use std::io::Read;
use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ecowatt_core::kv::KeyValue;
use ecowatt_core::ota::{Download, OtaError, Slots};
use ecowatt_proto::firmware::{PublicKey, Version};
use ecowatt_proto::messages::{OtaReport, OtaState, UpdateOffer, ota_reason, signature_algorithm};

/// Bytes asked of the connection at a time.
pub const CHUNK: usize = 16 * 1024;
/// Attempts at the download (each resumes where the last one stopped).
const ATTEMPTS: u32 = 8;

/// The update as the sync loop sees it.
#[derive(Debug, Default)]
pub struct UpdateStatus {
    /// What goes to the server in the next sync.
    pub report: Option<OtaReport>,
    /// A download is running.
    pub busy: bool,
    /// The image installed; restart once the server heard (or soon anyway).
    pub restart: bool,
    /// Images refused on this boot (by SHA-256): not tried again.
    pub refused: Vec<[u8; 32]>,
}

/// Why a download ended without an installed image.
#[derive(Debug)]
pub enum Ended {
    /// The offer went away (rollout paused or aborted); progress is kept.
    Cancelled,
    /// Refused or failed, with the protocol's reason code.
    Failed(u8, String),
}

impl From<OtaError> for Ended {
    fn from(e: OtaError) -> Self {
        Ended::Failed(e.reason(), e.to_string())
    }
}

/// Checks the offer's signature against the device's trusted keys (of the
/// offer's algorithm) and returns the key that signed it.
pub fn trusted_signer(offer: &UpdateOffer, keys: &[PublicKey]) -> Result<PublicKey, Ended> {
    if keys.is_empty() {
        return Err(Ended::Failed(ota_reason::NO_TRUSTED_KEY, "no trusted firmware key".into()));
    }
    let algorithm_of = |k: &PublicKey| match k {
        PublicKey::Ed25519(_) => signature_algorithm::ED25519,
        PublicKey::Rsa2048(_) => signature_algorithm::RSA2048_SHA256,
    };
    keys.iter()
        .filter(|k| algorithm_of(k) == offer.algorithm)
        .find(|k| k.verify(&offer.manifest, &offer.signature).is_ok())
        .cloned()
        .ok_or_else(|| {
            Ended::Failed(
                ota_reason::BAD_SIGNATURE,
                format!(
                    "no trusted key verifies the manifest (signature algorithm {})",
                    offer.algorithm
                ),
            )
        })
}

/// Where the bytes come from: `GET url` from `offset` on, as a reader.
pub trait Source {
    /// Opens the image from `offset`.
    fn open(&mut self, offset: u64) -> Result<Box<dyn Read + Send>, String>;
}

/// The image over HTTP with `Range: bytes=N-`.
pub struct HttpSource {
    /// The agent.
    pub http: ureq::Agent,
    /// The image URL.
    pub url: String,
}

impl Source for HttpSource {
    fn open(&mut self, offset: u64) -> Result<Box<dyn Read + Send>, String> {
        let resp = self
            .http
            .get(&self.url)
            .config()
            .timeout_global(None)
            .timeout_recv_body(Some(Duration::from_secs(30)))
            .build()
            .header("range", &format!("bytes={offset}-"))
            .call()
            .map_err(|e| format!("{}: {e}", self.url))?;
        let status = resp.status().as_u16();
        if status != 206 && !(status == 200 && offset == 0) {
            return Err(format!("{}: HTTP {status}", self.url));
        }
        Ok(Box::new(resp.into_body().into_reader()))
    }
}

/// What an update needs besides the offer and the bytes.
pub struct Context<'a> {
    /// The version the device was built with (the boot record's default).
    pub factory: &'a Version,
    /// This hardware.
    pub target: &'a str,
    /// Set when the offer goes away.
    pub cancel: &'a AtomicBool,
    /// Receives each progress report.
    pub report: &'a mut dyn FnMut(OtaReport),
}

/// Runs an update to the end: `Ok` once the new slot is pending. `lock_kv`
/// gives the key-value store for one step at a time (the agent's other loops
/// use it in between).
pub fn install<K: KeyValue, G: DerefMut<Target = K>>(
    lock_kv: impl Fn() -> G,
    slots: &mut impl Slots,
    cx: Context<'_>,
    offer: &UpdateOffer,
    key: &PublicKey,
    source: &mut dyn Source,
) -> Result<(), Ended> {
    let m = &offer.manifest;
    let version = m.version.to_string();
    let report = cx.report;
    let mut say = |state, done| {
        report(OtaReport { state, version: version.clone(), done, total: m.size, reason: 0 })
    };
    let mut d = Download::start(
        &mut *lock_kv(),
        slots,
        cx.factory,
        cx.target,
        key,
        m.clone(),
        &offer.signature,
    )?;
    say(OtaState::Downloading, d.written());
    let mut buf = vec![0u8; CHUNK];
    let mut attempt = 0;
    while d.written() < m.size {
        if cx.cancel.load(Ordering::Relaxed) {
            return Err(Ended::Cancelled);
        }
        let mut body = match source.open(d.written()) {
            Ok(b) => b,
            Err(e) => {
                attempt += 1;
                if attempt >= ATTEMPTS {
                    return Err(Ended::Failed(ota_reason::DOWNLOAD_FAILED, e));
                }
                tracing::warn!(error = %e, attempt, "image download failed; retrying");
                std::thread::sleep(Duration::from_millis(250 << attempt.min(5)));
                continue;
            }
        };
        loop {
            if cx.cancel.load(Ordering::Relaxed) {
                return Err(Ended::Cancelled);
            }
            let want = buf.len().min((m.size - d.written()) as usize);
            if want == 0 {
                break;
            }
            let n = match body.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, at = d.written(), "image download cut; resuming");
                    break;
                }
            };
            let at = d.written();
            d.chunk(&mut *lock_kv(), slots, at, &buf[..n])?;
            attempt = 0;
            say(OtaState::Downloading, d.written());
        }
    }
    say(OtaState::Verifying, d.written());
    d.finish(&mut *lock_kv(), cx.factory)?;
    say(OtaState::Installing, m.size);
    Ok(())
}

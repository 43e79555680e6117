//! Firmware updates as the device lives them: an offer comes with a sync; its
//! signature is checked against the trusted keys before a byte is fetched; the
//! image goes into the other slot chunk by chunk (resuming where a cut left
//! it; an image delivered encrypted is decrypted in each fetch's own buffer,
//! [`ecowatt_proto::delivery`], and a chunk that fails authentication ends
//! the update); the hash is checked and the slot marked pending; the device restarts
//! once the server has heard (or after 10 s); the new image boots on trial and
//! confirms itself with its first sync, or the health check runs out and the
//! old one boots again. The slot and boot-record rules are [`crate::ota`]'s.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ecowatt_proto::delivery::{self, Delivery};
use ecowatt_proto::firmware::{PublicKey, Version};
use ecowatt_proto::messages::{
    DELIVERY_ENCRYPTED, OtaReport, OtaState, UpdateOffer, ota_reason, signature_algorithm,
};

use super::{Action, Device, Failure, Note};
use crate::kv::KeyValue;
use crate::ota::{self, Download, Slots};

/// Fetch attempts in a row before the download counts as failed (each
/// resumes where the last stopped).
pub const FETCH_ATTEMPTS: u32 = 8;
/// After installing, the device restarts once the server has heard, or after this long, ms.
pub const RESTART_AFTER_MS: u64 = 10_000;

/// Checks the offer's signature against the device's trusted keys (of the
/// offer's algorithm) and returns the key that signed it, or the
/// `ota_reason` code and words for the refusal.
pub fn trusted_signer(offer: &UpdateOffer, keys: &[PublicKey]) -> Result<PublicKey, (u8, String)> {
    if keys.is_empty() {
        return Err((ota_reason::NO_TRUSTED_KEY, String::from("no trusted firmware key")));
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
            let message = format!(
                "no trusted key verifies the manifest (signature algorithm {})",
                offer.algorithm
            );
            (ota_reason::BAD_SIGNATURE, message)
        })
}

/// A download under way.
#[derive(Debug)]
struct Fetching {
    offer: UpdateOffer,
    download: Download,
    /// The image comes encrypted, chunk by chunk ([`ecowatt_proto::delivery`]).
    delivery: Option<Delivery>,
    /// A fetch is out.
    outstanding: bool,
    /// Failed fetches in a row.
    attempt: u32,
    /// When the next fetch may go.
    retry_at: u64,
}

#[derive(Debug)]
enum State {
    Idle,
    Fetching(Box<Fetching>),
    /// Verified and pending; restarting soon.
    Installed {
        restart_at: u64,
    },
}

/// The update side of the device for one boot.
#[derive(Debug)]
pub(super) struct Update {
    state: State,
    /// Running a new image that has not confirmed itself yet, until this time.
    trial_until: Option<u64>,
    /// What goes to the server with the next sync.
    report: Option<OtaReport>,
    /// Images refused on this boot (by SHA-256): not tried again.
    refused: Vec<[u8; 32]>,
    restarting: bool,
}

impl Update {
    pub(super) fn new(
        running: &Version,
        trial: bool,
        rolled_back: Option<&Version>,
        now_ms: u64,
        health_check_ms: u64,
    ) -> Self {
        let report = if trial {
            Some(OtaReport {
                state: OtaState::Trial,
                version: running.to_string(),
                done: 0,
                total: 0,
                reason: 0,
            })
        } else {
            rolled_back.map(|v| OtaReport {
                state: OtaState::RolledBack,
                version: v.to_string(),
                done: 0,
                total: 0,
                reason: ota_reason::HEALTH_CHECK,
            })
        };
        Update {
            state: State::Idle,
            trial_until: trial.then_some(now_ms + health_check_ms),
            report,
            refused: Vec::new(),
            restarting: false,
        }
    }

    pub(super) fn report(&self) -> Option<&OtaReport> {
        self.report.as_ref()
    }

    /// A download is under way.
    pub(super) fn busy(&self) -> bool {
        matches!(self.state, State::Fetching(_))
    }

    pub(super) fn next_wakeup(&self) -> u64 {
        if self.restarting {
            return u64::MAX;
        }
        let state = match self.state {
            State::Fetching(ref f) if !f.outstanding => f.retry_at,
            State::Installed { restart_at } => restart_at,
            _ => u64::MAX,
        };
        state.min(self.trial_until.unwrap_or(u64::MAX))
    }
}

impl Fetching {
    /// The stream bytes the next fetch asks for: from the written offset in
    /// a clear image; in an encrypted one, the whole chunks from the one that
    /// holds the written offset (as many as fit `per_fetch`, at least one).
    fn next_range(&self, per_fetch: u32) -> (u64, u32) {
        let written = self.download.written();
        match &self.delivery {
            None => {
                (written, (self.offer.manifest.size - written).min(u64::from(per_fetch)) as u32)
            }
            Some(d) => {
                let first = written / d.chunk;
                let step = d.chunk + delivery::TAG_LEN as u64;
                let last = (first + (u64::from(per_fetch) / step).max(1)).min(d.chunks());
                let offset = d.stream_offset(first);
                let end = if last == d.chunks() { d.stream_len() } else { d.stream_offset(last) };
                (offset, (end - offset) as u32)
            }
        }
    }
}

/// Why an encrypted answer gave no plaintext.
enum Undelivered {
    /// Not one whole chunk arrived (fetched again).
    Incomplete,
    /// A chunk failed authentication.
    Refused(delivery::ChunkRefused),
}

/// Decrypts the whole chunks of `bytes` (the stream from chunk
/// `written / chunk`) in place and leaves in it the plaintext from `written`
/// on; a trailing partial chunk is dropped (fetched again).
fn decrypt(d: &Delivery, written: u64, bytes: &mut Vec<u8>) -> Result<(), Undelivered> {
    let first = written / d.chunk;
    let mut skip = (written - first * d.chunk) as usize;
    let (mut at, mut kept, mut index) = (0usize, 0usize, first);
    while index < d.chunks() {
        let need = d.plain_len(index) as usize + delivery::TAG_LEN;
        if bytes.len() - at < need {
            break;
        }
        d.open(index, &mut bytes[at..at + need]).map_err(Undelivered::Refused)?;
        let plain = at + skip..at + need - delivery::TAG_LEN;
        let n = plain.len();
        bytes.copy_within(plain, kept);
        kept += n;
        (at, skip, index) = (at + need, 0, index + 1);
    }
    if index == first {
        return Err(Undelivered::Incomplete);
    }
    bytes.truncate(kept);
    Ok(())
}

fn progress(offer: &UpdateOffer, state: OtaState, done: u64) -> OtaReport {
    let m = &offer.manifest;
    OtaReport { state, version: m.version.to_string(), done, total: m.size, reason: 0 }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    fn restart(&mut self) {
        if !self.update.restarting {
            self.update.restarting = true;
            self.actions.push_back(Action::Restart);
        }
    }

    pub(super) fn advance_update(&mut self, now_ms: u64) {
        if self.update.restarting {
            return;
        }
        if self.update.trial_until.is_some_and(|t| now_ms >= t) {
            self.say(Note::HealthCheckFailed);
            return self.restart();
        }
        match &mut self.update.state {
            State::Installed { restart_at } if now_ms >= *restart_at => self.restart(),
            State::Fetching(f) if !f.outstanding && now_ms >= f.retry_at => {
                let (offset, len) = f.next_range(self.settings.chunk);
                f.outstanding = true;
                self.actions.push_back(Action::Fetch { token: f.offer.token, offset, len });
            }
            _ => {}
        }
    }

    /// A sync went through: the trial image confirms itself, acknowledged
    /// final reports are cleared, an installed image restarts, and an offer
    /// starts (or its absence stops) a download.
    pub(super) fn after_sync(
        &mut self,
        now_ms: u64,
        sent: Option<OtaReport>,
        offer: Option<UpdateOffer>,
        delivery: Option<u8>,
    ) {
        if self.update.trial_until.is_some() {
            match ota::confirm(&mut self.kv, &self.settings.factory) {
                Ok(()) => {
                    self.update.trial_until = None;
                    self.booted.trial = false;
                    let version = self.booted.running.clone();
                    self.update.report = Some(OtaReport {
                        state: OtaState::Succeeded,
                        version: version.to_string(),
                        done: 0,
                        total: 0,
                        reason: 0,
                    });
                    self.say(Note::Confirmed { version });
                }
                // Tried again after the next sync; the health check still runs.
                Err(e) => self.say(Note::StorageFailed("boot record", e)),
            }
            return;
        }
        if let Some(sent) = &sent {
            let final_state =
                matches!(sent.state, OtaState::Succeeded | OtaState::Failed | OtaState::RolledBack);
            if final_state && self.update.report.as_ref() == Some(sent) {
                if sent.state == OtaState::RolledBack {
                    if let Err(e) = ota::take_rolled_back(&mut self.kv, &self.settings.factory) {
                        // Reported again after the next boot; the server takes repeats.
                        self.say(Note::StorageFailed("boot record", e));
                    }
                }
                self.update.report = None;
            }
            if sent.state == OtaState::Installing
                && matches!(self.update.state, State::Installed { .. })
            {
                return self.restart();
            }
        }
        match (offer, &self.update.state) {
            (Some(offer), State::Idle) if !self.update.refused.contains(&offer.manifest.sha256) => {
                self.start_update(now_ms, offer, delivery)
            }
            (None, State::Fetching(_)) => {
                self.update.state = State::Idle;
                self.update.report = None;
                self.say(Note::UpdateWithdrawn);
            }
            _ => {}
        }
    }

    fn start_update(&mut self, now_ms: u64, offer: UpdateOffer, chunk_log2: Option<u8>) {
        let m = &offer.manifest;
        self.say(Note::UpdateOffered { version: m.version.clone(), size: m.size });
        let key = match trusted_signer(&offer, &self.settings.firmware_keys) {
            Ok(k) => k,
            Err((reason, message)) => return self.update_failed(&offer, 0, reason, message),
        };
        let delivery = match chunk_log2 {
            None => None,
            Some(log2) if self.settings.delivery & DELIVERY_ENCRYPTED != 0 => {
                Some(self.session.delivery(&offer.token, log2, m.size))
            }
            Some(_) => {
                let message = String::from("offered encrypted, which this device did not ask for");
                return self.update_failed(&offer, 0, ota_reason::DOWNLOAD_FAILED, message);
            }
        };
        let started = Download::start(
            &mut self.kv,
            &mut self.slots,
            &self.settings.factory,
            &self.settings.target,
            &key,
            m.clone(),
            &offer.signature,
        );
        match started {
            Ok(download) => {
                self.update.report =
                    Some(progress(&offer, OtaState::Downloading, download.written()));
                self.update.state = State::Fetching(Box::new(Fetching {
                    offer,
                    download,
                    delivery,
                    outstanding: false,
                    attempt: 0,
                    retry_at: now_ms,
                }));
                self.finish_if_complete(now_ms);
            }
            Err(e) => self.update_failed(&offer, 0, e.reason(), e.to_string()),
        }
    }

    pub(super) fn on_chunk(&mut self, now_ms: u64, answer: Result<Vec<u8>, Failure>) {
        let State::Fetching(f) = &mut self.update.state else {
            return; // withdrawn while the fetch was out
        };
        if !f.outstanding {
            return;
        }
        f.outstanding = false;
        let asked = u64::from(f.next_range(self.settings.chunk).1);
        let at = f.download.written();
        let bytes = answer.and_then(|b| match b.len() as u64 {
            0 => Err(Failure::unreachable("an empty answer")),
            n if n > asked => Err(Failure::unreachable(format!("{n} bytes for {asked} asked"))),
            _ => Ok(b),
        });
        let bytes = match (bytes, &f.delivery) {
            (Ok(mut b), Some(d)) => match decrypt(d, at, &mut b) {
                Ok(()) => Ok(b),
                Err(Undelivered::Incomplete) => Err(Failure::unreachable("not one whole chunk")),
                Err(Undelivered::Refused(refused)) => {
                    let (offer, message) = (f.offer.clone(), refused.to_string());
                    return self.update_failed(&offer, at, ota_reason::DECRYPT_FAILED, message);
                }
            },
            (other, _) => other,
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                f.attempt += 1;
                let attempt = f.attempt;
                if attempt >= FETCH_ATTEMPTS {
                    let (offer, done) = (f.offer.clone(), f.download.written());
                    let message = e.to_string();
                    return self.update_failed(&offer, done, ota_reason::DOWNLOAD_FAILED, message);
                }
                f.retry_at = now_ms + (250u64 << attempt.min(5));
                return self.say(Note::FetchFailed { error: e.to_string(), attempt });
            }
        };
        if let Err(e) = f.download.chunk(&mut self.kv, &mut self.slots, at, &bytes) {
            let (offer, done) = (f.offer.clone(), f.download.written());
            return self.update_failed(&offer, done, e.reason(), e.to_string());
        }
        f.attempt = 0;
        self.update.report = Some(progress(&f.offer, OtaState::Downloading, f.download.written()));
        self.finish_if_complete(now_ms);
    }

    fn finish_if_complete(&mut self, now_ms: u64) {
        let complete = matches!(&self.update.state,
            State::Fetching(f) if f.download.written() >= f.offer.manifest.size);
        if !complete {
            return;
        }
        let State::Fetching(f) = core::mem::replace(&mut self.update.state, State::Idle) else {
            return;
        };
        let Fetching { offer, download, .. } = *f;
        let size = offer.manifest.size;
        match download.finish(&mut self.kv, &self.settings.factory) {
            Ok(()) => {
                self.update.report = Some(progress(&offer, OtaState::Installing, size));
                self.update.state = State::Installed { restart_at: now_ms + RESTART_AFTER_MS };
                self.say(Note::UpdateInstalled { version: offer.manifest.version.clone() });
            }
            Err(e) => self.update_failed(&offer, size, e.reason(), e.to_string()),
        }
    }

    fn update_failed(&mut self, offer: &UpdateOffer, done: u64, reason: u8, message: String) {
        let m = &offer.manifest;
        self.update.state = State::Idle;
        self.update.report = Some(OtaReport {
            state: OtaState::Failed,
            version: m.version.to_string(),
            done,
            total: m.size,
            reason,
        });
        self.update.refused.push(m.sha256);
        self.say(Note::UpdateFailed { reason, message });
    }
}

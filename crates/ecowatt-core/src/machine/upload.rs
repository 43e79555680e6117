//! Uploads: every upload interval (or at once when a batch is full) the
//! oldest unacknowledged samples, sealed; then more batches while full ones
//! wait (a backlog after an outage; at most [`BATCHES_PER_ROUND`] per round,
//! so fresh samples are reached soon), the remainder with the next interval.
//! Samples leave the log only when the server acknowledges them.

use alloc::string::ToString;
use alloc::vec::Vec;

use ecowatt_proto::codec;
use ecowatt_proto::messages::{MessageType, TelemetryAck, TelemetryUpload};

use super::{Action, Channel, Device, Failure, MAX_ANSWER, Note};
use crate::kv::KeyValue;
use crate::ota::Slots;
use crate::schedule::BATCHES_PER_ROUND;

/// How long an upload may take, ms.
pub const UPLOAD_TIMEOUT_MS: u64 = 30_000;

/// The server's error code for samples stamped by a clock it cannot believe.
const SAMPLE_TIME_REFUSED: &str = "\"sample_time_out_of_range\"";

/// The server's error code for a codec it does not offer.
const CODEC_REFUSED: &str = "\"codec_not_offered\"";

/// The upload outstanding, how many batches this round has left, and the
/// codec in use (v1 until the server offers another; not persisted: after a
/// restart, v1 until the first sync answer).
#[derive(Debug)]
pub(super) struct Upload {
    outstanding: Option<(u64, u64)>,
    round_left: usize,
    codec: u8,
}

impl Default for Upload {
    fn default() -> Self {
        Upload { outstanding: None, round_left: 0, codec: codec::CODEC_V1 }
    }
}

impl Upload {
    pub(super) fn busy(&self) -> bool {
        self.outstanding.is_some()
    }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    /// What a sync request states: the codecs this device may use, unless
    /// that is v1 alone (then it asks as a protocol 1.2 device does).
    pub(super) fn codecs_stated(&self) -> Option<u8> {
        let v1 = 1 << codec::CODEC_V1;
        (self.settings.codecs & !v1 != 0).then_some(self.settings.codecs)
    }

    /// The server's offer in a sync answer (none: it offers v1 only).
    pub(super) fn take_codecs(&mut self, offered: Option<u8>) {
        let offered = offered.unwrap_or(1 << codec::CODEC_V1);
        let newest = codec::newest_common(self.settings.codecs, offered).unwrap_or(codec::CODEC_V1);
        self.use_codec(newest);
    }

    fn use_codec(&mut self, version: u8) {
        if self.upload.codec != version {
            self.upload.codec = version;
            self.say(Note::CodecInUse { version });
        }
    }

    /// The codec uploads use now.
    pub fn codec_in_use(&self) -> u8 {
        self.upload.codec
    }

    pub(super) fn advance_upload(&mut self, now_ms: u64) {
        if self.upload.busy() {
            return;
        }
        if self.upload.round_left == 0 {
            if !self.up.due(now_ms, self.log.len()) {
                return;
            }
            self.upload.round_left = BATCHES_PER_ROUND;
        }
        let (mask, samples) = self.log.batch(self.up.batch_max());
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            self.upload.round_left = 0;
            return;
        };
        let (first_seq, last_seq) = (first.seq, last.seq);
        let version = self.upload.codec;
        let batch = match codec::encode_as(version, mask, &samples).or_else(|e| {
            // v2 takes times and seqs below its limits only; v1 takes any.
            if version == codec::CODEC_V1 {
                Err(e)
            } else {
                codec::encode_as(codec::CODEC_V1, mask, &samples)
            }
        }) {
            Ok(b) => b,
            Err(_) => {
                // Samples the codec cannot take would block every later one.
                self.upload.round_left = 0;
                return self.discard(last_seq, "the codec refused the samples".to_string());
            }
        };
        let upload = TelemetryUpload {
            first_seq,
            count: samples.len() as u16,
            dropped_total: self.log.dropped_total(),
            codec: batch[0],
            batch,
        };
        match self.session.seal(&mut self.kv, MessageType::TelemetryUpload, &upload.encode()) {
            Ok(sealed) => {
                self.upload.round_left -= 1;
                self.upload.outstanding = Some((sealed.counter, last_seq));
                self.actions.push_back(Action::Post {
                    channel: Channel::Upload,
                    body: sealed.bytes,
                    timeout_ms: UPLOAD_TIMEOUT_MS,
                });
            }
            Err(e) => {
                self.upload.round_left = 0;
                self.up.on_failure(now_ms);
                self.say(Note::SealFailed(e));
            }
        }
    }

    pub(super) fn on_upload(&mut self, now_ms: u64, answer: Result<Vec<u8>, Failure>) {
        let Some((counter, last_seq)) = self.upload.outstanding.take() else { return };
        let acked = answer.and_then(|bytes| {
            if bytes.len() > MAX_ANSWER {
                return Err(Failure::unreachable("answer too large"));
            }
            let (_, body) = self
                .session
                .open(counter, &bytes)
                .map_err(|e| Failure::unreachable(e.to_string()))?;
            TelemetryAck::decode(&body).map_err(|e| Failure::unreachable(e.to_string()))
        });
        match acked {
            Ok(ack) => {
                // An acknowledgement for more than was sent is capped: the
                // log never forgets samples the server has not seen.
                let through = ack.acked_through.min(last_seq);
                match self.log.ack(&mut self.kv, through) {
                    Ok(()) => {
                        let backlog = self.log.len();
                        self.say(Note::Uploaded { acked_through: through, backlog });
                    }
                    // Not recorded: the batch goes again and the server,
                    // which has it, acknowledges it again.
                    Err(e) => self.say(Note::StorageFailed("acknowledgement", e)),
                }
                self.up.on_success(now_ms);
                // The server is there: a running lease is renewed (a lapsed
                // one waits for the sync, which may bring a new limit).
                self.heard(now_ms, false);
                // The round goes on while full batches wait (a backlog after
                // an outage); a remainder rides with the next interval.
                if self.log.len() < self.up.batch_max() {
                    self.upload.round_left = 0;
                }
            }
            // The server does not take this codec (its offer changed since the
            // last sync): v1, which every server takes, at once.
            Err(e) if e.message.contains(CODEC_REFUSED) && self.upload.codec != codec::CODEC_V1 => {
                self.session.abandon(counter);
                self.use_codec(codec::CODEC_V1);
            }
            // The server will never take these (stamped by a clock that was
            // wrong): keeping them would block every later sample.
            Err(e) if e.message.contains(SAMPLE_TIME_REFUSED) => {
                self.session.abandon(counter);
                self.discard(last_seq, e.to_string());
            }
            Err(e) => {
                self.session.abandon(counter);
                self.upload.round_left = 0;
                self.up.on_failure(now_ms);
                let backlog = self.log.len();
                self.say(Note::UploadFailed { error: e.to_string(), backlog });
            }
        }
    }

    fn discard(&mut self, last_seq: u64, error: alloc::string::String) {
        match self.log.discard(&mut self.kv, last_seq) {
            Ok(discarded) => self.say(Note::SamplesRefused { error, discarded }),
            Err(k) => {
                self.upload.round_left = 0;
                self.say(Note::StorageFailed("refused samples", k));
            }
        }
    }
}

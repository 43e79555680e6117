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

/// The upload outstanding, and how many batches this round has left.
#[derive(Debug, Default)]
pub(super) struct Upload {
    outstanding: Option<(u64, u64)>,
    round_left: usize,
}

impl Upload {
    pub(super) fn busy(&self) -> bool {
        self.outstanding.is_some()
    }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
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
        let batch = match codec::encode(mask, &samples) {
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
            codec: codec::CODEC_V1,
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

//! The long poll: report the applied config, refused fields, command results
//! and update progress; take back config, commands and update offers.

use alloc::string::ToString;
use alloc::vec::Vec;

use ecowatt_proto::messages::{
    CommandResult, Episode, MessageType, OtaReport, SyncRequest, SyncResponse,
};

use super::limit::limit_write;
use super::{Action, Channel, Device, Failure, MAX_ANSWER, Note};
use crate::control;
use crate::kv::KeyValue;
use crate::ota::Slots;
use crate::schedule::Uploader;

/// While an update is under way its progress goes out this often, ms.
const PROGRESS_POLL_MS: u32 = 2_000;

/// The sync outstanding, if any, and when the next one starts.
#[derive(Debug)]
pub(super) struct Sync {
    outstanding: Option<Outstanding>,
    next_at: u64,
    failures: u32,
}

#[derive(Debug)]
struct Outstanding {
    counter: u64,
    results: Vec<CommandResult>,
    ota: Option<OtaReport>,
    episodes: Vec<Episode>,
}

impl Sync {
    pub(super) fn new(now_ms: u64) -> Self {
        Sync { outstanding: None, next_at: now_ms, failures: 0 }
    }

    pub(super) fn busy(&self) -> bool {
        self.outstanding.is_some()
    }

    pub(super) fn next_at(&self) -> u64 {
        self.next_at
    }
}

impl<K: KeyValue, S: Slots> Device<K, S> {
    pub(super) fn advance_sync(&mut self, now_ms: u64) {
        if self.sync.busy() || now_ms < self.sync.next_at {
            return;
        }
        // A fail-safe or a lease's return under way: its episode rides on
        // this sync rather than on the one after a long poll.
        if self.limit.writing() {
            return;
        }
        let ota = self.update.report().cloned();
        let long_poll = self.settings.long_poll_ms;
        let wait_ms = if ota.is_some() || self.update.busy() {
            long_poll.min(PROGRESS_POLL_MS)
        } else {
            long_poll
        };
        // A server back after failures is heard at once, and a running
        // lease is heard before it ends (a long poll would keep it waiting).
        let wait_ms = if self.sync.failures > 0 {
            0
        } else {
            self.lease_wait_cap(now_ms).map_or(wait_ms, |cap| wait_ms.min(cap))
        };
        let results = self.journal.results();
        let control = self.limit.report();
        let episodes = control.episodes.clone();
        let request = SyncRequest {
            wait_ms,
            applied: Some(self.config),
            rejected: self.rejected.clone(),
            results: results.clone(),
            firmware: self.booted.running.to_string(),
            ota: ota.clone(),
            control: Some(control),
            schedule: Some(self.plan_report(now_ms)),
            codecs: self.codecs_stated(),
            delivery: (self.settings.delivery != 0).then_some(self.settings.delivery),
        };
        match self.session.seal(&mut self.kv, MessageType::SyncRequest, &request.encode()) {
            Ok(sealed) => {
                self.sync.outstanding =
                    Some(Outstanding { counter: sealed.counter, results, ota, episodes });
                self.actions.push_back(Action::Post {
                    channel: Channel::Sync,
                    body: sealed.bytes,
                    timeout_ms: u64::from(long_poll) + 15_000,
                });
            }
            Err(e) => {
                self.say(Note::SealFailed(e));
                self.sync.next_at = now_ms + Uploader::backoff_ms(6);
            }
        }
    }

    pub(super) fn on_sync(&mut self, now_ms: u64, answer: Result<Vec<u8>, Failure>) {
        let Some(sent) = self.sync.outstanding.take() else { return };
        let response = answer.and_then(|bytes| {
            if bytes.len() > MAX_ANSWER {
                return Err(Failure::unreachable("answer too large"));
            }
            let (_, body) = self
                .session
                .open(sent.counter, &bytes)
                .map_err(|e| Failure::unreachable(e.to_string()))?;
            SyncResponse::decode(&body).map_err(|e| Failure::unreachable(e.to_string()))
        });
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                self.session.abandon(sent.counter);
                let backoff = Uploader::backoff_ms(self.sync.failures);
                let retry_in_ms = self.retry_before_lapse(now_ms, backoff);
                self.sync.failures = self.sync.failures.saturating_add(1);
                self.sync.next_at = now_ms + retry_in_ms;
                return self.say(Note::SyncFailed { error: e.to_string(), retry_in_ms });
            }
        };
        if self.sync.failures > 0 {
            self.say(Note::ServerBack);
        }
        self.sync.failures = 0;
        self.sync.next_at = now_ms;
        self.say(Note::ServerTime(response.server_time_ms));
        if let Err(e) = self.journal.acknowledged(&mut self.kv, &sent.results) {
            // They stay pending and are reported again; the server ignores repeats.
            self.say(Note::StorageFailed("command journal", e));
        }
        self.episodes_acknowledged(&sent.episodes);
        self.take_orders(response.control);
        self.take_schedule(response.schedule);
        self.take_codecs(response.codecs);
        let replaced = response.commands.iter().any(|c| limit_write(c.op).is_some());
        self.heard(now_ms, !replaced);
        self.after_sync(now_ms, sent.ota, response.update.clone(), response.delivery);
        if let Some(desired) = response.config {
            self.apply_config(now_ms, &desired);
        }
        self.inverter.enqueue(response.commands);
    }

    fn apply_config(&mut self, now_ms: u64, desired: &ecowatt_proto::messages::ConfigState) {
        let (applied, rejected) = control::apply(&self.config, desired);
        match control::store_config(&mut self.kv, &applied, &rejected) {
            Ok(()) => {
                self.config = applied;
                self.rejected = rejected.clone();
                self.sched.reconfigure(&applied, now_ms);
                self.up.reconfigure(&applied);
                self.say(Note::ConfigApplied { config: applied, rejected });
            }
            // The old config keeps running and is what the next sync reports,
            // so the server offers the new one again.
            Err(e) => self.say(Note::StorageFailed("config", e)),
        }
    }
}

//! When to poll the inverter and when to upload, as plain state driven by the
//! time the shell passes in: no clock, no sleeping here.

use ecowatt_proto::messages::ConfigState;

/// Upload rounds send at most this many batches, so fresh samples are
/// reached soon even behind a long backlog.
pub const BATCHES_PER_ROUND: usize = 16;

/// The poll timer, following the applied config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduler {
    poll_ms: u64,
    next_poll: u64,
}

impl Scheduler {
    /// Polls at once, then every poll interval.
    pub fn new(config: &ConfigState, now_ms: u64) -> Self {
        Scheduler { poll_ms: u64::from(config.poll_interval_ms).max(1), next_poll: now_ms }
    }

    /// Takes a new poll interval; the next poll is no later than one new interval away.
    pub fn reconfigure(&mut self, config: &ConfigState, now_ms: u64) {
        self.poll_ms = u64::from(config.poll_interval_ms).max(1);
        self.next_poll = self.next_poll.min(now_ms + self.poll_ms);
    }

    /// Whether a poll is due at `now_ms`; if so the timer moves on (missed
    /// polls are skipped, not bunched).
    pub fn poll_due(&mut self, now_ms: u64) -> bool {
        if now_ms < self.next_poll {
            return false;
        }
        // Missed polls are skipped in one step, even after a clock that
        // jumped by years (a device setting its clock from the server).
        let missed = (now_ms - self.next_poll) / self.poll_ms + 1;
        self.next_poll += missed * self.poll_ms;
        true
    }

    /// When the next poll is due.
    pub fn next_poll(&self) -> u64 {
        self.next_poll
    }
}

/// The upload timer: every upload interval, or at once when a batch is full;
/// after a failure, exponential backoff (0.5 s doubling to 30 s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploader {
    batch_max: usize,
    upload_ms: u64,
    last_upload: u64,
    /// No upload has succeeded since the start.
    first: bool,
    failures: u32,
    retry_at: u64,
}

impl Uploader {
    /// A timer for batches of `batch_max` samples. The first upload is due
    /// as soon as there is a sample: a device just started (or restarted)
    /// shows its data within seconds, not one upload interval (15 min) later;
    /// then every interval.
    pub fn new(config: &ConfigState, batch_max: usize, now_ms: u64) -> Self {
        Uploader {
            batch_max: batch_max.max(1),
            upload_ms: u64::from(config.upload_interval_ms),
            last_upload: now_ms,
            first: true,
            failures: 0,
            retry_at: 0,
        }
    }

    /// Takes a new upload interval.
    pub fn reconfigure(&mut self, config: &ConfigState) {
        self.upload_ms = u64::from(config.upload_interval_ms);
    }

    /// Samples per batch.
    pub fn batch_max(&self) -> usize {
        self.batch_max
    }

    /// Wait after `failures` failures in a row.
    pub fn backoff_ms(failures: u32) -> u64 {
        (500u64 << failures.min(6)).min(30_000)
    }

    /// Whether to upload now, with `backlog` samples waiting.
    pub fn due(&self, now_ms: u64, backlog: usize) -> bool {
        if backlog == 0 {
            return false;
        }
        if self.failures > 0 {
            return now_ms >= self.retry_at;
        }
        self.first || backlog >= self.batch_max || now_ms >= self.last_upload + self.upload_ms
    }

    /// When an upload is next due with `backlog` samples waiting (`None`: nothing waits).
    pub fn next_due(&self, backlog: usize) -> Option<u64> {
        if backlog == 0 {
            None
        } else if self.failures > 0 {
            Some(self.retry_at)
        } else if self.first || backlog >= self.batch_max {
            Some(0)
        } else {
            Some(self.last_upload + self.upload_ms)
        }
    }

    /// The server acknowledged a batch.
    pub fn on_success(&mut self, now_ms: u64) {
        self.failures = 0;
        self.first = false;
        self.last_upload = now_ms;
    }

    /// An upload failed; samples stay in the log.
    pub fn on_failure(&mut self, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = now_ms + Uploader::backoff_ms(self.failures);
    }

    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

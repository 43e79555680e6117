//! Simulated time: the real clock sped up for demos, or a manual clock for tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch on the simulator's clock.
pub trait SimClock: Send + Sync {
    /// The simulated time now.
    fn now_ms(&self) -> u64;
}

/// The real clock, started at `origin_ms` of simulated time and running
/// `speed` times faster than real time.
#[derive(Debug)]
pub struct ScaledClock {
    started: Instant,
    origin_ms: u64,
    speed: f64,
}

impl ScaledClock {
    /// A clock reading `origin_ms` now and advancing `speed` simulated
    /// milliseconds per real millisecond.
    pub fn new(origin_ms: u64, speed: f64) -> Self {
        ScaledClock { started: Instant::now(), origin_ms, speed: speed.max(0.0) }
    }

    /// The real time, at real speed.
    pub fn real() -> Self {
        ScaledClock::new(unix_now_ms(), 1.0)
    }
}

impl SimClock for ScaledClock {
    fn now_ms(&self) -> u64 {
        let elapsed = self.started.elapsed().as_secs_f64() * 1000.0 * self.speed;
        self.origin_ms + elapsed as u64
    }
}

/// A clock that moves only when told to: for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn new(ms: u64) -> Self {
        ManualClock(AtomicU64::new(ms))
    }

    /// Sets the time.
    pub fn set_ms(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the time forward.
    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl SimClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system's wall-clock time in Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

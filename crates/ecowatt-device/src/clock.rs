//! The agent's clock: what stamps its samples and results and paces its
//! loops (polls, uploads, back-offs, the health check). The system clock in
//! service; a faster one in tests, so that their suites do not wait in real
//! time. Network timeouts stay in real time: they are about the peer.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// A source of time for the agent.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Unix milliseconds now.
    fn now_ms(&self) -> u64;
    /// Completes once `d` of this clock's time has passed.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that starts at the system's time and runs `speed` times as fast.
#[derive(Debug, Clone, Copy)]
pub struct FastClock {
    start: Instant,
    start_ms: u64,
    speed: u32,
}

impl FastClock {
    /// Starts now, `speed` (1..) times as fast as real time.
    pub fn new(speed: u32) -> Self {
        FastClock { start: Instant::now(), start_ms: SystemClock.now_ms(), speed: speed.max(1) }
    }
}

impl Clock for FastClock {
    fn now_ms(&self) -> u64 {
        self.start_ms + self.start.elapsed().as_millis() as u64 * u64::from(self.speed)
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d / self.speed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fast_clock_runs_faster_by_its_speed() {
        let clock = FastClock::new(20);
        let (t0, real) = (clock.now_ms(), Instant::now());
        clock.sleep(Duration::from_millis(2_000)).await;
        let (passed, waited) = (clock.now_ms() - t0, real.elapsed());
        assert!(passed >= 2_000, "{passed} ms of clock time");
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_millis(1_000),
            "{waited:?}"
        );
        let system = SystemClock.now_ms();
        assert!(clock.now_ms() >= system, "starts at the system's time and runs ahead");
    }
}

//! Counters of a listener's connections, for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection ended (or was never admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The peer or the protocol ended it.
    Normal,
    /// A request header was begun and not finished in time.
    HeaderTimeout,
    /// No request came in time.
    IdleTimeout,
    /// The peer stopped reading a response.
    SendTimeout,
    /// Idle the longest when the server was at its connection cap.
    Shed,
    /// Idle the longest of its source when the source was at its cap.
    ShedSource,
    /// Refused (503): the server was full and nothing was idle.
    RefusedFull,
    /// Refused (503): its source was at its cap and nothing of it was idle.
    RefusedSource,
    /// Still open when the shutdown deadline passed.
    ShutdownForced,
}

impl Closed {
    /// Every reason, in the order [`Stats::closed_counts`] lists them.
    pub const ALL: [Closed; 9] = [
        Closed::Normal,
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::SendTimeout,
        Closed::Shed,
        Closed::ShedSource,
        Closed::RefusedFull,
        Closed::RefusedSource,
        Closed::ShutdownForced,
    ];

    /// The label value in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Normal => "normal",
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::SendTimeout => "send_timeout",
            Closed::Shed => "shed",
            Closed::ShedSource => "shed_source",
            Closed::RefusedFull => "refused_full",
            Closed::RefusedSource => "refused_source",
            Closed::ShutdownForced => "shutdown_forced",
        }
    }
}

/// Connection counters of one listener.
#[derive(Debug, Default)]
pub struct Stats {
    open: AtomicU64,
    accepted: AtomicU64,
    closed: [AtomicU64; 9],
}

impl Stats {
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn gone(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, why: Closed, n: u64) {
        let i = Closed::ALL.iter().position(|c| *c == why).expect("listed");
        self.closed[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections admitted since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// How many connections ended (or were refused) for each reason.
    pub fn closed_counts(&self) -> Vec<(Closed, u64)> {
        Closed::ALL.iter().zip(&self.closed).map(|(c, n)| (*c, n.load(Ordering::Relaxed))).collect()
    }

    /// How many ended for `why`.
    pub fn closed_count(&self, why: Closed) -> u64 {
        let i = Closed::ALL.iter().position(|c| *c == why).expect("listed");
        self.closed[i].load(Ordering::Relaxed)
    }
}

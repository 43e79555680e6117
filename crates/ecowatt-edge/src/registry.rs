//! The open connections: admission under the caps (shedding the connection
//! idle the longest to make room) and the watchdog's time limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::Limits;
use crate::conn::{ConnState, now_ms};
use crate::stats::{Closed, Stats};

/// Whether a new connection gets in.
pub(crate) enum Admission {
    /// Yes; it is registered.
    Open(Arc<ConnState>),
    /// No: every connection it could replace is busy. The reason, for the 503.
    Refuse(&'static str),
}

#[derive(Default)]
struct Table {
    conns: HashMap<u64, Arc<ConnState>>,
    per_source: HashMap<IpAddr, usize>,
    next_id: u64,
}

impl Table {
    fn forget(&mut self, conn: &ConnState) -> bool {
        if self.conns.remove(&conn.id).is_none() {
            return false;
        }
        if let Some(n) = self.per_source.get_mut(&conn.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&conn.source);
            }
        }
        true
    }

    /// The connection idle the longest (of `source` if given), if any is idle.
    fn oldest_idle(&self, source: Option<IpAddr>) -> Option<Arc<ConnState>> {
        self.conns
            .values()
            .filter(|c| source.is_none_or(|s| c.source == s) && c.is_idle())
            .min_by_key(|c| c.idle_since())
            .cloned()
    }

    /// Closes `conn` and takes it off the table at once, so the room counts now.
    fn shed(&mut self, conn: &ConnState) {
        conn.close();
        self.forget(conn);
    }
}

/// The table, shared by the accept loop, the watchdog and the connections.
pub(crate) struct Registry {
    table: Mutex<Table>,
    limits: Limits,
    stats: Arc<Stats>,
}

impl Registry {
    pub fn new(limits: Limits, stats: Arc<Stats>) -> Self {
        Registry { table: Mutex::new(Table::default()), limits, stats }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // No panic can leave the table half-changed.
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections open.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Registers a connection from `source`, making room by shedding the
    /// connection idle the longest (of that source when the source is at its
    /// cap), or refuses it when nothing can be shed.
    pub fn admit(&self, source: IpAddr) -> Admission {
        let mut t = self.lock();
        if t.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source {
            match t.oldest_idle(Some(source)) {
                Some(old) => {
                    t.shed(&old);
                    self.stats.closed(Closed::ShedSource, 1);
                }
                None => {
                    self.stats.closed(Closed::RefusedSource, 1);
                    return Admission::Refuse("too many connections from your address");
                }
            }
        }
        if t.conns.len() >= self.limits.max_connections {
            match t.oldest_idle(None) {
                Some(old) => {
                    t.shed(&old);
                    self.stats.closed(Closed::Shed, 1);
                }
                None => {
                    self.stats.closed(Closed::RefusedFull, 1);
                    return Admission::Refuse("the server is at its connection limit");
                }
            }
        }
        t.next_id += 1;
        let conn = Arc::new(ConnState::new(t.next_id, source));
        t.conns.insert(conn.id, Arc::clone(&conn));
        *t.per_source.entry(source).or_default() += 1;
        self.stats.opened();
        Admission::Open(conn)
    }

    /// Frees a descriptor when `accept` ran out of them.
    pub fn shed_for_descriptor(&self) {
        let mut t = self.lock();
        if let Some(old) = t.oldest_idle(None) {
            t.shed(&old);
            self.stats.closed(Closed::Shed, 1);
        }
    }

    /// A connection's task ended.
    pub fn remove(&self, conn: &ConnState) {
        if self.lock().forget(conn) {
            self.stats.closed(Closed::Normal, 1);
        }
        self.stats.gone();
    }

    /// Closes every connection past a time limit: a request header begun
    /// and not finished within `header_timeout`, an idle wait longer than
    /// `idle_timeout`, a write blocked longer than `send_timeout`.
    pub fn watch(&self) {
        let now = now_ms();
        let over = |since: u64, limit: std::time::Duration| {
            since != 0 && now.saturating_sub(since) > limit.as_millis() as u64
        };
        let mut t = self.lock();
        let mut late = Vec::new();
        for c in t.conns.values() {
            if c.is_closing() {
                continue;
            }
            let reason = if over(c.write_blocked(), self.limits.send_timeout) {
                Some(Closed::SendTimeout)
            } else if !c.is_idle() {
                None
            } else if c.header_started() != 0 {
                over(c.header_started(), self.limits.header_timeout)
                    .then_some(Closed::HeaderTimeout)
            } else {
                over(c.idle_since(), self.limits.idle_timeout).then_some(Closed::IdleTimeout)
            };
            if let Some(reason) = reason {
                late.push((Arc::clone(c), reason));
            }
        }
        for (c, reason) in late {
            tracing::debug!(source = %c.source, ?reason, "closing a connection past its time limit");
            t.shed(&c);
            self.stats.closed(reason, 1);
        }
    }
}

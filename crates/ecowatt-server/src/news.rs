//! News for long-polling devices: a waiter per device name, woken when a
//! write that concerns the device has committed ([`crate::db::WriteTx::announce`]),
//! and the server's shutdown, which ends every wait. On PostgreSQL the write
//! also sends `NOTIFY ecowatt_push, '<device>'` in its transaction, and
//! every server process listens (`run.rs`), so a device long-polling one
//! process hears of a command queued through another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The PostgreSQL channel carrying device names.
pub const CHANNEL: &str = "ecowatt_push";

/// The PostgreSQL channel saying that some command's status changed (its
/// payload is empty: the waiters re-read their own command).
pub const COMMANDS_CHANNEL: &str = "ecowatt_commands";

/// Waiters by device name, and the server's shutdown.
#[derive(Default)]
pub struct News {
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    stopping: AtomicBool,
    stop: Notify,
    commands: Notify,
    /// Announcements so far, by device: what a copy kept in memory
    /// ([`News::stamp`]) compares against to know it is still the store's.
    generations: Mutex<HashMap<String, u64>>,
    /// Bumped whenever announcements may have been missed (another
    /// server's, while the PostgreSQL listener was away).
    epoch: AtomicU64,
    /// Another server's announcements may be missed (PostgreSQL, listener away).
    deaf: AtomicBool,
    /// Telemetry stored by this server, for integrations (MQTT); `None`
    /// until one subscribes.
    telemetry: Mutex<Option<tokio::sync::broadcast::Sender<Telemetry>>>,
    /// Devices whose config, commands or results changed, for integrations;
    /// `None` until one subscribes.
    changes: Mutex<Option<tokio::sync::broadcast::Sender<Changed>>>,
}

/// A device whose config or commands changed (by name when the writer
/// knew it, else by numeric id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Changed {
    /// By name.
    Name(String),
    /// By numeric id.
    Id(i64),
}

/// A telemetry batch this server stored: the device's numeric id and the
/// batch as encoded (codec v1).
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// The device's numeric id.
    pub device_id: i64,
    /// The encoded batch.
    pub data: Arc<[u8]>,
}

/// Batches an integration may fall behind by before it misses some.
pub const TELEMETRY_BACKLOG: usize = 4096;

/// Where a device's announcements stood when a copy of its state was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    epoch: u64,
    generation: u64,
}

impl News {
    /// The stamp to keep with a copy of `device`'s state read after this
    /// call: the copy is current while [`News::stamp`] gives the same.
    /// `None` while announcements may be missed.
    pub fn stamp(&self, device: &str) -> Option<Stamp> {
        let generation =
            self.generations.lock().expect("news lock").get(device).copied().unwrap_or(0);
        let epoch = self.epoch.load(Ordering::SeqCst);
        (!self.deaf.load(Ordering::SeqCst)).then_some(Stamp { epoch, generation })
    }

    /// Whether other servers' announcements reach this one (on PostgreSQL:
    /// while its listener is connected); every stamp taken before changes.
    pub fn set_hearing(&self, hearing: bool) {
        self.deaf.store(!hearing, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The waiter of `device` (created on first use).
    pub fn waiter(&self, device: &str) -> Arc<Notify> {
        let mut map = self.waiters.lock().expect("news lock");
        Arc::clone(map.entry(device.to_owned()).or_default())
    }

    /// Wakes every request long-polling for `device`, and outdates the
    /// copies of its state kept in memory.
    pub fn device(&self, device: &str) {
        *self.generations.lock().expect("news lock").entry(device.to_owned()).or_default() += 1;
        if let Some(s) = self.changes.lock().expect("news lock").as_ref() {
            let _ = s.send(Changed::Name(device.to_owned()));
        }
        let waiter = self.waiters.lock().expect("news lock").get(device).cloned();
        if let Some(w) = waiter {
            w.notify_waiters();
        }
    }

    /// Receives every batch this server stores from now on.
    pub fn subscribe_telemetry(&self) -> tokio::sync::broadcast::Receiver<Telemetry> {
        let mut slot = self.telemetry.lock().expect("news lock");
        slot.get_or_insert_with(|| tokio::sync::broadcast::channel(TELEMETRY_BACKLOG).0).subscribe()
    }

    /// Stored batches, after their commit; `batches` is called only when an
    /// integration listens (storing a batch copies nothing otherwise).
    pub fn telemetry<I: IntoIterator<Item = Telemetry>>(&self, batches: impl FnOnce() -> I) {
        let slot = self.telemetry.lock().expect("news lock");
        if let Some(s) = slot.as_ref().filter(|s| s.receiver_count() > 0) {
            for b in batches() {
                let _ = s.send(b);
            }
        }
    }

    /// Receives the devices whose config or commands change from now on
    /// (this server's writes and, on PostgreSQL, other servers' announcements).
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        let mut slot = self.changes.lock().expect("news lock");
        slot.get_or_insert_with(|| tokio::sync::broadcast::channel(TELEMETRY_BACKLOG).0).subscribe()
    }

    /// Devices whose commands' results this server recorded.
    pub fn results_of(&self, devices: impl IntoIterator<Item = Changed>) {
        if let Some(s) = self.changes.lock().expect("news lock").as_ref() {
            for d in devices {
                let _ = s.send(d);
            }
        }
    }

    /// Some command's status changed (a result, a delivery, a confirmation,
    /// a cancellation, an expiry): operators waiting on one re-read it.
    pub fn commands_changed(&self) {
        self.commands.notify_waiters();
    }

    /// Completes at the next [`News::commands_changed`] after the call (the
    /// caller reads its command after calling, before awaiting: a change in
    /// between is not missed).
    pub fn command_change(&self) -> impl std::future::Future<Output = ()> + '_ {
        let mut changed = Box::pin(self.commands.notified());
        changed.as_mut().enable();
        changed
    }

    /// The server is stopping: every long poll answers now, and new ones do
    /// not wait.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    /// Completes when [`News::stop`] has been called.
    pub async fn stopping(&self) {
        let stopped = self.stop.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        stopped.await;
    }
}

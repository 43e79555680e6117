//! News for long-polling devices: a waiter per device name, woken when a
//! write that concerns the device has committed ([`crate::db::WriteTx::announce`]),
//! and the server's shutdown, which ends every wait. On PostgreSQL the write
//! also sends `NOTIFY ecowatt_push, '<device>'` in its transaction, and
//! every server process listens (`run.rs`), so a device long-polling one
//! process hears of a command queued through another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
}

impl News {
    /// The waiter of `device` (created on first use).
    pub fn waiter(&self, device: &str) -> Arc<Notify> {
        let mut map = self.waiters.lock().expect("news lock");
        Arc::clone(map.entry(device.to_owned()).or_default())
    }

    /// Wakes every request long-polling for `device`.
    pub fn device(&self, device: &str) {
        let waiter = self.waiters.lock().expect("news lock").get(device).cloned();
        if let Some(w) = waiter {
            w.notify_waiters();
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

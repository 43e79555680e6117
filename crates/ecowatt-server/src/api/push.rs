//! Push to long-polling devices: a waiter per device name, woken when a command
//! is queued or its desired config changes. On PostgreSQL the change also
//! sends `NOTIFY ecowatt_push, '<device>'` in its transaction, and every
//! server process listens, so a device long-polling one process hears of a
//! command queued through another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The PostgreSQL channel carrying device names.
pub const CHANNEL: &str = "ecowatt_push";

/// Waiters by device name, and the server's shutdown, which ends every wait.
#[derive(Default)]
pub struct Push {
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    stopping: AtomicBool,
    stop: Notify,
}

impl Push {
    /// The waiter of `device` (created on first use).
    pub fn waiter(&self, device: &str) -> Arc<Notify> {
        let mut map = self.waiters.lock().expect("push lock");
        Arc::clone(map.entry(device.to_owned()).or_default())
    }

    /// The server is stopping: every long poll answers now, and new ones do
    /// not wait.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    /// Completes when [`Push::stop`] has been called.
    pub async fn stopping(&self) {
        let stopped = self.stop.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        stopped.await;
    }

    /// Wakes every request long-polling for `device`.
    pub fn notify(&self, device: &str) {
        let waiter = self.waiters.lock().expect("push lock").get(device).cloned();
        if let Some(w) = waiter {
            w.notify_waiters();
        }
    }
}

/// Forwards PostgreSQL notifications until the task is dropped: device news
/// to `push`, other servers' key changes to the store's copy of the keys
/// (which counts as complete only while this listens: `store/keys.rs`).
pub async fn listen_postgres(url: String, push: Arc<Push>, store: Arc<dyn crate::store::Store>) {
    let keys = crate::store::keys::CHANNEL;
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => {
                let listening = listener.listen_all([CHANNEL, keys]).await;
                match listening {
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                    Ok(()) => {
                        if let Err(e) = store.reload_keys(true).await {
                            tracing::warn!(error = %e, "cannot reload the devices' keys");
                        }
                        loop {
                            match listener.recv().await {
                                Ok(n) if n.channel() == keys => {
                                    let id = n.payload().parse().unwrap_or(-1);
                                    if let Err(e) = store.refresh_keys(id).await {
                                        // Start over: the reload after reconnecting
                                        // makes the copy whole again.
                                        tracing::warn!(error = %e, "cannot read a device's new keys");
                                        break;
                                    }
                                }
                                Ok(n) => push.notify(n.payload()),
                                Err(e) => {
                                    tracing::warn!(error = %e, "push listener lost its connection");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "push listener cannot connect"),
        }
        store.keys_unheard();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

//! Push to long-polling devices: a waiter per device name, woken when a command
//! is queued or its desired config changes. On PostgreSQL the change also
//! sends `NOTIFY ecowatt_push, '<device>'` in its transaction, and every
//! server process listens, so a device long-polling one process hears of a
//! command queued through another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The PostgreSQL channel carrying device names.
pub const CHANNEL: &str = "ecowatt_push";

/// Waiters by device name.
#[derive(Default)]
pub struct Push {
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Push {
    /// The waiter of `device` (created on first use).
    pub fn waiter(&self, device: &str) -> Arc<Notify> {
        let mut map = self.waiters.lock().expect("push lock");
        Arc::clone(map.entry(device.to_owned()).or_default())
    }

    /// Wakes every request long-polling for `device`.
    pub fn notify(&self, device: &str) {
        let waiter = self.waiters.lock().expect("push lock").get(device).cloned();
        if let Some(w) = waiter {
            w.notify_waiters();
        }
    }
}

/// Forwards PostgreSQL notifications to `push` until the task is dropped.
pub async fn listen_postgres(url: String, push: Arc<Push>) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => {
                if let Err(e) = listener.listen(CHANNEL).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    loop {
                        match listener.recv().await {
                            Ok(n) => push.notify(n.payload()),
                            Err(e) => {
                                tracing::warn!(error = %e, "push listener lost its connection");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "push listener cannot connect"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

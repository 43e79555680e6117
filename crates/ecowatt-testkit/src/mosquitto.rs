//! MQTT fixtures: a subscriber that keeps every message it sees, and a
//! Mosquitto of a test's own with TLS (one port with a certificate from a
//! private CA made here, for `localhost` and `127.0.0.1`; one plain port for
//! the test's subscriber; a second CA that did not sign it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use ecowatt_edge::tls::{Issue, issue, new_ca};

/// Every message a [`subscribe`]r saw, by topic, in order.
pub type Seen = Arc<Mutex<HashMap<String, Vec<Vec<u8>>>>>;

/// A subscriber to `filters` on the broker at 127.0.0.1:`port` (keep the
/// client alive while it should listen).
pub async fn subscribe(port: u16, filters: &[String]) -> (AsyncClient, Seen) {
    let id =
        format!("ewtest-sub-{}-{}-{port}", std::process::id(), ecowatt_formats::time::now_ms());
    let (client, mut events) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 100);
    for f in filters {
        client.subscribe(f, QoS::AtLeastOnce).await.expect("the subscription queues");
    }
    let seen: Seen = Arc::default();
    let into = seen.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let mut seen = into.lock().unwrap_or_else(|e| e.into_inner());
                seen.entry(p.topic.clone()).or_default().push(p.payload.to_vec());
            }
        }
    });
    (client, seen)
}

/// The last message on `topic`.
pub fn last(seen: &Seen, topic: &str) -> Option<Vec<u8>> {
    seen.lock().unwrap_or_else(|e| e.into_inner()).get(topic).and_then(|v| v.last().cloned())
}

/// The last message on `topic` as JSON (none when empty or not JSON).
pub fn last_json(seen: &Seen, topic: &str) -> Option<serde_json::Value> {
    last(seen, topic).filter(|b| !b.is_empty()).and_then(|b| serde_json::from_slice(&b).ok())
}

/// The last message on `topic` as text.
pub fn last_text(seen: &Seen, topic: &str) -> Option<String> {
    last(seen, topic).and_then(|b| String::from_utf8(b).ok())
}

/// Waits until `f` gives something (at most 30 s, then fails naming `what`).
pub async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The running broker (killed when dropped) and its files.
pub struct TlsBroker {
    child: std::process::Child,
    /// The TLS listener's port.
    pub tls_port: u16,
    /// The plain listener's port.
    pub plain_port: u16,
    /// The CA that signed the broker's certificate (PEM file).
    pub ca: PathBuf,
    /// Another CA (PEM file), which did not.
    pub other_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsBroker {
    /// Starts one; `Err` says why it could not (no `mosquitto` binary).
    pub fn start() -> Result<TlsBroker, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let d = dir.path();
        let (ca, other) = (new_ca(2)?, new_ca(2)?);
        let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let broker = issue(&ca.key, &Issue::for_days(&hosts, 2))?;
        for (file, text) in [
            ("ca.pem", &ca.cert),
            ("other-ca.pem", &other.cert),
            ("broker.pem", &broker.cert),
            ("broker.key", &broker.key),
        ] {
            std::fs::write(d.join(file), text).map_err(|e| e.to_string())?;
        }
        let (ca, other_ca) = (d.join("ca.pem"), d.join("other-ca.pem"));
        // Free ports can be taken by someone else before mosquitto binds them
        // (then it exits): try again with others.
        for _ in 0..3 {
            // Both held at once, so the two differ.
            let (a, b) = (bind_any()?, bind_any()?);
            let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port());
            let (tls_port, plain_port) =
                (port(&a).map_err(|e| e.to_string())?, port(&b).map_err(|e| e.to_string())?);
            drop((a, b));
            // `user root`: started as root, mosquitto would drop to its own user and
            // not read the test's key (as another user the line has no effect).
            let conf = format!(
                "user root\nallow_anonymous true\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/broker.pem\nkeyfile {d}/broker.key\nlistener {plain_port} 127.0.0.1\n",
                d = d.display()
            );
            std::fs::write(d.join("mosquitto.conf"), conf).map_err(|e| e.to_string())?;
            let mut child = std::process::Command::new("mosquitto")
                .args(["-c", &d.join("mosquitto.conf").display().to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start mosquitto: {e}"))?;
            let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
            let t0 = Instant::now();
            while !(up(tls_port) && up(plain_port)) && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(100));
            // Still running, with both listeners: it is ours.
            if matches!(child.try_wait(), Ok(None)) && up(tls_port) && up(plain_port) {
                return Ok(TlsBroker { child, tls_port, plain_port, ca, other_ca, _dir: dir });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err("mosquitto did not start (three tries)".into())
    }
}

fn bind_any() -> Result<std::net::TcpListener, String> {
    std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())
}

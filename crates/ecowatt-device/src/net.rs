//! The device protocol's HTTP side on Linux: the machine's sealed POSTs and
//! image range fetches, carried out with a blocking client (call from a
//! blocking thread), over `http://` or `https://` ([`trust`]: the public
//! roots, or a private CA's certificate file).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ecowatt_core::machine::{Action, Channel, Event, Failure};

/// The server, as the device reaches it.
#[derive(Clone)]
pub struct Net {
    http: ureq::Agent,
    base: String,
    /// `?device=ID&key=VERSION` on image fetches (who asks, for an image
    /// encrypted for one device).
    asker: String,
}

/// Which certificates an `https://` server may present: signed by a CA of
/// the public web (Mozilla's roots, compiled in) when `ca_file` is `None`,
/// else only by the CA(s) in that PEM file (a private PKI, such as the one
/// `ecowatt tls init` makes).
pub fn trust(ca_file: Option<&Path>) -> Result<ureq::tls::TlsConfig, String> {
    use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
    let Some(path) = ca_file else { return Ok(TlsConfig::default()) };
    let pem = std::fs::read(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c.to_owned()),
            Ok(_) => {}
            Err(e) => return Err(format!("CA file {}: {e}", path.display())),
        }
    }
    if certs.is_empty() {
        return Err(format!("CA file {}: no PEM certificate in it", path.display()));
    }
    let _: &[Certificate<'static>] = &certs;
    Ok(TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(certs))).build())
}

impl Net {
    /// A client for the server at `base` (`http://host:port` or `https://…`)
    /// trusting what `tls` trusts ([`trust`]).
    pub fn new(base: &str, tls: ureq::tls::TlsConfig) -> Self {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .build()
            .into();
        Net { http, base: base.trim_end_matches('/').to_owned(), asker: String::new() }
    }

    /// Image fetches say they come from device `device_id` holding key
    /// version `key_version`.
    pub fn asking_as(mut self, device_id: u32, key_version: u32) -> Self {
        self.asker = format!("?device={device_id}&key={}", key_version as u8);
        self
    }

    /// Carries out a [`Action::Post`] or [`Action::Fetch`] and returns the
    /// event that answers it; `None` for any other action.
    pub fn carry(&self, action: &Action) -> Option<Event> {
        match action {
            Action::Post { channel, body, timeout_ms } => {
                let answer = self.post(*channel, body, *timeout_ms);
                Some(Event::Server { channel: *channel, answer })
            }
            Action::Fetch { token, offset, len } => {
                Some(Event::Chunk(self.fetch(token, *offset, *len)))
            }
            _ => None,
        }
    }

    /// POSTs a sealed envelope: the answer's body on 200.
    pub fn post(&self, channel: Channel, body: &[u8], timeout_ms: u64) -> Result<Vec<u8>, Failure> {
        let url = format!("{}{}", self.base, channel.path());
        let resp = self
            .http
            .post(&url)
            .config()
            .timeout_global(Some(Duration::from_millis(timeout_ms)))
            .build()
            .header("content-type", "application/octet-stream")
            .send(body);
        answer(&url, resp, 200)
    }

    /// GETs `len` bytes of the offered image from `offset` with a `Range` request.
    pub fn fetch(&self, token: &[u8; 16], offset: u64, len: u32) -> Result<Vec<u8>, Failure> {
        let token = ecowatt_proto::hex::encode_upper(token);
        let url = format!("{}/api/v1/device/firmware/{token}{}", self.base, self.asker);
        let last = offset + u64::from(len.max(1)) - 1;
        let resp = self
            .http
            .get(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .header("range", &format!("bytes={offset}-{last}"))
            .call();
        answer(&url, resp, 206)
    }
}

fn answer(
    url: &str,
    resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ok: u16,
) -> Result<Vec<u8>, Failure> {
    let mut resp = resp.map_err(|e| Failure::unreachable(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(ecowatt_core::machine::MAX_ANSWER as u64 * 4)
        .read_to_vec()
        .map_err(|e| Failure::unreachable(format!("{url}: {e}")))?;
    if status == ok {
        Ok(bytes)
    } else {
        let message = format!("{url}: {}", String::from_utf8_lossy(&bytes));
        Err(Failure { status: Some(status), message })
    }
}

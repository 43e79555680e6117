//! Inverter transports and the URL syntax that selects them:
//!
//! | URL | transport |
//! |---|---|
//! | `http://host:port` | [`SimHttp`]: the Inverter SIM HTTP API |
//! | `tcp://host[:port]` | [`ModbusTcp`]: Modbus TCP (port 502 unless given) |
//! | `serial:/dev/ttyUSB0[?baud=9600&parity=none&stop=1]` | [`SerialRtu`]: RTU on a serial line |

mod http;
mod serial;
mod tcp;

use std::time::Duration;

pub use ecowatt_core::link::{Transport, TransportError};
pub use http::SimHttp;
pub use serial::{Parity, SerialRtu, SerialSettings};
pub use tcp::ModbusTcp;

/// How long to wait for an answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a transport could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL's scheme is none of `http`, `tcp`, `serial`.
    #[error(
        "unsupported inverter URL {url:?}: use http://host:port (Inverter SIM API), tcp://host:port (Modbus TCP) or serial:/dev/ttyUSB0?baud=9600 (RTU)"
    )]
    UnsupportedScheme {
        /// The URL given.
        url: String,
    },
    /// `https://` URLs need TLS, which this build does not include.
    #[error("https is not supported yet for the inverter link; use http://")]
    HttpsUnsupported,
    /// The URL is malformed.
    #[error("invalid inverter URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The serial port could not be opened.
    #[error("cannot open serial port {path}: {source}")]
    Serial {
        /// The device path.
        path: String,
        /// The driver's error.
        source: serialport::Error,
    },
}

/// Options that apply to every transport.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Wait this long for each answer.
    pub timeout: Duration,
    /// The SIM API key (sent raw in `Authorization`), for `http://` URLs.
    pub api_key: Option<String>,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions { timeout: DEFAULT_TIMEOUT, api_key: None }
    }
}

/// Opens the transport a URL names.
pub fn open(url: &str, options: &LinkOptions) -> Result<Box<dyn Transport + Send>, OpenError> {
    let invalid =
        |reason: &str| OpenError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
    if url.starts_with("http://") {
        return Ok(Box::new(SimHttp::new(url, options.api_key.clone(), options.timeout)));
    }
    if url.starts_with("https://") {
        return Err(OpenError::HttpsUnsupported);
    }
    if let Some(rest) = url.strip_prefix("tcp://") {
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains('/') {
            return Err(invalid("expected tcp://host[:port]"));
        }
        let addr =
            if has_port(host_port) { host_port.to_owned() } else { format!("{host_port}:502") };
        return Ok(Box::new(ModbusTcp::new(addr, options.timeout)));
    }
    if let Some(rest) = url.strip_prefix("serial:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(invalid("expected serial:/dev/ttyUSB0"));
        }
        let settings = SerialSettings::parse_query(query).map_err(|r| invalid(&r))?;
        let port = SerialRtu::open(path, &settings, options.timeout)
            .map_err(|source| OpenError::Serial { path: path.to_owned(), source })?;
        return Ok(Box::new(port));
    }
    Err(OpenError::UnsupportedScheme { url: url.to_owned() })
}

/// Whether `host_port` ends in `:port` (IPv6 literals are bracketed).
fn has_port(host_port: &str) -> bool {
    match host_port.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_transports_or_say_what_is_wrong() {
        let o = LinkOptions::default();
        assert!(open("http://127.0.0.1:8080", &o).is_ok());
        assert!(open("tcp://127.0.0.1:1502", &o).is_ok());
        assert!(matches!(open("https://x", &o), Err(OpenError::HttpsUnsupported)));
        assert!(matches!(open("ftp://x", &o), Err(OpenError::UnsupportedScheme { .. })));
        assert!(matches!(open("tcp://", &o), Err(OpenError::InvalidUrl { .. })));
        assert!(matches!(open("serial:", &o), Err(OpenError::InvalidUrl { .. })));
        assert!(matches!(
            open("serial:/dev/ttyS0?baud=fast", &o),
            Err(OpenError::InvalidUrl { .. })
        ));
        assert!(matches!(open("serial:/dev/does-not-exist", &o), Err(OpenError::Serial { .. })));
        assert!(has_port("localhost:502") && has_port("[::1]:502"));
        assert!(!has_port("localhost") && !has_port("::1"));
    }
}

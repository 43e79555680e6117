//! The course's Inverter SIM HTTP API: frames as uppercase hex in JSON,
//! `/api/inverter/read` for `0x03`, `/api/inverter/write` for `0x06`, the raw
//! API key in `Authorization`.

use std::time::Duration;

use ecowatt_core::link::{Transport, TransportError};
use ecowatt_proto::hex;
use ecowatt_proto::modbus::WRITE_SINGLE_REGISTER;
use serde::Deserialize;

/// A transport over the Inverter SIM HTTP API.
pub struct SimHttp {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
}

#[derive(Deserialize)]
struct FrameBody {
    #[serde(default)]
    frame: String,
}

impl SimHttp {
    /// A client of the SIM API at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, api_key: Option<String>, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        SimHttp { agent, base: base.trim_end_matches('/').to_owned(), api_key }
    }
}

impl Transport for SimHttp {
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        let endpoint = match request.get(1) {
            Some(&WRITE_SINGLE_REGISTER) => "write",
            _ => "read",
        };
        let url = format!("{}/api/inverter/{endpoint}", self.base);
        let mut call = self.agent.post(&url);
        if let Some(key) = &self.api_key {
            call = call.header("Authorization", key);
        }
        let body = serde_json::json!({ "frame": hex::encode_upper(request) });
        let mut response = call.send_json(&body).map_err(|e| match e {
            ureq::Error::Timeout(_) => TransportError::Timeout,
            other => TransportError::Io(format!("{url}: {other}")),
        })?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| match e {
            ureq::Error::Timeout(_) => TransportError::Timeout,
            other => TransportError::Io(format!("{url}: reading the answer: {other}")),
        })?;
        match status {
            200 => {}
            401 | 403 => {
                return Err(TransportError::Refused(format!(
                    "{url} refused the API key (HTTP {status}): {text}"
                )));
            }
            400..=499 => {
                return Err(TransportError::Refused(format!("{url}: HTTP {status}: {text}")));
            }
            _ => return Err(TransportError::Io(format!("{url}: HTTP {status}: {text}"))),
        }
        // A blank answer (empty body or empty frame) is the SIM's "no answer".
        if text.trim().is_empty() {
            return Err(TransportError::Timeout);
        }
        let FrameBody { frame } = serde_json::from_str(&text)
            .map_err(|e| TransportError::Io(format!("{url}: answer is not SIM JSON: {e}")))?;
        if frame.is_empty() {
            return Err(TransportError::Timeout);
        }
        hex::decode(frame.trim())
            .map_err(|e| TransportError::Io(format!("{url}: answer frame is not hex: {e}")))
    }
}

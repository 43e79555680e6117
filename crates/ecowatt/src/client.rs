//! The operator CLI's connection to the server: URL, token, JSON calls, and
//! the server's errors turned into readable messages.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct ServerConn {
    /// The server's URL.
    #[arg(long, env = "ECOWATT_SERVER", default_value = "http://127.0.0.1:5001", global = true)]
    pub server: String,
    /// Operator token [default: read from DATA_DIR/admin.token].
    #[arg(long, env = "ECOWATT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The server's data directory, where the first admin token is kept.
    #[arg(long, env = "ECOWATT_DATA_DIR", default_value = "./ecowatt-data", global = true)]
    pub data_dir: PathBuf,
    /// CA certificate (PEM) an https:// server's certificate must be signed by, for a
    /// private PKI such as `ecowatt tls init` makes [default: the public web's roots].
    #[arg(long, env = "ECOWATT_CA_FILE", value_name = "PEM", global = true)]
    pub ca_file: Option<PathBuf>,
}

/// A connected operator.
pub struct Api {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl ServerConn {
    /// Resolves the token and prepares calls.
    pub fn connect(&self) -> anyhow::Result<Api> {
        let token = match &self.token {
            Some(t) => t.trim().to_owned(),
            None => {
                let path = self.data_dir.join(ecowatt_server::settings::ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no token: pass --token, set ECOWATT_TOKEN, or point --data-dir at the server's data directory ({} not readable)", path.display())
                    })?
                    .trim()
                    .to_owned()
            }
        };
        let tls =
            ecowatt_device::net::trust(self.ca_file.as_deref()).map_err(anyhow::Error::msg)?;
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Api { agent, base: self.server.trim_end_matches('/').to_owned(), token })
    }
}

impl Api {
    /// Why a call did not get an answer, with what to do about it.
    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        let base = &self.base;
        match e {
            ureq::Error::Rustls(e) => anyhow::anyhow!(
                "TLS with {base} failed: {e} (a server with a private CA: pass --ca-file CA.pem; \
                 a certificate for another name: use the name it was made for)"
            ),
            ureq::Error::Io(io) if io.to_string().contains("certificate") => anyhow::anyhow!(
                "the server at {base} presented a certificate this client does not accept: {io} \
                 (a private CA: pass --ca-file CA.pem; expired: renew it, e.g. `ecowatt tls init`)"
            ),
            other => anyhow::anyhow!(
                "cannot reach the server at {base} (is `ecowatt server` running?): {other}"
            ),
        }
    }

    /// Calls `method path` with an optional JSON body; returns the JSON answer
    /// or the server's error as a message.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let text = self.call_text(method, path, body)?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the server's answer is not JSON: {text}"))
    }

    /// As [`Api::call`], returning the raw body.
    pub fn call_text(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            (m, b) => {
                let req = match m {
                    "POST" => self.agent.post(&url),
                    "PATCH" => self.agent.patch(&url),
                    "PUT" => self.agent.put(&url),
                    other => bail!("unsupported method {other}"),
                };
                let req = req.header("Authorization", &auth);
                match b {
                    Some(b) => req.send_json(b),
                    None => req.send_empty(),
                }
            }
        };
        let mut response = result.map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        if status >= 400 {
            return Err(refusal(status, &text));
        }
        Ok(text)
    }

    /// `GET path` as bytes, whatever their size (an export).
    pub fn download(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let body = response.body_mut().with_config().limit(u64::MAX).read_to_vec()?;
        if status >= 400 {
            return Err(refusal(status, &String::from_utf8_lossy(&body)));
        }
        Ok(body)
    }
}

/// The server's error answer (`{"error": {code, message, field}}`) as a message.
fn refusal(status: u16, text: &str) -> anyhow::Error {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let e = &v["error"];
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(code), Some(message)) => match e["field"].as_str() {
            Some(field) => anyhow::anyhow!("{message} [{code}, field {field}, HTTP {status}]"),
            None => anyhow::anyhow!("{message} [{code}, HTTP {status}]"),
        },
        _ => anyhow::anyhow!("HTTP {status}: {text}"),
    }
}

impl Api {
    /// Uploads a firmware image with its manifest (hex JSON in a header).
    pub fn upload_firmware(&self, image: &[u8], manifest_hex: &str) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/firmware", self.base);
        let mut reader = Progress::new(image);
        let mut response = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("ecowatt-manifest", manifest_hex)
            .header("content-type", "application/octet-stream")
            .header("content-length", &image.len().to_string())
            .send(ureq::SendBody::from_reader(&mut reader))
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status >= 400 {
            let e = &v["error"];
            bail!(
                "{} [{}, HTTP {status}]",
                e["message"].as_str().unwrap_or(&text),
                e["code"].as_str().unwrap_or("?")
            );
        }
        Ok(v)
    }
}

/// Reads an upload's bytes and draws a progress bar on stderr (when it is a terminal).
struct Progress<'a> {
    data: &'a [u8],
    at: usize,
    drawn: usize,
    tty: bool,
}

impl<'a> Progress<'a> {
    fn new(data: &'a [u8]) -> Self {
        use std::io::IsTerminal;
        Progress { data, at: 0, drawn: usize::MAX, tty: std::io::stderr().is_terminal() }
    }

    fn draw(&mut self) {
        let pct = if self.data.is_empty() { 100 } else { self.at * 100 / self.data.len() };
        if !self.tty || pct == self.drawn {
            return;
        }
        self.drawn = pct;
        let filled = pct * 30 / 100;
        eprint!(
            "\r  [{}{}] {pct:>3}%  {:.1}/{:.1} MB",
            "#".repeat(filled),
            "-".repeat(30 - filled),
            self.at as f64 / 1e6,
            self.data.len() as f64 / 1e6
        );
        if self.at == self.data.len() {
            eprintln!();
        }
    }
}

impl std::io::Read for Progress<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.at).min(64 * 1024);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        self.draw();
        Ok(n)
    }
}

/// Percent-encodes a path segment.
pub fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Unix ms as a short UTC time, or `-`.
pub fn when(ms: &Value) -> String {
    ms.as_i64().map_or_else(
        || "-".to_owned(),
        |ms| ecowatt_formats::time::iso8601(ms)[..19].replace('T', " "),
    )
}

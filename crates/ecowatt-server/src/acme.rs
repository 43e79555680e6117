//! Automatic certificates (ACME, RFC 8555, e.g. Let's Encrypt) for a public
//! host name: HTTP-01 challenges answered on the plain port
//! (`tls_redirect_from`, port 80), the account and the certificate kept in
//! `DATA_DIR/acme/`, renewed 30 days before expiry. Until the first
//! certificate arrives the HTTPS port serves a self-signed placeholder; the
//! new files are picked up by the listener's watcher without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ecowatt_edge::Tls;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Renew when the certificate has less than this left.
const RENEW_BEFORE_S: i64 = 30 * 86_400;
/// The path prefix of HTTP-01 challenges.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// How to get certificates.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The host names (the first is the certificate's subject).
    pub domains: Vec<String>,
    /// The ACME directory URL.
    pub directory: String,
    /// A contact address for the CA (`mailto:` added if missing).
    pub contact: Option<String>,
    /// The CA (PEM) of a directory with a private PKI (a test CA such as Pebble).
    pub ca_file: Option<PathBuf>,
    /// Where the account and certificate live (`DATA_DIR/acme`).
    pub dir: PathBuf,
}

impl AcmeSettings {
    /// The certificate chain file.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// Its key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn placeholder(&self) -> PathBuf {
        self.dir.join("placeholder")
    }
}

/// The HTTP-01 answers waiting to be fetched by the CA: token → key authorization.
#[derive(Debug, Default)]
pub struct Challenges(Mutex<HashMap<String, String>>);

impl Challenges {
    /// The key authorization for `token`.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }

    fn put(&self, token: &str, answer: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_owned(), answer);
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Makes sure a certificate is there to start with: the one obtained
/// before, or a self-signed placeholder (replaced by [`run`]).
pub fn ensure_certificate(s: &AcmeSettings) -> Result<(), String> {
    std::fs::create_dir_all(&s.dir).map_err(|e| format!("{}: {e}", s.dir.display()))?;
    if s.cert().exists() && s.key().exists() {
        return Ok(());
    }
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let params = rcgen::CertificateParams::new(s.domains.clone()).map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    write(&s.key(), key.serialize_pem().as_bytes(), true)?;
    write(&s.cert(), cert.pem().as_bytes(), false)?;
    write(&s.placeholder(), b"self-signed until the CA issues the certificate\n", false)
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    let done = if secret {
        ecowatt_formats::secret::write_secret_bytes(path, bytes)
    } else {
        std::fs::write(path, bytes)
    };
    done.map_err(|e| format!("{}: {e}", path.display()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Gets a certificate when there is none yet (the placeholder) or the one in
/// use expires within 30 days, then looks again twice a day; failures are
/// retried with backoff (1 min, doubling, at most 1 h). Runs until aborted.
pub async fn run(s: AcmeSettings, challenges: Arc<Challenges>, tls: Arc<Tls>) {
    let mut backoff = Duration::from_secs(60);
    loop {
        let due = s.placeholder().exists() || tls.not_after() - now() < RENEW_BEFORE_S;
        if !due {
            tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
            continue;
        }
        tracing::info!(domains = ?s.domains, directory = %s.directory, "ACME: ordering a certificate");
        let ordered = order(&s, &challenges).await;
        challenges.clear();
        match ordered {
            Ok(()) => {
                backoff = Duration::from_secs(60);
                match tls.reload() {
                    Ok(()) => {
                        tracing::info!(domains = ?s.domains, "ACME: certificate issued and in use")
                    }
                    Err(e) => {
                        tracing::error!(code = e.code(), error = %e, "ACME: the issued certificate cannot be used")
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_s = backoff.as_secs(), "ACME: no certificate");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3600));
            }
        }
    }
}

async fn account(s: &AcmeSettings) -> Result<Account, String> {
    let builder = || match &s.ca_file {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let saved = s.dir.join("account.json");
    if let Ok(text) = std::fs::read_to_string(&saved) {
        let credentials: AccountCredentials =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", saved.display()))?;
        return builder()
            .map_err(|e| e.to_string())?
            .from_credentials(credentials)
            .await
            .map_err(|e| format!("ACME account: {e}"));
    }
    let contact = s
        .contact
        .as_ref()
        .map(|c| if c.starts_with("mailto:") { c.clone() } else { format!("mailto:{c}") });
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = builder()
        .map_err(|e| e.to_string())?
        .create(&new, s.directory.clone(), None)
        .await
        .map_err(|e| format!("ACME account at {}: {e}", s.directory))?;
    let text = serde_json::to_string(&credentials).map_err(|e| e.to_string())?;
    write(&saved, text.as_bytes(), true)?;
    Ok(account)
}

/// One order: HTTP-01 for every name, a new key and CSR, the chain written
/// beside it (key first: the listener's watcher reloads once both match).
async fn order(s: &AcmeSettings, challenges: &Challenges) -> Result<(), String> {
    let account = account(s).await?;
    let identifiers: Vec<Identifier> = s.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("authorization is {other:?}")),
        }
        let mut challenge =
            authz.challenge(ChallengeType::Http01).ok_or("the CA offers no http-01 challenge")?;
        challenges.put(&challenge.token, challenge.key_authorization().as_str().to_owned());
        challenge.set_ready().await.map_err(|e| format!("challenge: {e}"))?;
    }
    let retries = RetryPolicy::default().timeout(Duration::from_secs(120));
    let status = order.poll_ready(&retries).await.map_err(|e| format!("order: {e}"))?;
    if status != OrderStatus::Ready {
        return Err(format!("the order is {status:?} (was port 80 reachable for the CA?)"));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::new(s.domains.clone())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| format!("CSR: {e}"))?;
    order.finalize_csr(csr.der()).await.map_err(|e| format!("finalize: {e}"))?;
    let chain = order.poll_certificate(&retries).await.map_err(|e| format!("certificate: {e}"))?;
    write(&s.key(), key.serialize_pem().as_bytes(), true)?;
    write(&s.cert(), chain.as_bytes(), false)?;
    let _ = std::fs::remove_file(s.placeholder());
    Ok(())
}

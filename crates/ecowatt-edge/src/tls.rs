//! TLS on a listener (rustls with the ring provider): the certificate and key
//! from PEM files, checked when loaded (the key must match the certificate,
//! which must be valid now), and reloaded without dropping a connection when
//! the files change or the process gets SIGHUP. A reload that fails keeps the
//! certificate in use and says why.
//!
//! Defaults are rustls's safe ones: TLS 1.2 and 1.3 only, ECDHE key exchange
//! and AEAD suites only (AES-GCM, ChaCha20-Poly1305), ALPN `http/1.1`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// How often the files are looked at for a change.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Why a certificate and key cannot be used.
#[derive(Debug)]
pub enum TlsError {
    /// A file cannot be read.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate, or one that does not parse.
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file holds no private key rustls can use.
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key is not the certificate's.
    KeyMismatch,
    /// The certificate's validity ended.
    Expired {
        /// Its end, seconds since 1970.
        not_after: i64,
    },
    /// The certificate's validity has not begun.
    NotYetValid {
        /// Its start, seconds since 1970.
        not_before: i64,
    },
}

impl TlsError {
    /// The stable code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            TlsError::Unreadable { .. } => "tls_file_unreadable",
            TlsError::BadCertificate { .. } => "tls_cert_invalid",
            TlsError::BadKey { .. } => "tls_key_invalid",
            TlsError::KeyMismatch => "tls_key_mismatch",
            TlsError::Expired { .. } => "tls_cert_expired",
            TlsError::NotYetValid { .. } => "tls_cert_not_yet_valid",
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Unreadable { path, source } => {
                write!(f, "{}: cannot read: {source}", path.display())
            }
            TlsError::BadCertificate { path, reason } => {
                write!(f, "{}: not a usable PEM certificate: {reason}", path.display())
            }
            TlsError::BadKey { path, reason } => {
                write!(f, "{}: not a usable PEM private key: {reason}", path.display())
            }
            TlsError::KeyMismatch => f.write_str("the private key does not match the certificate"),
            TlsError::Expired { not_after } => {
                write!(f, "the certificate expired at {}", civil(*not_after))
            }
            TlsError::NotYetValid { not_before } => {
                write!(f, "the certificate is not valid before {}", civil(*not_before))
            }
        }
    }
}

impl std::error::Error for TlsError {}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes that failed (a client that does not trust us, a scanner).
    pub handshake_failures: AtomicU64,
    /// Connections that spoke plain HTTP to this TLS port (answered 400).
    pub plain_http: AtomicU64,
    /// Certificate reloads that took effect.
    pub reloads: AtomicU64,
    /// Reloads refused (the files in place did not make a usable pair).
    pub reload_failures: AtomicU64,
}

/// A certificate and key in use, and the files they came from.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: Arc<Current>,
    config: Arc<ServerConfig>,
    /// The files' modification times and lengths when last read.
    stamp: Mutex<Option<Stamp>>,
    /// Counters.
    pub stats: TlsStats,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("not_after", &self.not_after())
            .finish()
    }
}

type Stamp = [(Option<SystemTime>, u64); 2];

/// The certified key handshakes use now, and its validity's end.
#[derive(Debug)]
struct Current {
    key: RwLock<(Arc<CertifiedKey>, i64)>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.key.read().unwrap_or_else(|e| e.into_inner()).0))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads and checks `cert` (PEM, the chain, leaf first) and `key` (PEM,
    /// PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Tls>, TlsError> {
        let stamp = stamp(cert, key);
        let (certified, not_after) = read_pair(cert, key, now())?;
        let current = Arc::new(Current { key: RwLock::new((certified, not_after)) });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Tls {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current,
            config: Arc::new(config),
            stamp: Mutex::new(Some(stamp)),
            stats: TlsStats::default(),
        }))
    }

    /// Reads the files again; on success new handshakes use the new pair
    /// (connections open keep theirs). On failure the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.cert_path, &self.key_path);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        match read_pair(&self.cert_path, &self.key_path, now()) {
            Ok(pair) => {
                *self.current.key.write().unwrap_or_else(|e| e.into_inner()) = pair;
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reloads if either file changed since it was last read.
    fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamp(&self.cert_path, &self.key_path);
        let changed = *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) != Some(now);
        changed.then(|| self.reload())
    }

    /// When the certificate in use expires, seconds since 1970.
    pub fn not_after(&self) -> i64 {
        self.current.key.read().unwrap_or_else(|e| e.into_inner()).1
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Reloads on SIGHUP and when the files change, until the task is
    /// aborted; logs what happened.
    pub(crate) fn watch(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut every = tokio::time::interval(WATCH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let sighup = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let sighup = std::future::pending::<Option<()>>();
                let outcome = tokio::select! {
                    _ = every.tick() => self.reload_if_changed(),
                    _ = sighup => Some(self.reload()),
                };
                match outcome {
                    None => {}
                    Some(Ok(())) => tracing::info!(
                        cert = %self.cert_path.display(),
                        not_after = %civil(self.not_after()),
                        "TLS certificate reloaded"
                    ),
                    Some(Err(e)) => tracing::error!(
                        code = e.code(),
                        error = %e,
                        "TLS certificate reload refused: the certificate in use stays"
                    ),
                }
            }
        })
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    };
    [one(cert), one(key)]
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable { path: path.to_owned(), source })
}

/// Reads, parses and checks a certificate chain and its key at time `now`.
fn read_pair(cert: &Path, key: &Path, now: i64) -> Result<(Arc<CertifiedKey>, i64), TlsError> {
    let bad_cert = |reason: String| TlsError::BadCertificate { path: cert.to_owned(), reason };
    let pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_cert(e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| bad_cert("no CERTIFICATE block".into()))?;
    let (not_before, not_after) =
        validity(leaf).ok_or_else(|| bad_cert("its validity cannot be read".into()))?;
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey { path: key.to_owned(), reason: e.to_string() })?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
        other => TlsError::BadKey { path: key.to_owned(), reason: other.to_string() },
    })?;
    if now > not_after {
        return Err(TlsError::Expired { not_after });
    }
    if now < not_before {
        return Err(TlsError::NotYetValid { not_before });
    }
    Ok((Arc::new(certified), not_after))
}

/// One DER element: its tag, its content, and what follows it.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = len << 8 | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    (end <= b.len()).then(|| (tag, &b[head..end], &b[end..]))
}

/// The fields of an X.509 certificate's TBSCertificate from its validity on.
fn from_validity(der: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, tbs, _) = tlv(cert)? else { return None };
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2; // version
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2; // serial, signature algorithm, issuer
    }
    Some(rest)
}

/// An X.509 certificate's SubjectPublicKeyInfo, DER (the whole element).
pub fn spki(der: &[u8]) -> Option<&[u8]> {
    let rest = from_validity(der)?;
    let rest = tlv(rest)?.2; // validity
    let rest = tlv(rest)?.2; // subject
    let (0x30, _, after) = tlv(rest)? else { return None };
    Some(&rest[..rest.len() - after.len()])
}

/// Whether `key_pem` (PEM) is the key of the certificate `cert_pem` (PEM).
pub fn key_matches(cert_pem: &str, key_pem: &str) -> bool {
    let cert = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next();
    let key = rcgen::KeyPair::from_pem(key_pem);
    match (cert, key) {
        (Some(Ok(cert)), Ok(key)) => spki(&cert) == Some(&key.public_key_der()[..]),
        _ => false,
    }
}

/// An X.509 certificate's validity (notBefore, notAfter), seconds since 1970.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let rest = from_validity(der)?;
    let (0x30, validity, _) = tlv(rest)? else { return None };
    let (t1, before, rest) = tlv(validity)?;
    let (t2, after, _) = tlv(rest)?;
    Some((time(t1, before)?, time(t2, after)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |n, &c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    };
    let (year, rest) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day, h, m, s) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since 1970 as ISO 8601 UTC (`2026-12-01T13:17:35.000Z`).
fn civil(t: i64) -> String {
    ecowatt_formats::time::iso8601(t.saturating_mul(1000))
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

/// What a certificate is issued for and how long.
#[derive(Debug, Clone)]
pub struct Issue {
    /// DNS names and IP addresses (`localhost`, `192.168.1.10`).
    pub hosts: Vec<String>,
    /// Valid from this day (seconds since 1970, rounded down to the day).
    pub not_before: i64,
    /// Valid until this day.
    pub not_after: i64,
}

impl Issue {
    /// For `hosts`, valid from yesterday for `days`.
    pub fn for_days(hosts: &[String], days: u32) -> Issue {
        let now = now();
        let today = now - now.rem_euclid(86_400);
        Issue {
            hosts: hosts.to_vec(),
            not_before: today - 86_400,
            not_after: today + i64::from(days) * 86_400,
        }
    }
}

/// Sets `params`' validity to the days of `from` and `to` (seconds since 1970).
fn set_validity(params: &mut rcgen::CertificateParams, from: i64, to: i64) {
    let day = |t: i64| {
        let text = civil(t);
        let part = |r: std::ops::Range<usize>| text[r].parse::<i32>().unwrap_or(1);
        rcgen::date_time_ymd(part(0..4), part(5..7) as u8, part(8..10) as u8)
    };
    params.not_before = day(from);
    params.not_after = day(to);
}

/// The common name of the private certificate authorities made here.
pub const CA_NAME: &str = "EcoWatt private CA";

fn ca_params(days: u32) -> Result<rcgen::CertificateParams, String> {
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let span = Issue::for_days(&[], days);
    set_validity(&mut params, span.not_before, span.not_after);
    Ok(params)
}

/// A new private certificate authority ([`CA_NAME`], ECDSA P-256) valid for `days`.
pub fn new_ca(days: u32) -> Result<Issued, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = ca_params(days)?.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(Issued { cert: cert.pem(), key: key.serialize_pem() })
}

/// A server certificate (ECDSA P-256) for `issue`, signed by the private CA
/// whose key is `ca_key` (PEM; a CA made by [`new_ca`]).
pub fn issue(ca_key: &str, issue: &Issue) -> Result<Issued, String> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key).map_err(|e| format!("CA key: {e}"))?;
    // The issuer as a signature needs it: its name and key.
    let ca_cert = ca_params(1)?.self_signed(&ca_key).map_err(|e| format!("CA: {e}"))?;
    if issue.hosts.is_empty() {
        return Err("a server certificate needs at least one host name or address".into());
    }
    let mut params = rcgen::CertificateParams::new(issue.hosts.clone())
        .map_err(|e| format!("host names: {e}"))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, issue.hosts[0].as_str());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut params, issue.not_before, issue.not_after);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(|e| e.to_string())?;
    Ok(Issued { cert: cert.pem(), key: key.serialize_pem() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_key_matches_only_its_certificate() {
        let ca = new_ca(1).unwrap();
        let other = new_ca(1).unwrap();
        assert!(key_matches(&ca.cert, &ca.key));
        assert!(!key_matches(&ca.cert, &other.key));
        assert!(!key_matches("nonsense", &ca.key));
    }

    #[test]
    fn times_read_both_forms_and_refuse_nonsense() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(time(0x18, b"20261201131735Z"), Some(1_796_131_055));
        assert_eq!(civil(1_796_131_055), "2026-12-01T13:17:35.000Z");
        assert_eq!(time(0x17, b"701301000000Z"), None);
        assert_eq!(time(0x17, b"7001010000000"), None);
        assert_eq!(time(0x18, b"700101000000Z"), None);
        assert_eq!(validity(&[0x30, 0x85, 0, 0, 0, 0, 0]), None);
        assert_eq!(validity(&[0x30, 0x05, 0x30]), None);
    }
}

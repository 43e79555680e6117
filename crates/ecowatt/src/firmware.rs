//! `ecowatt keygen` and `ecowatt firmware sign|verify`: firmware signing keys
//! and signed manifests, made offline. The private key never goes to a server.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ecowatt_formats::manifest::{manifest_json, parse_manifest};
use ecowatt_proto::firmware::{Manifest, PublicKey, Version};
use ecowatt_proto::hex;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Make a firmware signing key pair.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Private key file to write (mode 0600); the public key goes to FILE.pub.
    #[arg(long, default_value = "firmware-signing.key")]
    out: PathBuf,
    /// Signature scheme: Ed25519 (default), or RSA-2048 PKCS#1 v1.5 with SHA-256 (the seed's).
    #[arg(long, value_enum, default_value = "ed25519")]
    algorithm: Algorithm,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

/// Sign and check firmware images.
#[derive(Subcommand, Debug)]
pub enum FirmwareCommand {
    /// Sign an image: writes IMAGE.manifest.json (version, size, SHA-256, security counter, target, time, signature).
    #[command(disable_version_flag = true)]
    Sign {
        /// The image file.
        image: PathBuf,
        /// Semantic version, e.g. 1.2.0 or 1.3.0-rc.1.
        #[arg(long)]
        version: String,
        /// Private key from `ecowatt keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Anti-rollback counter: devices refuse images below their own.
        #[arg(long, default_value_t = 0)]
        security_counter: u32,
        /// Hardware target.
        #[arg(long, default_value = "linux-x86_64")]
        target: String,
        /// Also sign the image as the original (seed) firmware checks it
        /// (RSA-2048 over its SHA-256, as `legacy_signature`), so that devices
        /// still running it can take it over the legacy chunked OTA. Needs an
        /// RSA key: the one whose public half the original firmware holds.
        #[arg(long)]
        legacy: bool,
    },
    /// Upload a signed image to the server (which checks the signature against its keys).
    Upload {
        /// The image file.
        image: PathBuf,
        /// The manifest [default: IMAGE.manifest.json].
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[command(flatten)]
        conn: crate::client::ServerConn,
    },
    /// List the images stored on the server.
    List {
        #[command(flatten)]
        conn: crate::client::ServerConn,
    },
    /// Check an image against its manifest and a public key.
    Verify {
        /// The image file.
        image: PathBuf,
        /// The manifest [default: IMAGE.manifest.json].
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Public key file (`.pub` from keygen).
        #[arg(long)]
        public_key: PathBuf,
    },
}

/// Signature schemes for firmware manifests.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Ed25519.
    Ed25519,
    /// RSA-2048, PKCS#1 v1.5, SHA-256, exponent 65537.
    Rsa2048,
}

/// A private signing key: Ed25519 (a hex seed) or RSA-2048 (PKCS#8 PEM).
enum SecretKey {
    Ed25519(SigningKey),
    Rsa(rsa::RsaPrivateKey),
}

impl SecretKey {
    fn read(path: &Path) -> anyhow::Result<SecretKey> {
        use rsa::pkcs8::DecodePrivateKey;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading private key {}", path.display()))?;
        let pkcs1 = text.contains("-----BEGIN RSA PRIVATE KEY-----");
        if text.contains("-----BEGIN PRIVATE KEY-----") || pkcs1 {
            // PKCS#8 (ours, and Python's default) or PKCS#1 (OpenSSL's
            // traditional form, as the original system's keys may be).
            let k = if pkcs1 {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                rsa::RsaPrivateKey::from_pkcs1_pem(&text).map_err(|e| e.to_string())
            } else {
                rsa::RsaPrivateKey::from_pkcs8_pem(&text).map_err(|e| e.to_string())
            }
            .map_err(|e| anyhow::anyhow!("{}: not an RSA private key: {e}", path.display()))?;
            anyhow::ensure!(
                rsa::traits::PublicKeyParts::size(&k) == 256,
                "{}: only RSA-2048 keys are supported",
                path.display()
            );
            return Ok(SecretKey::Rsa(k));
        }
        // An Ed25519 private key (a seed) and a public key are both 32 bytes
        // in hex: a `.pub` file given here would sign "successfully" with a
        // key nobody trusts.
        if path.extension().is_some_and(|e| e == "pub") {
            bail!(
                "{} is a public key (from `ecowatt keygen`); sign with its private key, the file without .pub",
                path.display()
            );
        }
        if PublicKey::from_bytes(&hex::decode(text.trim()).unwrap_or_default())
            .is_ok_and(|k| matches!(k, PublicKey::Rsa2048(_)))
        {
            bail!("{} is an RSA public key; sign with its private key (PEM)", path.display());
        }
        let seed: [u8; 32] = read_hex(path, "private key")?;
        let key = SigningKey::from_bytes(&seed);
        // The public key keygen wrote beside it must be this key's.
        let public = PathBuf::from(format!("{}.pub", path.display()));
        if let Ok(text) = std::fs::read_to_string(&public)
            && hex::decode(text.trim()).ok().as_deref() != Some(key.verifying_key().as_bytes())
        {
            bail!(
                "{} is not the private key of {} beside it (a public key given as the private one?)",
                path.display(),
                public.display()
            );
        }
        Ok(SecretKey::Ed25519(key))
    }

    fn public(&self) -> PublicKey {
        match self {
            SecretKey::Ed25519(k) => PublicKey::Ed25519(k.verifying_key().to_bytes()),
            SecretKey::Rsa(k) => {
                let n = rsa::traits::PublicKeyParts::n(k).to_bytes_be();
                let mut m = [0u8; 256];
                m[256 - n.len()..].copy_from_slice(&n);
                PublicKey::Rsa2048(Box::new(m))
            }
        }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            SecretKey::Ed25519(k) => k.sign(message).to_bytes().to_vec(),
            SecretKey::Rsa(k) => {
                use rsa::signature::{SignatureEncoding, Signer as _};
                rsa::pkcs1v15::SigningKey::<Sha256>::new(k.clone()).sign(message).to_vec()
            }
        }
    }
}

fn read_hex<const N: usize>(path: &Path, what: &str) -> anyhow::Result<[u8; N]> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not a {what} ({N} bytes in hex)", path.display()))
}

/// Reads a public key file (`.pub` from keygen: an Ed25519 key or an RSA-2048 modulus, in hex).
pub fn read_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading public key {}", path.display()))?;
    hex::decode(text.trim()).ok().and_then(|b| PublicKey::from_bytes(&b).ok()).with_context(|| {
        format!("{} is not a public key (Ed25519 or RSA-2048 modulus, hex)", path.display())
    })
}

/// Writes a new key pair (`path`, `path.pub`); returns the public key in hex.
pub fn make_key(path: &Path) -> anyhow::Result<String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let public = hex::encode_upper(key.verifying_key().as_bytes());
    ecowatt_formats::secret::write_secret(path, &hex::encode_upper(&seed))?;
    std::fs::write(format!("{}.pub", path.display()), format!("{public}\n"))?;
    Ok(public)
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let public = PathBuf::from(format!("{}.pub", args.out.display()));
    if !args.force && (args.out.exists() || public.exists()) {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    if args.algorithm == Algorithm::Rsa2048 {
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .map_err(|e| anyhow::anyhow!("RSA key generation: {e}"))?;
        let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key_pub = SecretKey::Rsa(key).public();
        ecowatt_formats::secret::write_secret(&args.out, pem.trim())?;
        std::fs::write(&public, format!("{}\n", hex::encode_upper(key_pub.as_bytes())))?;
    } else {
        make_key(&args.out)?;
    }
    outln!("Private key: {} (keep it offline; the server never needs it)", args.out.display());
    outln!("Public key:  {} (give it to the server and the devices)", public.display());
    Ok(())
}

pub fn run(cmd: FirmwareCommand) -> anyhow::Result<()> {
    match cmd {
        FirmwareCommand::Sign { image, version, key, security_counter, target, legacy } => {
            let version = Version::parse(&version)
                .map_err(|e| anyhow::anyhow!("--version {version:?}: {e}"))?;
            let signing = SecretKey::read(&key)?;
            let bytes =
                std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let manifest = Manifest {
                version,
                size: bytes.len() as u64,
                sha256: Sha256::digest(&bytes).into(),
                security_counter,
                target,
                created_ms: ecowatt_formats::time::now_ms() as u64,
            };
            let signature =
                signing.sign(&manifest.signed_bytes().map_err(|e| anyhow::anyhow!("{e}"))?);
            let out = PathBuf::from(format!("{}.manifest.json", image.display()));
            let mut json = manifest_json(&manifest, &signing.public(), &signature);
            if legacy {
                anyhow::ensure!(
                    matches!(signing, SecretKey::Rsa(_)),
                    "--legacy needs an RSA-2048 private key (PEM): the original firmware checks RSA signatures"
                );
                use base64::Engine;
                json["legacy_signature"] =
                    base64::engine::general_purpose::STANDARD.encode(signing.sign(&bytes)).into();
            }
            std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
            outln!(
                "Signed {} ({} bytes, version {}): {}",
                image.display(),
                manifest.size,
                manifest.version,
                out.display()
            );
        }
        FirmwareCommand::List { conn } => {
            let v = conn.connect()?.call("GET", "/api/v1/firmware", None)?;
            outln!(
                "{:>4} {:<14} {:<16} {:>10} {:>4} uploaded",
                "id",
                "version",
                "target",
                "bytes",
                "sc"
            );
            for f in v["firmware"].as_array().into_iter().flatten() {
                outln!(
                    "{:>4} {:<14} {:<16} {:>10} {:>4} {} by {}",
                    f["id"],
                    f["version"].as_str().unwrap_or("?"),
                    f["target"].as_str().unwrap_or("?"),
                    f["size"],
                    f["security_counter"],
                    crate::client::when(&f["uploaded_ms"]),
                    f["uploaded_by"].as_str().unwrap_or("?")
                );
            }
        }
        FirmwareCommand::Upload { image, manifest, conn } => {
            let path = manifest
                .unwrap_or_else(|| PathBuf::from(format!("{}.manifest.json", image.display())));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let bytes =
                std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            // The server refuses a larger body from its declared length,
            // before reading it, and closes: say so here rather than report
            // the broken pipe of a refused upload.
            let max = ecowatt_server::api::firmware::MAX_IMAGE;
            if bytes.len() > max {
                bail!(
                    "{} is {:.1} MiB; the server takes images up to {} MiB [body_too_large, HTTP 413]",
                    image.display(),
                    bytes.len() as f64 / (1024.0 * 1024.0),
                    max / (1024 * 1024)
                );
            }
            outln!("Uploading {} ({} bytes)...", image.display(), bytes.len());
            let v = conn
                .connect()?
                .upload_firmware(&bytes, &hex::encode_upper(text.trim().as_bytes()))?;
            outln!(
                "Stored as firmware {}: version {} for {}",
                v["id"],
                v["version"].as_str().unwrap_or("?"),
                v["target"].as_str().unwrap_or("?")
            );
        }
        FirmwareCommand::Verify { image, manifest, public_key } => {
            let path = manifest
                .unwrap_or_else(|| PathBuf::from(format!("{}.manifest.json", image.display())));
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )?;
            let (m, _signer, sig) = parse_manifest(&v)?;
            let public = read_public_key(&public_key)?;
            public.verify(&m, &sig).map_err(|e| anyhow::anyhow!("manifest refused: {e}"))?;
            let bytes = std::fs::read(&image)?;
            let sha: [u8; 32] = Sha256::digest(&bytes).into();
            if bytes.len() as u64 != m.size || sha != m.sha256 {
                bail!(
                    "image refused: it does not match its signed manifest (size or SHA-256 differ)"
                );
            }
            outln!(
                "OK: {} is version {} for {}, signed by {}",
                image.display(),
                m.version,
                m.target,
                public_key.display()
            );
        }
    }
    Ok(())
}

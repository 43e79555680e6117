//! `ecowatt keygen` and `ecowatt firmware sign|verify`: firmware signing keys
//! and signed manifests, made offline. The private key never goes to a server.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ecowatt_proto::firmware::{Manifest, Version};
use ecowatt_proto::hex;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Make an Ed25519 firmware signing key pair.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Private key file to write (mode 0600); the public key goes to FILE.pub.
    #[arg(long, default_value = "firmware-signing.key")]
    out: PathBuf,
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

fn read_hex<const N: usize>(path: &Path, what: &str) -> anyhow::Result<[u8; N]> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not a {what} ({N} bytes in hex)", path.display()))
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let public = PathBuf::from(format!("{}.pub", args.out.display()));
    if !args.force && (args.out.exists() || public.exists()) {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    ecowatt_server::run::write_secret(&args.out, &hex::encode_upper(&seed))?;
    std::fs::write(&public, format!("{}\n", hex::encode_upper(key.verifying_key().as_bytes())))?;
    println!("Private key: {} (keep it offline; the server never needs it)", args.out.display());
    println!("Public key:  {} (give it to the server and the devices)", public.display());
    Ok(())
}

fn manifest_json(m: &Manifest, public: &[u8; 32], signature: &[u8; 64]) -> Value {
    json!({
        "format": "ecowatt-firmware-manifest/1",
        "version": m.version.to_string(),
        "size": m.size,
        "sha256": hex::encode_upper(&m.sha256),
        "security_counter": m.security_counter,
        "target": m.target,
        "created_ms": m.created_ms,
        "algorithm": "ed25519",
        "public_key": hex::encode_upper(public),
        "signature": hex::encode_upper(signature),
    })
}

/// Reads a manifest file back: the manifest, and its signature.
pub fn parse_manifest(v: &Value) -> anyhow::Result<(Manifest, [u8; 64])> {
    let s = |k: &str| v[k].as_str().with_context(|| format!("manifest field {k} missing"));
    let n = |k: &str| v[k].as_u64().with_context(|| format!("manifest field {k} missing"));
    anyhow::ensure!(s("algorithm")? == "ed25519", "only ed25519 manifests are supported here");
    let sha: [u8; 32] = hex::decode(s("sha256")?)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("sha256 must be 32 bytes hex")?;
    let sig: [u8; 64] = hex::decode(s("signature")?)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("signature must be 64 bytes hex")?;
    let m = Manifest {
        version: Version::parse(s("version")?).map_err(|e| anyhow::anyhow!("version: {e}"))?,
        size: n("size")?,
        sha256: sha,
        security_counter: u32::try_from(n("security_counter")?)?,
        target: s("target")?.to_owned(),
        created_ms: n("created_ms")?,
    };
    Ok((m, sig))
}

pub fn run(cmd: FirmwareCommand) -> anyhow::Result<()> {
    match cmd {
        FirmwareCommand::Sign { image, version, key, security_counter, target } => {
            let version = Version::parse(&version)
                .map_err(|e| anyhow::anyhow!("--version {version:?}: {e}"))?;
            let seed: [u8; 32] = read_hex(&key, "private key")?;
            let signing = SigningKey::from_bytes(&seed);
            let bytes =
                std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let manifest = Manifest {
                version,
                size: bytes.len() as u64,
                sha256: Sha256::digest(&bytes).into(),
                security_counter,
                target,
                created_ms: ecowatt_server::now_ms() as u64,
            };
            let signature = signing
                .sign(&manifest.signed_bytes().map_err(|e| anyhow::anyhow!("{e}"))?)
                .to_bytes();
            let out = PathBuf::from(format!("{}.manifest.json", image.display()));
            let json = manifest_json(&manifest, signing.verifying_key().as_bytes(), &signature);
            std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
            println!(
                "Signed {} ({} bytes, version {}): {}",
                image.display(),
                manifest.size,
                manifest.version,
                out.display()
            );
        }
        FirmwareCommand::Verify { image, manifest, public_key } => {
            let path = manifest
                .unwrap_or_else(|| PathBuf::from(format!("{}.manifest.json", image.display())));
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )?;
            let (m, sig) = parse_manifest(&v)?;
            let public: [u8; 32] = read_hex(&public_key, "public key")?;
            m.verify_ed25519(&public, &sig)
                .map_err(|e| anyhow::anyhow!("manifest refused: {e}"))?;
            let bytes = std::fs::read(&image)?;
            let sha: [u8; 32] = Sha256::digest(&bytes).into();
            if bytes.len() as u64 != m.size || sha != m.sha256 {
                bail!(
                    "image refused: it does not match its signed manifest (size or SHA-256 differ)"
                );
            }
            println!(
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

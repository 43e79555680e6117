//! `ecowatt tls init`: a private certificate authority and a server
//! certificate for a deployment without a public host name (a LAN, a lab),
//! so that operators' tokens never travel in clear.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ecowatt_edge::tls::{self, Issue, Issued};

/// Private TLS certificates for `ecowatt server --tls-cert/--tls-key`.
#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make a private CA (ca.pem, ca.key) and a server certificate signed by it
    /// (server.pem, server.key) in DIR. With a CA already in DIR, only the server
    /// certificate is made anew (a renewal: clients keep trusting ca.pem).
    Init(InitArgs),
}

/// What `ecowatt tls init` is told.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// A host name or IP address clients use to reach the server (repeatable).
    #[arg(long = "host", required = true, value_name = "NAME")]
    hosts: Vec<String>,
    /// Where the files go.
    #[arg(long, default_value = "./ecowatt-tls")]
    out: PathBuf,
    /// Days the server certificate is valid (the CA: ten years).
    #[arg(long, default_value_t = 398, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
}

/// Runs a `tls` subcommand.
pub fn run(cmd: TlsCommand) -> anyhow::Result<()> {
    match cmd {
        TlsCommand::Init(args) => init(&args),
    }
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    let dir = &args.out;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = match (ca_pem.exists(), ca_key.exists()) {
        (true, true) => {
            let ca = Issued { cert: read(&ca_pem)?, key: read(&ca_key)? };
            if !tls::key_matches(&ca.cert, &ca.key) {
                bail!(
                    "{} is not the key of {}: restore the CA's own key (or move both away for a new CA)",
                    ca_key.display(),
                    ca_pem.display()
                );
            }
            ca
        }
        (false, false) => {
            let ca = tls::new_ca(3650).map_err(anyhow::Error::msg)?;
            std::fs::write(&ca_pem, &ca.cert).with_context(|| ca_pem.display().to_string())?;
            ecowatt_formats::secret::write_secret_bytes(&ca_key, ca.key.as_bytes())
                .with_context(|| ca_key.display().to_string())?;
            ca
        }
        _ => bail!(
            "{} holds only one of ca.pem and ca.key: move it away, or restore the other",
            dir.display()
        ),
    };
    let server = tls::issue(&ca.key, &Issue::for_days(&args.hosts, args.days))
        .map_err(anyhow::Error::msg)?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    // The key first: a server watching the files reloads once both match.
    ecowatt_formats::secret::write_secret_bytes(&key, server.key.as_bytes())
        .with_context(|| key.display().to_string())?;
    std::fs::write(&cert, &server.cert).with_context(|| cert.display().to_string())?;
    outln!(
        "server certificate for {} (valid {} days): {}",
        args.hosts.join(", "),
        args.days,
        cert.display()
    );
    outln!("its key (keep it private):            {}", key.display());
    outln!("the CA clients must trust:            {}", ca_pem.display());
    outln!("serve:   ecowatt server --tls-cert {} --tls-key {}", cert.display(), key.display());
    outln!(
        "clients: ecowatt status --server https://{}:5001 --ca-file {}",
        args.hosts[0],
        ca_pem.display()
    );
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

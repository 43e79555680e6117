//! `ecowatt broker mosquitto --out DIR`: the accounts and ACL of a Mosquitto
//! broker carrying the device protocol (`ecowatt server --device-broker`):
//! one user per enabled device (its name; the password it derives from its
//! key, stored as a hash), allowed to publish only its own requests and read
//! only its own answers, and one user for the servers. Run again after
//! adding, removing, disabling a device or rotating a key, then reload
//! Mosquitto (SIGHUP). docs/protocol.md has the equivalents for EMQX and VerneMQ.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use ecowatt_formats::broker as b;
use serde_json::Value;

use crate::client::ServerConn;

/// The device transport's broker.
#[derive(Subcommand, Debug)]
pub enum BrokerCommand {
    /// Write DIR/passwd (Mosquitto password file), DIR/acl and DIR/mosquitto.conf for the
    /// device transport, from the server's enabled devices; DIR/server-password (made once)
    /// is the servers' broker password.
    Mosquitto(MosquittoArgs),
}

/// What `ecowatt broker mosquitto` is told.
#[derive(Args, Debug)]
pub struct MosquittoArgs {
    /// Where the files go (created if missing).
    #[arg(long, default_value = "./ecowatt-broker")]
    out: PathBuf,
    /// The servers' user name on the broker.
    #[arg(long, default_value = "ecowatt-server")]
    server_user: String,
    /// The port the listener in mosquitto.conf takes.
    #[arg(long, default_value_t = 1883)]
    port: u16,
}

/// Runs a `broker` subcommand.
pub fn run(cmd: BrokerCommand, conn: &ServerConn) -> anyhow::Result<()> {
    match cmd {
        BrokerCommand::Mosquitto(args) => mosquitto(&args, conn),
    }
}

/// The files' text from the server's accounts and the servers' password.
pub struct Files {
    /// `user:hash` lines.
    pub passwd: String,
    /// ACL: per user, its topics.
    pub acl: String,
    /// Devices admitted.
    pub devices: usize,
}

/// The password and ACL files for `accounts` (the server's
/// `GET /api/v1/broker/accounts`) and the servers' user.
pub fn files(
    accounts: &Value,
    server_user: &str,
    server_password: &str,
    salt: [u8; 12],
) -> anyhow::Result<Files> {
    let prefix = accounts["prefix"].as_str().context("the server's answer has no prefix")?;
    let list = accounts["accounts"].as_array().context("the server's answer has no accounts")?;
    let mut passwd = format!("{server_user}:{}\n", b::mosquitto_hash(server_password, &salt));
    let mut acl = format!(
        "# EcoWatt device transport: made by `ecowatt broker mosquitto`; made again, not edited.\n\
         user {server_user}\ntopic readwrite {prefix}/#\n"
    );
    for a in list {
        let user = a["username"].as_str().context("an account without a user name")?;
        if user == server_user {
            anyhow::bail!(
                "a device is named {user:?}, like the servers' user: give --server-user another name"
            );
        }
        let hash = a["password_hash"].as_str().context("an account without a password hash")?;
        writeln!(passwd, "{user}:{hash}")?;
        writeln!(acl, "\nuser {user}")?;
        for topic in a["publish"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            writeln!(acl, "topic write {topic}")?;
        }
        if let Some(topic) = a["subscribe"].as_str() {
            writeln!(acl, "topic read {topic}")?;
        }
    }
    Ok(Files { passwd, acl, devices: list.len() })
}

fn mosquitto(args: &MosquittoArgs, conn: &ServerConn) -> anyhow::Result<()> {
    let api = conn.connect()?;
    let accounts = api.call("GET", "/api/v1/broker/accounts", None)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let secret = args.out.join("server-password");
    let password = match std::fs::read_to_string(&secret) {
        Ok(p) if !p.trim().is_empty() => p.trim().to_owned(),
        _ => {
            let mut raw = [0u8; 18];
            getrandom::fill(&mut raw)
                .map_err(|e| anyhow::anyhow!("the system's random source: {e}"))?;
            let p: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            ecowatt_formats::secret::write_secret(&secret, &p)
                .with_context(|| format!("cannot write {}", secret.display()))?;
            p
        }
    };
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("the system's random source: {e}"))?;
    let f = files(&accounts, &args.server_user, &password, salt)?;
    let dir = std::path::absolute(&args.out).unwrap_or_else(|_| args.out.clone());
    // The password file holds hashes only, but Mosquitto wants it private.
    write_private(&dir.join("passwd"), &f.passwd)?;
    write_private(&dir.join("acl"), &f.acl)?;
    let conf = format!(
        "# EcoWatt device transport (made by `ecowatt broker mosquitto`).\n\
         # Run: mosquitto -c {conf}; after running the command again: kill -HUP <mosquitto pid>.\n\
         listener {port}\n\
         allow_anonymous false\n\
         # Small requests and answers, each awaited: no waiting for Nagle.\n\
         set_tcp_nodelay true\n\
         password_file {passwd}\n\
         acl_file {acl}\n\
         # Firmware answers are up to 128 KiB; nothing a device sends is larger.\n\
         max_packet_size {max}\n\
         # Answers to many devices in flight to each server.\n\
         max_inflight_messages 1000\n\
         max_queued_messages 10000\n",
        conf = dir.join("mosquitto.conf").display(),
        port = args.port,
        passwd = dir.join("passwd").display(),
        acl = dir.join("acl").display(),
        max = b::MAX_PACKET + 1024,
    );
    std::fs::write(dir.join("mosquitto.conf"), conf)?;
    outln!(
        "Wrote {dir}/passwd and {dir}/acl: {} device(s) and the servers' user {:?}; {dir}/mosquitto.conf.",
        f.devices,
        args.server_user,
        dir = dir.display()
    );
    outln!("Start the broker:  mosquitto -c {}/mosquitto.conf", dir.display());
    outln!(
        "Start each server: ecowatt server --device-broker mqtt://{}:$(cat {})@BROKER:{}",
        args.server_user,
        secret.display(),
        args.port
    );
    outln!(
        "Start each device: ecowatt device --provision FILE --cloud mqtt://BROKER:{} ...",
        args.port
    );
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    ecowatt_formats::secret::write_secret(path, text)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn each_device_gets_its_topics_only_and_the_servers_all() {
        let accounts = json!({"prefix": "p", "accounts": [
            {"username": "a", "password_hash": "$7$101$x$y", "publish": ["p/a/up/sync", "p/a/up/telemetry"], "subscribe": "p/a/down/+"},
        ]});
        let f = files(&accounts, "srv", "pw", [1; 12]).unwrap();
        assert_eq!(f.devices, 1);
        assert!(f.passwd.starts_with("srv:$7$101$"));
        assert!(f.passwd.ends_with("\na:$7$101$x$y\n"));
        assert!(f.acl.contains("user srv\ntopic readwrite p/#\n"));
        assert!(f.acl.ends_with(
            "\nuser a\ntopic write p/a/up/sync\ntopic write p/a/up/telemetry\ntopic read p/a/down/+\n"
        ));
        let clash = json!({"prefix": "p", "accounts": [{"username": "srv", "password_hash": "h"}]});
        assert!(files(&clash, "srv", "pw", [1; 12]).is_err());
    }
}

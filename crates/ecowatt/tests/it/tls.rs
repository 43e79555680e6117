//! HTTPS as a user sets it up: `ecowatt tls init` makes a private CA and a
//! server certificate, `ecowatt server --tls-cert --tls-key` serves with it
//! (and redirects plain HTTP), the CLI and a device agent reach it with
//! `--ca-file`, a device reaches it through the plain port too (sealed
//! protocol only), and clients that do not trust it, or speak plain HTTP to
//! it, are told why.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{Killed, failed, free_port, ok, run, sim};

#[test]
fn an_https_server_serves_the_cli_and_a_device_agent_that_trust_its_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let made =
        ok(run(d, &["tls", "init", "--host", "localhost", "--host", "127.0.0.1", "--out", "pki"]));
    assert!(made.contains("pki/ca.pem"), "{made}");
    for file in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(d.join("pki").join(file).exists(), "{file}");
    }
    // Again: a renewal. The CA stays (clients keep trusting it); the server certificate is new.
    let read = |f: &str| std::fs::read_to_string(d.join("pki").join(f)).unwrap();
    let (ca, cert) = (read("ca.pem"), read("server.pem"));
    ok(run(d, &["tls", "init", "--host", "localhost", "--host", "127.0.0.1", "--out", "pki"]));
    assert_eq!(read("ca.pem"), ca);
    assert_ne!(read("server.pem"), cert);
    std::fs::remove_file(d.join("pki/ca.key")).unwrap();
    let refused = failed(run(d, &["tls", "init", "--host", "x.test", "--out", "pki"]));
    assert!(refused.contains("only one of ca.pem and ca.key"), "{refused}");
    // A key that is not the CA's would sign certificates clients refuse: refused.
    std::fs::write(d.join("pki/ca.key"), read("server.key")).unwrap();
    let refused = failed(run(d, &["tls", "init", "--host", "x.test", "--out", "pki"]));
    assert!(refused.contains("is not the key of"), "{refused}");
    std::fs::remove_dir_all(d.join("pki")).unwrap();
    ok(run(d, &["tls", "init", "--host", "localhost", "--host", "127.0.0.1", "--out", "pki"]));

    let (port, plain) = (free_port(), free_port());
    let bind = format!("127.0.0.1:{port}");
    let redirect = format!("127.0.0.1:{plain}");
    let server = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["server", "--bind", &bind, "--data-dir", "data"])
        .args(["--tls-cert", "pki/server.pem", "--tls-key", "pki/server.key"])
        .args(["--tls-redirect-from", &redirect])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Killed(server);
    let banner = BufReader::new(server.0.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    assert!(banner.contains(&format!("https://{bind}")), "{banner}");

    let url = format!("https://localhost:{port}");
    let conn = ["--server", url.as_str(), "--data-dir", "data"];
    let trusting = [&conn[..], &["--ca-file", "pki/ca.pem"]].concat();
    // Trusting the CA: served.
    let status = ok(run(d, &[&["status"][..], &trusting].concat()));
    assert!(status.contains("devices    0"), "{status}");
    // Not trusting it: refused, with what to do.
    let refused = failed(run(d, &[&["status"][..], &conn].concat()));
    assert!(refused.contains("certificate") && refused.contains("--ca-file"), "{refused}");
    // A CA file that holds no certificate.
    let refused =
        failed(run(d, &[&["status"][..], &conn, &["--ca-file", "pki/server.key"]].concat()));
    assert!(refused.contains("no PEM certificate"), "{refused}");
    // Plain HTTP to the HTTPS port.
    let plain_url = format!("http://localhost:{port}");
    let refused = failed(run(d, &["status", "--server", &plain_url, "--data-dir", "data"]));
    assert!(refused.contains("https_required"), "{refused}");
    // The plain port redirects, path and query kept.
    let agent: ureq::Agent = ureq::Agent::config_builder().max_redirects(0).build().into();
    let moved = agent.get(format!("http://localhost:{plain}/api/v1/devices?a=1")).call().unwrap();
    assert_eq!(moved.status(), 308);
    assert_eq!(moved.headers()["location"], format!("https://localhost:{port}/api/v1/devices?a=1"));

    // A device provisioned over HTTPS syncs over HTTPS, trusting the same CA.
    let (_sim, inverter) = sim();
    let added = ok(run(d, &[&["device", "add", "roof-1"][..], &trusting].concat()));
    let provision = d.join("roof-1.provision.json");
    assert!(provision.exists(), "{added}");
    let text = std::fs::read_to_string(&provision).unwrap();
    assert!(text.contains(&format!("https://{bind}")), "{text}");
    // Without the CA the agent cannot sync; with it, it can.
    let device = |ca: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ecowatt"));
        c.args(["device", "--provision", "roof-1.provision.json", "--inverter", &inverter])
            .args(["--state-dir", "state"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(ca) = ca {
            c.args(["--ca-file", ca]);
        }
        Killed(c.spawn().unwrap())
    };
    let online = || {
        let out = run(d, &[&["device", "show", "roof-1"][..], &trusting].concat());
        ok(out).contains("online")
    };
    let untrusting = device(None);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!online(), "a device that does not trust the server's CA came online");
    drop(untrusting);
    let _trusting = device(Some("pki/ca.pem"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !online() {
        assert!(Instant::now() < deadline, "the device never synced over HTTPS");
        std::thread::sleep(Duration::from_millis(300));
    }

    // The plain port serves the sealed device protocol (the ESP32-C3 firmware speaks plain
    // HTTP): a device pointed there needs no CA.
    ok(run(d, &[&["device", "add", "roof-2"][..], &trusting].concat()));
    let plain_url = format!("http://127.0.0.1:{plain}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_ecowatt"));
    c.args(["device", "--provision", "roof-2.provision.json", "--inverter", &inverter])
        .args(["--state-dir", "state-2", "--cloud", &plain_url])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _plain_device = Killed(c.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(d, &[&["device", "show", "roof-2"][..], &trusting].concat());
        if ok(out).contains("online") {
            break;
        }
        assert!(Instant::now() < deadline, "the device never synced through the plain port");
        std::thread::sleep(Duration::from_millis(300));
    }

    // The server counted what it refused.
    let metrics = ok(run(d, &[&["status"][..], &trusting].concat()));
    assert!(metrics.contains("devices    2 (2 online"), "{metrics}");
    let tls = ecowatt_device::net::trust(Some(&d.join("pki/ca.pem"))).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().tls_config(tls).build().into();
    let metrics =
        || agent.get(format!("{url}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    let scrape = metrics();
    assert!(scrape.contains("ecowatt_tls_plain_http_total 1"), "{scrape}");
    let failures = scrape
        .lines()
        .find_map(|l| l.strip_prefix("ecowatt_tls_handshake_failures_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap();
    assert!(failures >= 2, "handshake failures {failures}");
    assert!(scrape.contains("ecowatt_tls_certificate_not_after_seconds "), "{scrape}");

    // SIGHUP reloads the certificate (here the same files: a reload that takes effect).
    assert!(scrape.contains("ecowatt_tls_reloads_total{outcome=\"ok\"} 0"), "{scrape}");
    let hup = Command::new("kill").args(["-HUP", &server.0.id().to_string()]).status().unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().contains("ecowatt_tls_reloads_total{outcome=\"ok\"} 1") {
        assert!(Instant::now() < deadline, "SIGHUP did not reload: {}", metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok(run(d, &[&["status"][..], &trusting].concat())).contains("devices    2"));
    server.0.kill().ok();
}

/// Pebble (Let's Encrypt's test CA) and its mock DNS, answering every name
/// with 127.0.0.1, validating HTTP-01 on `http_port`; its directory's
/// certificate from a private CA made here. `None` when Pebble is not
/// installed (CI installs it and sets ECOWATT_TEST_ACME_REQUIRED).
fn pebble(d: &Path, http_port: u16) -> Option<(Vec<Killed>, String, u16)> {
    if Command::new("pebble").arg("-version").output().is_err() {
        assert!(
            std::env::var_os("ECOWATT_TEST_ACME_REQUIRED").is_none(),
            "pebble is not installed (apt-get install pebble)"
        );
        eprintln!("ACME part skipped: pebble is not installed");
        return None;
    }
    ok(run(d, &["tls", "init", "--host", "127.0.0.1", "--out", "pebble-pki"]));
    let (dir_port, mgmt_port, dns_port) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"{{"pebble": {{"listenAddress": "127.0.0.1:{dir_port}", "managementListenAddress": "127.0.0.1:{mgmt_port}",
        "certificate": "pebble-pki/server.pem", "privateKey": "pebble-pki/server.key",
        "httpPort": {http_port}, "tlsPort": {}, "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
        free_port()
    );
    std::fs::write(d.join("pebble.json"), config).unwrap();
    let dns = Command::new("pebble-challtestsrv")
        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", ""])
        .args(["-tlsalpn01", "", "-dns01", &format!("127.0.0.1:{dns_port}")])
        .args(["-management", &format!("127.0.0.1:{}", free_port())])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ca = Command::new("pebble")
        .args(["-config", "pebble.json", "-dnsserver", &format!("127.0.0.1:{dns_port}")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let directory = format!("https://127.0.0.1:{dir_port}/dir");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", dir_port)).is_err() {
        assert!(Instant::now() < deadline, "pebble did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some((vec![Killed(dns), Killed(ca)], directory, mgmt_port))
}

/// A TLS handshake with 127.0.0.1:`port` for `name`, trusting only `root`
/// (PEM), then `GET /healthz`: the answer's first line.
fn healthz_as(port: u16, name: &str, root: &[u8]) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server)
        .map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    answer.lines().next().map(str::to_owned).ok_or_else(|| "no answer".to_owned())
}

#[test]
fn acme_gets_a_certificate_from_the_ca_by_http_01_and_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, plain) = (free_port(), free_port());
    let Some((_ca, directory, mgmt)) = pebble(d, plain) else { return };
    let bind = format!("127.0.0.1:{port}");
    let redirect = format!("127.0.0.1:{plain}");
    let server = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["server", "--bind", &bind, "--data-dir", "data", "--tls-redirect-from", &redirect])
        .args(["--acme-domain", "ecowatt.test", "--acme-directory", &directory])
        .args(["--acme-ca-file", "pebble-pki/ca.pem", "--acme-contact", "ops@ecowatt.test"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Killed(server);
    // The CA's root, from its management interface.
    let tls = ecowatt_device::net::trust(Some(&d.join("pebble-pki/ca.pem"))).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().tls_config(tls).build().into();
    let root = agent
        .get(format!("https://127.0.0.1:{mgmt}/roots/0"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    // A placeholder first, then the CA's certificate, picked up without a restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        match healthz_as(port, "ecowatt.test", &root) {
            Ok(line) => break line,
            Err(e) => {
                assert!(Instant::now() < deadline, "no certificate from the CA: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    };
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(!d.join("data/acme/placeholder").exists());
    assert!(d.join("data/acme/account.json").exists(), "the account is kept for renewals");
    // Another name is not in the certificate.
    assert!(healthz_as(port, "other.test", &root).is_err());
    // The challenge path answers only tokens it holds; the rest of the plain port redirects.
    let plain_agent: ureq::Agent =
        ureq::Agent::config_builder().max_redirects(0).http_status_as_error(false).build().into();
    let url = format!("http://127.0.0.1:{plain}/.well-known/acme-challenge/nope");
    assert_eq!(plain_agent.get(&url).call().unwrap().status(), 404);
    let moved = plain_agent.get(format!("http://127.0.0.1:{plain}/")).call().unwrap();
    assert_eq!(moved.status(), 308);
}

#[test]
fn acme_settings_are_checked_before_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (args, says) in [
        (&["--acme-domain", "ecowatt.test"][..], "tls_redirect_from"),
        (
            &["--acme-domain", "localhost", "--tls-redirect-from", "127.0.0.1:0"][..],
            "public host name",
        ),
        (&["--acme-contact", "ops@example.org"][..], "need acme_domains"),
    ] {
        let out = run(
            d,
            &[&["server", "--bind", "127.0.0.1:0", "--data-dir", "data"][..], args].concat(),
        );
        let err = failed(out);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

//! `ecowatt keygen` and `ecowatt firmware sign|verify`, as a release manager uses them.

use std::process::{Command, Output};

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run ecowatt")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, why: &str) {
    assert!(!out.status.success(), "accepted: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(why), "{err}");
}

#[test]
fn a_signed_image_verifies_and_any_change_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&run(dir, &["keygen", "--out", "release.key"]));
    ok(&run(dir, &["keygen", "--out", "other.key"]));
    refused(&run(dir, &["keygen", "--out", "release.key"]), "exists");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(dir.join("release.key")).unwrap().permissions().mode() & 0o077,
            0
        );
    }
    let image: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("fw.bin"), &image).unwrap();
    ok(&run(
        dir,
        &[
            "firmware",
            "sign",
            "fw.bin",
            "--version",
            "1.2.0",
            "--key",
            "release.key",
            "--security-counter",
            "3",
        ],
    ));
    let out = ok(&run(dir, &["firmware", "verify", "fw.bin", "--public-key", "release.key.pub"]));
    assert!(out.contains("version 1.2.0"), "{out}");

    // The wrong key.
    refused(
        &run(dir, &["firmware", "verify", "fw.bin", "--public-key", "other.key.pub"]),
        "signature does not verify",
    );
    // One byte of the image changed.
    let mut bad = image.clone();
    bad[50_000] ^= 1;
    std::fs::write(dir.join("fw.bin"), &bad).unwrap();
    refused(
        &run(dir, &["firmware", "verify", "fw.bin", "--public-key", "release.key.pub"]),
        "does not match its signed manifest",
    );
    std::fs::write(dir.join("fw.bin"), &image).unwrap();
    // A manifest edited after signing (security counter lowered).
    let path = dir.join("fw.bin.manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"security_counter\": 3", "\"security_counter\": 0");
    std::fs::write(&path, text).unwrap();
    refused(
        &run(dir, &["firmware", "verify", "fw.bin", "--public-key", "release.key.pub"]),
        "signature does not verify",
    );
    refused(
        &run(dir, &["firmware", "sign", "fw.bin", "--version", "1.2", "--key", "release.key"]),
        "MAJOR.MINOR.PATCH",
    );
}

#[test]
fn rsa_2048_keys_sign_manifests_the_seed_way_and_any_change_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let out = ok(&run(dir, &["keygen", "--algorithm", "rsa2048", "--out", "rsa.key"]));
    assert!(out.contains("rsa.key.pub"), "{out}");
    let public = std::fs::read_to_string(dir.join("rsa.key.pub")).unwrap();
    assert_eq!(public.trim().len(), 512, "the public key file holds the 2048-bit modulus in hex");
    assert!(std::fs::read_to_string(dir.join("rsa.key")).unwrap().contains("BEGIN PRIVATE KEY"));
    ok(&run(dir, &["keygen", "--out", "ed.key"]));
    std::fs::write(dir.join("fw.bin"), vec![0x3Cu8; 40_000]).unwrap();
    ok(&run(dir, &["firmware", "sign", "fw.bin", "--version", "2.0.0", "--key", "rsa.key"]));
    let manifest = std::fs::read_to_string(dir.join("fw.bin.manifest.json")).unwrap();
    assert!(manifest.contains("rsa2048-pkcs1v15-sha256"), "{manifest}");
    let out = ok(&run(dir, &["firmware", "verify", "fw.bin", "--public-key", "rsa.key.pub"]));
    assert!(out.contains("version 2.0.0"), "{out}");
    refused(
        &run(dir, &["firmware", "verify", "fw.bin", "--public-key", "ed.key.pub"]),
        "signature does not verify",
    );
    let edited = manifest.replace("\"2.0.0\"", "\"2.0.1\"");
    std::fs::write(dir.join("fw.bin.manifest.json"), edited).unwrap();
    refused(
        &run(dir, &["firmware", "verify", "fw.bin", "--public-key", "rsa.key.pub"]),
        "signature does not verify",
    );
}

#[test]
fn signing_with_a_public_key_is_refused_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(&run(dir, &["keygen", "--out", "release.key"]));
    ok(&run(dir, &["keygen", "--out", "other.key"]));
    std::fs::write(dir.join("fw.bin"), b"image").unwrap();
    ok(&run(dir, &["firmware", "sign", "fw.bin", "--version", "1.0.0", "--key", "release.key"]));
    let manifest = std::fs::read(dir.join("fw.bin.manifest.json")).unwrap();
    // The public key where the private one belongs (same length in hex).
    let sign =
        |key: &str| run(dir, &["firmware", "sign", "fw.bin", "--version", "1.0.1", "--key", key]);
    refused(&sign("release.key.pub"), "is a public key");
    // Copied under another name: it does not match the .pub beside it.
    std::fs::copy(dir.join("release.key.pub"), dir.join("copied.key")).unwrap();
    std::fs::copy(dir.join("other.key.pub"), dir.join("copied.key.pub")).unwrap();
    refused(&sign("copied.key"), "is not the private key of");
    // An RSA public key.
    ok(&run(dir, &["keygen", "--algorithm", "rsa2048", "--out", "rsa.key"]));
    std::fs::copy(dir.join("rsa.key.pub"), dir.join("rsa-public.key")).unwrap();
    refused(&sign("rsa-public.key"), "RSA public key");
    assert_eq!(std::fs::read(dir.join("fw.bin.manifest.json")).unwrap(), manifest, "untouched");
    ok(&run(dir, &["firmware", "verify", "fw.bin", "--public-key", "release.key.pub"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_stores_only_images_signed_by_its_keys_and_serves_them_by_range() {
    use ecowatt_testkit::server::{TempDb, TestServer};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let prep = dir.clone();
    tokio::task::spawn_blocking(move || {
        ok(&run(&prep, &["keygen", "--out", "release.key"]));
        ok(&run(&prep, &["keygen", "--out", "rogue.key"]));
        std::fs::write(prep.join("fw-1.0.10.bin"), vec![0xA5u8; 70_000]).unwrap();
        ok(&run(
            &prep,
            &["firmware", "sign", "fw-1.0.10.bin", "--version", "1.0.10", "--key", "release.key"],
        ));
        std::fs::write(prep.join("evil.bin"), vec![0x5Au8; 1_000]).unwrap();
        ok(&run(
            &prep,
            &["firmware", "sign", "evil.bin", "--version", "9.9.9", "--key", "rogue.key"],
        ));
    })
    .await
    .unwrap();
    let public = std::fs::read_to_string(dir.join("release.key.pub")).unwrap().trim().to_owned();
    let db = TempDb::sqlite();
    let server = TestServer::start_with(&db, true, "127.0.0.1:0", vec![public]).await;
    let (url, data_dir) = (server.url.clone(), server.data_dir.clone());
    tokio::task::spawn_blocking(move || {
        let with_server = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_ecowatt"))
                .args(args)
                .env("ECOWATT_SERVER", &url)
                .env("ECOWATT_DATA_DIR", &data_dir)
                .current_dir(&dir)
                .output()
                .unwrap()
        };
        refused(&with_server(&["firmware", "upload", "evil.bin"]), "unknown_signer");
        // The right signer, but one byte of the image changed after signing.
        let good = std::fs::read(dir.join("fw-1.0.10.bin")).unwrap();
        let mut bad = good.clone();
        bad[10] ^= 1;
        std::fs::write(dir.join("fw-1.0.10.bin"), &bad).unwrap();
        refused(&with_server(&["firmware", "upload", "fw-1.0.10.bin"]), "image_mismatch");
        std::fs::write(dir.join("fw-1.0.10.bin"), &good).unwrap();
        let out = ok(&with_server(&["firmware", "upload", "fw-1.0.10.bin"]));
        assert!(out.contains("version 1.0.10"), "{out}");
        refused(&with_server(&["firmware", "upload", "fw-1.0.10.bin"]), "already stored");

        // Original-firmware devices: offered as newer than 1.0.9 (not a string compare), never a downgrade.
        ok(&with_server(&["device", "add", "ESP32_EcoWatt_Smart"]));
        let check = |current: &str| -> serde_json::Value {
            ureq::post(format!("{url}/ota/check"))
                .send_json(serde_json::json!({"device_id": "ESP32_EcoWatt_Smart", "current_version": current}))
                .unwrap()
                .body_mut()
                .read_json()
                .unwrap()
        };
        let offer = check("1.0.9");
        assert_eq!((offer["update_available"].as_bool(), offer["version"].as_str()), (Some(true), Some("1.0.10")));
        assert_eq!(check("1.0.10")["update_available"], false);
        assert_eq!(check("1.1.0")["update_available"], false, "never a downgrade");
        // A cut download resumes with a range request.
        let download = format!("{url}{}", offer["url"].as_str().unwrap());
        let mut resp = ureq::get(&download).header("Range", "bytes=65536-").call().unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.headers()["content-range"], "bytes 65536-69999/70000");
        let tail = resp.body_mut().read_to_vec().unwrap();
        assert_eq!(tail, good[65_536..]);
        let whole = ureq::get(&download).call().unwrap().body_mut().with_config().limit(1 << 20).read_to_vec().unwrap();
        assert_eq!(whole, good);

        // The same image rolled out with the CLI, followed, paused, aborted.
        let out = ok(&with_server(&["firmware", "list"]));
        assert!(out.contains("1.0.10") && out.contains("70000"), "{out}");
        refused(&with_server(&["rollout", "start", "--version", "9.9.9", "--devices", "ESP32_EcoWatt_Smart"]), "not_found");
        refused(&with_server(&["rollout", "start", "--version", "1.0.10", "--devices", "ESP32_EcoWatt_Smart", "--waves", "50"]), "waves");
        let out = ok(&with_server(&["rollout", "start", "--version", "1.0.10", "--devices", "ESP32_EcoWatt_Smart"]));
        assert!(out.contains("rollout 1 of 1.0.10") && out.contains("running"), "{out}");
        assert!(out.contains("ESP32_EcoWatt_Smart") && out.contains("pending"), "{out}");
        assert!(ok(&with_server(&["rollout", "pause", "1"])).contains("paused"));
        refused(&with_server(&["rollout", "pause", "1"]), "cannot be paused");
        assert!(ok(&with_server(&["rollout", "resume", "1"])).contains("running"));
        let out = ok(&with_server(&["rollout", "abort", "1"]));
        assert!(out.contains("aborted") && out.contains("cancelled 1"), "{out}");
        assert!(ok(&with_server(&["rollout", "list"])).contains("aborted by"));

        // --waves 34,100 on 3 devices: 34 % of 3 is 1 device first, then the other 2.
        for name in ["roof-2", "roof-3"] {
            ok(&with_server(&["device", "add", name]));
        }
        let names = ["ESP32_EcoWatt_Smart", "roof-2", "roof-3"];
        let out = ok(&with_server(&[
            "rollout", "start", "--version", "1.0.10", "--devices", &names.join(","), "--waves", "34,100",
        ]));
        let mut waves: Vec<i64> = out
            .lines()
            .filter(|l| names.iter().any(|n| l.trim_start().starts_with(n)))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect();
        waves.sort_unstable();
        assert_eq!(waves, [1, 2, 2], "{out}");

        // An image over the server's 32 MiB: a clear refusal before sending,
        // not a broken pipe.
        let big = vec![0u8; 32 * 1024 * 1024 + 1];
        std::fs::write(dir.join("big.bin"), &big).unwrap();
        ok(&with_server(&["firmware", "sign", "big.bin", "--version", "2.0.0", "--key", "release.key"]));
        let out = with_server(&["firmware", "upload", "big.bin"]);
        refused(&out, "up to 32 MiB [body_too_large, HTTP 413]");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("Broken pipe") && !err.contains("cannot reach"), "{err}");
        // The server's own answer to such a body is the documented JSON,
        // from the declared length alone.
        use std::io::{Read, Write};
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
        let mut conn = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
        write!(
            conn,
            "POST /api/v1/firmware HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            token.trim(),
            big.len()
        )
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#"{"error":{"code":"body_too_large""#), "{answer}");
    })
    .await
    .unwrap();
    server.stop().await;
}

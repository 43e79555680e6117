//! `ecowatt keygen` and `ecowatt firmware sign|verify`, as a release manager uses them.

use std::process::{Command, Output};

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run ecowatt")
}

/// `ecowatt ARGS` in `dir` as the operator of the server at `url`.
fn against(url: &str, data_dir: &std::path::Path, dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(args)
        .env("ECOWATT_SERVER", url)
        .env("ECOWATT_DATA_DIR", data_dir)
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
        let with_server = |args: &[&str]| against(&url, &data_dir, &dir, args);
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

        // Original-firmware devices hear of an image only through a rollout
        // (tests below); the guide's plain download URL serves it, by range.
        ok(&with_server(&["device", "add", "ESP32_EcoWatt_Smart"]));
        let offer: serde_json::Value = ureq::post(format!("{url}/ota/check"))
            .send_json(
                serde_json::json!({"device_id": "ESP32_EcoWatt_Smart", "current_version": "1.0.9"}),
            )
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        assert_eq!(offer["update_available"], false, "{offer}");
        // A cut download resumes with a range request.
        let download = format!("{url}/ota/download/firmware_1.0.10.bin");
        let mut resp = ureq::get(&download).header("Range", "bytes=65536-").call().unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.headers()["content-range"], "bytes 65536-69999/70000");
        let tail = resp.body_mut().read_to_vec().unwrap();
        assert_eq!(tail, good[65_536..]);
        let whole = ureq::get(&download)
            .call()
            .unwrap()
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .unwrap();
        assert_eq!(whole, good);

        // The same image rolled out with the CLI, followed, paused, aborted.
        let out = ok(&with_server(&["firmware", "list"]));
        assert!(out.contains("1.0.10") && out.contains("70000"), "{out}");
        refused(
            &with_server(&[
                "rollout",
                "start",
                "--version",
                "9.9.9",
                "--devices",
                "ESP32_EcoWatt_Smart",
            ]),
            "not_found",
        );
        refused(
            &with_server(&[
                "rollout",
                "start",
                "--version",
                "1.0.10",
                "--devices",
                "ESP32_EcoWatt_Smart",
                "--waves",
                "50",
            ]),
            "waves",
        );
        let out = ok(&with_server(&[
            "rollout",
            "start",
            "--version",
            "1.0.10",
            "--devices",
            "ESP32_EcoWatt_Smart",
        ]));
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
            "rollout",
            "start",
            "--version",
            "1.0.10",
            "--devices",
            &names.join(","),
            "--waves",
            "34,100",
            "--encrypt",
        ]));
        assert!(
            out.contains("rollout 2 of 1.0.10 (") && out.contains(", encrypted): running"),
            "{out}"
        );
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
        ok(&with_server(&[
            "firmware",
            "sign",
            "big.bin",
            "--version",
            "2.0.0",
            "--key",
            "release.key",
        ]));
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

/// An unmodified original-firmware device updating over the original's
/// chunked OTA: the release manager signs with `--legacy` (the RSA key the
/// original firmware trusts), uploads and rolls out as for any device; the
/// device checks, fetches every chunk (HMAC-checked, AES-256-CBC), verifies
/// the RSA signature over the image, and reports the new version.
#[tokio::test]
async fn an_original_firmware_device_updates_over_the_legacy_chunked_ota() {
    use ecowatt_server::legacy::crypto;
    use ecowatt_server::settings::{LegacyFile, SettingsFile};
    use ecowatt_testkit::server::{TempDb, TestServer};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let prep = dir.clone();
    let image: Vec<u8> = (0..5_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let img = image.clone();
    tokio::task::spawn_blocking(move || {
        ok(&run(&prep, &["keygen", "--algorithm", "rsa2048", "--out", "legacy.key"]));
        ok(&run(&prep, &["keygen", "--out", "ed.key"]));
        std::fs::write(prep.join("fw.bin"), &img).unwrap();
        refused(
            &run(
                &prep,
                &[
                    "firmware",
                    "sign",
                    "fw.bin",
                    "--version",
                    "1.0.4",
                    "--key",
                    "ed.key",
                    "--legacy",
                ],
            ),
            "RSA",
        );
        ok(&run(
            &prep,
            &[
                "firmware",
                "sign",
                "fw.bin",
                "--version",
                "1.0.4",
                "--key",
                "legacy.key",
                "--legacy",
                "--target",
                "esp32-original",
            ],
        ));
    })
    .await
    .unwrap();
    let public = std::fs::read_to_string(dir.join("legacy.key.pub")).unwrap().trim().to_owned();
    let (aes_key, psk) = ([0x42u8; 32], "original-ota-psk");
    let db = TempDb::sqlite();
    let file = SettingsFile {
        legacy_api: Some(true),
        firmware_keys: Some(vec![public.clone()]),
        legacy: Some(LegacyFile {
            ota_aes_key: Some(ecowatt_proto::hex::encode_upper(&aes_key)),
            ota_hmac_psk: Some(psk.into()),
            ..LegacyFile::default()
        }),
        ..SettingsFile::default()
    };
    let server = TestServer::start_tuned(&db, "127.0.0.1:0", file).await;
    let (url, data_dir) = (server.url.clone(), server.data_dir.clone());
    tokio::task::spawn_blocking(move || {
        let cli = |args: &[&str]| against(&url, &data_dir, &dir, args);
        // A legacy signature that does not verify is refused at upload.
        let manifest_path = dir.join("fw.bin.manifest.json");
        let good_manifest = std::fs::read_to_string(&manifest_path).unwrap();
        let mut m: serde_json::Value = serde_json::from_str(&good_manifest).unwrap();
        let sig = m["legacy_signature"].as_str().unwrap().to_owned();
        m["legacy_signature"] = format!("A{}", &sig[1..]).into();
        std::fs::write(&manifest_path, m.to_string()).unwrap();
        refused(&cli(&["firmware", "upload", "fw.bin"]), "bad_legacy_signature");
        std::fs::write(&manifest_path, &good_manifest).unwrap();
        ok(&cli(&["firmware", "upload", "fw.bin"]));
        for name in ["old-1", "old-2"] {
            ok(&cli(&["device", "add", name]));
            assert!(ok(&cli(&["device", "legacy", name, "on"])).contains("marked legacy"));
        }
        let post = |path: &str, body: serde_json::Value| -> (u16, serde_json::Value) {
            let mut r = ureq::post(format!("{url}{path}"))
                .config()
                .http_status_as_error(false)
                .build()
                .send_json(body)
                .unwrap();
            (r.status().as_u16(), r.body_mut().read_json().unwrap())
        };
        let check = |dev: &str, v: &str| {
            post("/ota/check", serde_json::json!({"device_id": dev, "current_version": v})).1
        };
        assert_eq!(check("old-1", "1.0.3")["update_available"], false, "no rollout yet");
        ok(&cli(&["rollout", "start", "--version", "1.0.4", "--devices", "old-1,old-2"]));
        let offer = check("old-1", "1.0.3");
        assert_eq!(
            (offer["update_available"].as_bool(), offer["version"].as_str()),
            (Some(true), Some("1.0.4")),
            "{offer}"
        );
        assert_eq!(
            (offer["original_size"].as_u64(), offer["encrypted_size"].as_u64()),
            (Some(5_000), Some(5_008))
        );
        assert_eq!(
            (offer["chunk_size"].as_u64(), offer["total_chunks"].as_u64()),
            (Some(1024), Some(5))
        );
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let iv: [u8; 16] = b64.decode(offer["iv"].as_str().unwrap()).unwrap().try_into().unwrap();

        // The device's download: each chunk's HMAC over its bytes and number.
        let mut encrypted = Vec::new();
        for n in 0..5 {
            let (status, c) = post(
                "/ota/chunk",
                serde_json::json!({"device_id": "old-1", "version": "1.0.4", "chunk_number": n}),
            );
            assert_eq!(status, 200, "{c}");
            let data = b64.decode(c["chunk"]["data"].as_str().unwrap()).unwrap();
            assert_eq!(
                c["chunk"]["hmac"].as_str().unwrap(),
                crypto::hmac_hex(psk.as_bytes(), &[&data, n.to_string().as_bytes()])
            );
            assert_eq!(c["progress"]["chunks_received"], n + 1);
            encrypted.extend(data);
        }
        let plain = crypto::decrypt_cbc(&aes_key, &iv, &encrypted).unwrap();
        assert_eq!(plain, image);
        assert_eq!(offer["sha256_hash"].as_str().unwrap().len(), 64);
        let modulus: [u8; 256] = ecowatt_proto::hex::decode(&public).unwrap().try_into().unwrap();
        let sig = b64.decode(offer["signature"].as_str().unwrap()).unwrap();
        ecowatt_proto::firmware::verify_rsa2048(&modulus, &plain, &sig)
            .expect("the original's signature check");
        let out = ok(&cli(&["rollout", "show", "1"]));
        assert!(out.lines().any(|l| l.contains("old-1") && l.contains("downloading")), "{out}");

        // Bad chunk requests: the original's codes.
        let (status, v) = post(
            "/ota/chunk",
            serde_json::json!({"device_id": "old-1", "version": "1.0.4", "chunk_number": 5}),
        );
        assert_eq!((status, v["error"]["code"].as_str()), (404, Some("chunk_not_found")));
        let (status, v) = post(
            "/ota/chunk",
            serde_json::json!({"device_id": "old-1", "version": "9.9.9", "chunk_number": 0}),
        );
        assert_eq!((status, v["error"]["code"].as_str()), (400, Some("no_ota_session")));
        let (status, _) = post(
            "/ota/chunk",
            serde_json::json!({"device_id": "nobody", "version": "1.0.4", "chunk_number": 0}),
        );
        assert_eq!(status, 404);
        let (status, v) = post(
            "/ota/chunk",
            serde_json::json!({"device_id": "old-1", "version": "1.0.4", "chunk_number": -1}),
        );
        assert_eq!((status, v["error"]["field"].as_str()), (400, Some("chunk_number")));

        // The post-update self-test's GET /ota/status answers 200.
        let status: serde_json::Value =
            ureq::get(format!("{url}/ota/status")).call().unwrap().body_mut().read_json().unwrap();
        assert_eq!(status["sessions"]["old-1"]["chunks_downloaded"], 5, "{status}");
        // Rebooted into 1.0.4: its next check completes its part.
        assert_eq!(check("old-1", "1.0.4")["update_available"], false);
        // old-2 takes every chunk but comes back on 1.0.3: rolled back.
        check("old-2", "1.0.3");
        for n in 0..5 {
            post(
                "/ota/chunk",
                serde_json::json!({"device_id": "old-2", "version": "1.0.4", "chunk_number": n}),
            );
        }
        assert_eq!(check("old-2", "1.0.3")["update_available"], false);
        let out = ok(&cli(&["rollout", "show", "1"]));
        assert!(out.lines().any(|l| l.contains("old-1") && l.contains("succeeded")), "{out}");
        assert!(out.lines().any(|l| l.contains("old-2") && l.contains("rolled_back")), "{out}");
    })
    .await
    .unwrap();
    server.stop().await;
}

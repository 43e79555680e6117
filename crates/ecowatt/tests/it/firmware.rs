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

//! What the CLI tests share: the `ecowatt` binary run in a directory, its
//! outcome, children stopped when dropped, free ports.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A child process stopped (SIGINT, then killed) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(args)
        .current_dir(dir)
        .env_remove("ECOWATT_TOKEN")
        .env_remove("ECOWATT_SERVER")
        .env_remove("ECOWATT_CA_FILE")
        .output()
        .expect("run ecowatt")
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn ok(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    stdout
}

pub fn failed(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "succeeded: {stdout}");
    stderr
}

/// `ecowatt sim` on free ports, and its SIM HTTP API URL.
pub fn sim() -> (Killed, String) {
    use std::io::{BufRead, BufReader};
    let sim = Command::new(env!("CARGO_BIN_EXE_ecowatt"))
        .args(["sim", "--http", "127.0.0.1:0", "--modbus-tcp", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut sim = Killed(sim);
    let mut lines = BufReader::new(sim.0.stdout.take().unwrap()).lines();
    let inverter = lines
        .by_ref()
        .take(10)
        .find_map(|l| l.unwrap().split("SIM HTTP API : ").nth(1).map(|u| u.trim().to_owned()))
        .expect("the simulator's URL");
    // Read to the end: a simulator whose standard output closes before it
    // has printed its banner's last lines ends (quietly, as on `| head`).
    std::thread::spawn(move || lines.for_each(drop));
    (sim, inverter)
}

/// Waits until `f` holds (at most `secs`), else fails saying `what`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

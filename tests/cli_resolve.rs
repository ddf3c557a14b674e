//! `livemig resolve`: asks a destination what became of a session whose source is
//! in doubt, and exits 0 with the answer or 3 when it stays unknown.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, temp_path};

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

fn resolve(port: u16, session: &str, timeout_s: u64) -> (i32, serde_json::Value) {
    let out = Command::new(EXE)
        .args([
            "resolve",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--session",
            session,
            "--timeout",
            &timeout_s.to_string(),
            "--json",
        ])
        .stderr(Stdio::piped())
        .output()
        .expect("run livemig resolve");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}; stderr {:?}", out.stderr));
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn a_restarted_recv_answers_from_its_outcome_log() {
    // The log a previous `recv` left: one committed session, one that was still
    // restoring when that process ended (so it never committed).
    let log = temp_path("outcomes.log");
    std::fs::write(
        &log,
        "000000000000000000000000000000a1 committed\n000000000000000000000000000000b2 in_progress\n",
    )
    .unwrap();
    let port = free_port();
    let mut recv = Command::new(EXE)
        .args([
            "recv",
            "--plaintext",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--json",
            "--outcome-log",
            log.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn recv");
    // resolve retries until recv listens.
    let (code, v) = resolve(port, "000000000000000000000000000000a1", 10);
    assert_eq!((code, v["outcome"].as_str()), (0, Some("committed")), "{v}");
    let (code, v) = resolve(port, "000000000000000000000000000000b2", 10);
    assert_eq!((code, v["outcome"].as_str()), (0, Some("discarded")), "{v}");
    let (code, v) = resolve(port, "000000000000000000000000000000c3", 1);
    assert_eq!(code, 3, "an unknown session stays in doubt: {v}");
    assert_eq!(v["outcome"], "unresolved");
    assert!(
        v["detail"].as_str().unwrap_or_default().contains("unknown"),
        "{v}"
    );
    let _ = recv.kill();
    let _ = recv.wait();
    let _ = std::fs::remove_file(&log);
}

#[test]
fn nobody_answering_exits_in_doubt() {
    let port = free_port();
    let t = Instant::now();
    let (code, v) = resolve(port, "0123456789abcdef0123456789abcdef", 1);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["outcome"], "unresolved");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_malformed_session_is_rejected() {
    let out = Command::new(EXE)
        .args(["resolve", "--to", "127.0.0.1:1", "--session", "not-hex"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a session id"));
}

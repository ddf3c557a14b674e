//! Ctrl-C on `livemig bench` cancels the migration: non-zero exit, "cancelled",
//! source running, destination discarded.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigint_cancels_bench_cleanly() {
    let dir = std::env::temp_dir().join(format!("livemig-cli-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let events = dir.join("events.jsonl");
    // An unreachable target keeps pre-copy going for several rounds (throttle
    // steps, then the local-minimum switch), long enough to be interrupted.
    let mut child = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args([
            "bench",
            "--memory",
            "512M",
            "--dirty-rate",
            "400",
            "--hot-set",
            "256M",
            "--downtime-target",
            "0",
            "--max-rounds",
            "100000",
            "--events",
        ])
        .arg(&events)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the migration has started (the event file says so).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if text.contains("\"event\":\"started\"") {
            break;
        }
        assert!(Instant::now() < deadline, "migration never started");
        assert!(child.try_wait().unwrap().is_none(), "bench exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "cancelled bench must exit non-zero");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(stderr.contains("source running"), "{stderr}");
    assert!(stderr.contains("destination discarded"), "{stderr}");
    let text = std::fs::read_to_string(&events).unwrap();
    let last = text.lines().last().unwrap();
    assert!(last.contains("\"event\":\"failed\""), "{last}");
    assert!(last.contains("\"source_running\":true"), "{last}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! A real KVM guest migrates between two processes over loopback TCP while it dirties
//! memory, and keeps running on the destination without finding a stale page. The
//! negative control drops the final dirty pages and the guest must notice.
//!
//! Runs the `kvm_vmm` example binary, built here with `cargo build --example` (a no-op
//! when it is up to date; cargo reports the executable's path). Skips without `/dev/kvm`, fails instead when
//! `LIVEMIG_CI=1`.
#![cfg(feature = "kvm")]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn kvm_available() -> bool {
    let ci = std::env::var("LIVEMIG_CI").is_ok_and(|v| v == "1");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if ci => panic!("LIVEMIG_CI=1 but /dev/kvm is unusable: {e}"),
        Err(e) => {
            eprintln!("skipping: /dev/kvm is unusable: {e}");
            false
        }
    }
}

/// Build the example (with the `test` profile, optimised, or `release` when the tests
/// run in release) and return its path as reported by cargo itself.
fn example_binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // current_exe = <target>/<profile dir>/deps/e2e_kvm-<hash>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The example needs `vm-memory`; `tokio` too when this test was built with it,
        // so the library is not rebuilt with other features.
        let features = if cfg!(feature = "tokio") {
            "kvm,vm-memory,tokio"
        } else {
            "kvm,vm-memory"
        };
        cmd.args([
            "build",
            "--features",
            features,
            "--example",
            "kvm_vmm",
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .args(if release {
            ["--profile", "release"]
        } else {
            ["--profile", "test"]
        })
        .stderr(std::process::Stdio::inherit());
        if let Some(target_dir) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target_dir);
        }
        let out = cmd.output().expect("run cargo build");
        assert!(out.status.success(), "building the kvm_vmm example failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "kvm_vmm")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no kvm_vmm executable")
    })
}

fn demo(extra: &[&str]) -> Value {
    let out = Command::new(example_binary())
        .arg("demo")
        .args([
            "--mem-mib=16",
            "--pages=1024",
            "--warmup-ms=200",
            "--passes-after=8",
        ])
        .args(extra)
        .output()
        .expect("run kvm_vmm demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed: {stdout}");
    let line = stdout.lines().last().expect("demo printed nothing");
    eprintln!("{line}");
    serde_json::from_str(line).expect("last line is JSON")
}

#[test]
fn guest_migrates_and_continues() {
    if !kvm_available() {
        return;
    }
    let r = demo(&[]);
    assert_eq!(r["stale_pages"], 0, "{r}");
    assert_eq!(r["guest_continued"], true, "{r}");
    assert!(r["passes_after"].as_u64().unwrap() >= 8, "{r}");
    assert_eq!(
        r["first_pass_dst"].as_u64().unwrap(),
        r["last_pass_src"].as_u64().unwrap() + 1,
        "pass counter must go on from the source's value + 1: {r}"
    );
    assert_eq!(r["xmm7_ok"], true, "FPU/SSE state must survive: {r}");
    assert!(r["rounds"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["verified"], true, "engine digest must match: {r}");
    let downtime = r["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0 && downtime < 5_000.0, "{r}");
    let b = &r["downtime"];
    assert!(b["vcpu_state_bytes"].as_u64().unwrap() > 1000, "{r}");
    assert!(b["vm_state_bytes"].as_u64().unwrap() > 0, "{r}");
    for key in [
        "pause_vcpu_ms",
        "final_pages_ms",
        "state_save_ms",
        "state_restore_ms",
        "state_validate_ms",
        "commit_ms",
    ] {
        assert!(b[key].as_f64().is_some(), "breakdown lacks {key}: {r}");
    }
}

#[test]
fn dropping_final_pages_is_detected() {
    if !kvm_available() {
        return;
    }
    // With --drop-final-pages the source lets the guest complete one whole pass after
    // the last pre-copy harvest before it pauses, so every working-set page is in the
    // final round; dropping that round must be detected. Two detectors can fire:
    // - the engine's brownout digest: a page that was sent while the guest wrote it
    //   (a torn, racy zero-copy send) and is never re-sent leaves the sent and the
    //   applied hash tables different, so the destination vetoes and the switchover
    //   does not happen;
    // - otherwise the digests agree (both sides hold the older version) and the guest,
    //   running on the destination, finds the stale pages itself.
    let out = Command::new(example_binary())
        .args([
            "demo",
            "--mem-mib=16",
            "--pages=1024",
            "--warmup-ms=200",
            "--passes-after=8",
        ])
        .args(["--drop-final-pages", "--max-rounds=2"])
        .output()
        .expect("run kvm_vmm demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    if !out.status.success() {
        assert!(
            stderr.contains("memory digest mismatch"),
            "the demo failed, but not because the engine detected the dropped pages: {stderr}"
        );
        eprintln!("detected by the engine's digest: the switchover was refused");
        return;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.lines().last().expect("demo printed nothing"))
        .expect("last line is JSON");
    eprintln!("{r}");
    assert!(
        r["downtime"]["final_pages_dropped"].as_u64().unwrap() >= 1024,
        "the whole working set should have been dropped: {r}"
    );
    assert!(
        r["stale_pages"].as_u64().unwrap() >= 1,
        "stale page not detected: {r}"
    );
    assert_eq!(r["guest_continued"], false, "{r}");
}

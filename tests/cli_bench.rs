//! `livemig bench` end to end: the JSON report's last line.

use std::process::Command;

mod common;

use common::REPORT_KEYS;

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

fn bench(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(EXE)
        .args(["bench", "--memory", "32M", "--json"])
        .args(extra)
        .output()
        .expect("run livemig bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .expect("bench printed nothing");
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    for k in REPORT_KEYS {
        assert!(v.get(k).is_some(), "bench JSON lacks {k}: {v}");
    }
    assert_eq!(v["verified"], true, "{v}");
    assert!(v["converged"].is_boolean(), "{v}");
    assert_eq!(v["memory_bytes"], 32u64 << 20);
    assert!(v["pages_sent"].as_u64().unwrap() >= 8192);
    v
}

#[test]
fn bench_default_json() {
    let v = bench(&[]);
    assert_eq!(v["converged"], true, "{v}");
    assert_eq!(v["tracker"], "explicit");
    assert_eq!(v["mode"], "multichannel");
    assert_eq!(v["guest_pages"], "huge", "{v}");
}

/// The source guest's page size is a choice the report states: huge by default,
/// small on request, and small by default under userfaultfd tracking (which would
/// report a whole huge page for one write).
#[test]
fn bench_guest_pages_are_chosen_and_reported() {
    let v = bench(&["--guest-pages", "small", "--dirty-rate", "10"]);
    assert_eq!(v["guest_pages"], "small", "{v}");
    let v = bench(&["--tracker", "hash", "--dirty-rate", "10"]);
    assert_eq!(v["guest_pages"], "huge", "{v}");
    if cfg!(feature = "uffd") {
        let v = bench(&["--tracker", "uffd", "--dirty-rate", "10"]);
        assert_eq!(v["guest_pages"], "small", "{v}");
        let v = bench(&[
            "--tracker",
            "uffd",
            "--guest-pages",
            "huge",
            "--dirty-rate",
            "10",
        ]);
        assert_eq!(v["guest_pages"], "huge", "{v}");
    }
}

#[test]
fn bench_hash_tracker_compress_json() {
    let v = bench(&[
        "--tracker",
        "hash",
        "--mode",
        "compress",
        "--codec",
        "zstd",
        "--streams",
        "2",
        "--dirty-rate",
        "10",
    ]);
    assert_eq!(v["tracker"], "hash");
    assert_eq!(v["mode"], "compress");
}

/// `--baseline` measures the machine's limits in the same run and reports the
/// migration's wire rate against both (hot-buffer TCP and memory-to-memory TCP).
#[test]
fn bench_baseline_reports_limits_and_ratios() {
    let v = bench(&["--baseline", "--dirty-rate", "0"]);
    for k in [
        "limit_wire_gbit_per_s",
        "limit_mem_wire_gbit_per_s",
        "limit_memcpy_gb_per_s",
    ] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{k} = {x}");
    }
    let wire = v["wire_gbit_per_s"].as_f64().unwrap();
    let r = v["wire_vs_limit"].as_f64().unwrap();
    let expect = wire / v["limit_wire_gbit_per_s"].as_f64().unwrap();
    assert!((r - expect).abs() < 1e-9, "wire_vs_limit {r} != {expect}");
    let rm = v["wire_vs_mem_limit"].as_f64().unwrap();
    let expect = wire / v["limit_mem_wire_gbit_per_s"].as_f64().unwrap();
    assert!(
        (rm - expect).abs() < 1e-9,
        "wire_vs_mem_limit {rm} != {expect}"
    );
}

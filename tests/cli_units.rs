//! Command-line quantities with their units, end to end through `livemig bench`:
//! accepted with units and as plain numbers, and refused with the flag's name.

use std::process::{Command, Output};

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

fn bench(args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("bench")
        .args(args)
        .output()
        .expect("run livemig bench")
}

fn report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[test]
fn units_as_typed_reach_the_migration() {
    let v = report(&bench(&[
        "--json",
        "--memory",
        "32MiB",
        "--hot-set",
        "4M",
        "--dirty-rate",
        "8MB/s",
        "--downtime-target",
        "0.05s",
        "--max-time",
        "1m",
        "--phase-change-ms",
        "1s",
    ]));
    assert_eq!(v["memory_bytes"], 32u64 << 20);
    assert_eq!(v["hot_set_bytes"], 4u64 << 20);
    assert_eq!(v["dirty_rate_mb_s"], 8.0);
    assert_eq!(v["verified"], true, "{v}");
}

#[test]
fn plain_numbers_keep_their_old_units() {
    let v = report(&bench(&[
        "--json",
        "--memory",
        "33554432",
        "--dirty-rate",
        "8",
        "--downtime-target",
        "50",
        "--max-time",
        "60",
    ]));
    assert_eq!(v["memory_bytes"], 32u64 << 20);
    assert_eq!(v["dirty_rate_mb_s"], 8.0);
}

#[test]
fn bad_units_name_the_flag_and_the_accepted_forms() {
    for (flag, value, form) in [
        ("--memory", "2Q", "2GiB"),
        ("--dirty-rate", "400Mbit/s", "400MB/s"),
        ("--downtime-target", "50 parsecs", "0.05s"),
        ("--max-time", "soon", "10m"),
        ("--bandwidth", "1GB/s", "1gbit"),
    ] {
        let out = bench(&[flag, value]);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert!(err.contains(form), "{flag} {value}: {err}");
    }
}

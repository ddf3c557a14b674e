//! The fault campaign: a fixed-seed run of `livemig chaos` holds every
//! invariant (nothing lost, no source damaged, never both running, every run
//! completed, failed cleanly or resolved), and its JSON line adds up.

use std::process::Command;

use livemig::chaos::plan::Plan;
use livemig::chaos::{self, CampaignConfig};

const EXE: &str = env!("CARGO_BIN_EXE_livemig");

/// Enough runs to reach several fault classes and phases, few enough for seconds.
const RUNS: u64 = 12;
const SEED: u64 = 20;

#[test]
fn a_fixed_seed_campaign_holds_every_invariant() {
    let out = Command::new(EXE)
        .args([
            "chaos",
            "--runs",
            &RUNS.to_string(),
            "--seed",
            &SEED.to_string(),
            "--json",
        ])
        .output()
        .expect("run livemig chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"));
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {line}"));
    assert!(
        out.status.success(),
        "exit {:?}; stdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(n("runs"), RUNS);
    assert_eq!(n("seed"), SEED);
    assert_eq!(n("pages_lost"), 0, "{stdout}");
    assert_eq!(n("source_damaged"), 0, "{stdout}");
    assert_eq!(n("both_running"), 0, "{stdout}");
    assert_eq!(
        n("completed") + n("failed_clean") + n("in_doubt_resolved"),
        RUNS,
        "{stdout}"
    );
    assert!(n("resumed") <= n("completed"));
    assert!(n("transient_resumed") <= n("transient_faults"));
    // Faults did fire and had an effect: some run reconnected, failed or was in
    // doubt (with setup restarts, every run of a campaign may well complete).
    assert!(n("no_fault_fired") < RUNS, "no fault fired: {stdout}");
    assert!(
        n("resumed") + n("failed_clean") + n("in_doubt_resolved") > 0,
        "no fault had an effect: {stdout}"
    );
    // The table names the classes that fired.
    assert!(stdout.contains("fault class"), "{stdout}");
}

#[test]
fn a_run_replays_from_its_seed() {
    // The library's plan for a seed is what `--runs 1 --seed S` runs.
    let cfg = CampaignConfig::default();
    let plan = Plan::from_seed(SEED + 3, &cfg.deadlines);
    let mut seen = Vec::new();
    let s = chaos::campaign(1, SEED + 3, 1, &cfg, |r| seen.push(r.plan.clone())).unwrap();
    assert_eq!(seen, vec![plan]);
    assert_eq!(s.runs, 1);
    assert!(s.holds(), "{s:?}");
}

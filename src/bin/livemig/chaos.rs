//! `livemig chaos`: the fault campaign (see `livemig::chaos` and
//! docs/FAULTS.md, "The fault campaign").

use clap::Args;

use livemig::chaos::{self, CampaignConfig, RunReport, Summary};

use crate::CliError;

/// Arguments of `livemig chaos`.
#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Migrations to run, each with one or more random faults.
    #[arg(long, default_value_t = 100)]
    runs: u64,
    /// First seed (run i uses seed + i; `--runs 1 --seed S` replays run S).
    /// Default: drawn from the clock and printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Runs carried out at once (each mostly waits on its shortened deadlines).
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Print every run's plan and verdict, not only the ones that broke an invariant
    /// (`-v` is the global log level).
    #[arg(long)]
    every_run: bool,
}

fn print_run(r: &RunReport, detail: bool) {
    let v = &r.verdict;
    let fired: Vec<String> = r
        .faults
        .iter()
        .map(|f| format!("{}{}", f.fault, if f.fired { "" } else { " [not reached]" }))
        .collect();
    println!(
        "run seed {}: {} in {} ms{}",
        r.plan.seed,
        v.outcome.name(),
        r.wall.as_millis(),
        match (v.resumed, r.setup_restarted) {
            (true, true) => " (resumed: setup restarted)",
            (true, false) => " (resumed)",
            _ => "",
        }
    );
    if !detail {
        return;
    }
    println!("  plan: {}", r.plan);
    println!("  faults: {}", fired.join("; "));
    if let Some(e) = &r.error {
        println!("  source error: {e}");
    }
    for p in &v.problems {
        println!("  PROBLEM: {p}");
    }
    for t in &r.timeline {
        println!("    {t}");
    }
    println!("  replay: livemig chaos --runs 1 --seed {}", r.plan.seed);
}

fn print_table(s: &Summary) {
    println!(
        "{:<14} {:>6} {:>10} {:>8} {:>13} {:>18} {:>9}",
        "fault class",
        "runs",
        "completed",
        "resumed",
        "failed_clean",
        "in_doubt_resolved",
        "problems"
    );
    for (name, r) in &s.classes {
        println!(
            "{:<14} {:>6} {:>10} {:>8} {:>13} {:>18} {:>9}",
            name, r.runs, r.completed, r.resumed, r.failed_clean, r.in_doubt_resolved, r.problems
        );
    }
    println!(
        "{:<14} {:>6} {:>10} {:>8} {:>13} {:>18} {:>9}",
        "all runs", s.runs, s.completed, s.resumed, s.failed_clean, s.in_doubt_resolved, s.broken
    );
    println!(
        "pages_lost {}, source_damaged {}, both_running {}; {} run(s) with only transient faults, {} of them resumed ({} by a setup restart); {} run(s) in which no fault fired; {} ms",
        s.pages_lost,
        s.source_damaged,
        s.both_running,
        s.transient_faults,
        s.transient_resumed,
        s.transient_setup_restarted,
        s.no_fault_fired,
        s.wall_ms
    );
}

/// Run the campaign; exit 1 if an invariant broke.
pub fn run(a: ChaosArgs) -> Result<(), CliError> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "livemig chaos: {} run(s) from seed {seed}, {} at a time",
        a.runs, a.jobs
    );
    let cfg = CampaignConfig::default();
    let mut n = 0u64;
    let s = chaos::campaign(a.runs, seed, a.jobs, &cfg, |r| {
        n += 1;
        let broken = r.verdict.outcome == chaos::check::Outcome::Broken;
        if broken || a.every_run {
            print_run(r, true);
        }
        if n.is_multiple_of(100) {
            eprintln!("livemig chaos: {n}/{} runs", a.runs);
        }
    })
    .map_err(|e| e.to_string())?;
    print_table(&s);
    if a.json {
        println!("{}", serde_json::to_string(&s).map_err(|e| e.to_string())?);
    }
    if s.holds() {
        Ok(())
    } else {
        Err(CliError {
            message: format!(
                "invariants broken in {} run(s) (seeds {:?}); replay each with --runs 1 --seed S",
                s.broken, s.broken_seeds
            ),
            code: 1,
        })
    }
}

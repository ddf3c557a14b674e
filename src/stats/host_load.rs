//! Whether other processes keep this host's CPUs busy: the input of the downtime
//! model's stall term ([`crate::stats::estimator::FixedCosts::observe_host_load`]).
//!
//! Inside the downtime our threads hand work to each other (the round loop to the
//! page workers, the control stream to the destination's threads and back). On a
//! host with an idle CPU each hand-off takes tens of microseconds. When every CPU
//! runs something else, a woken thread sometimes waits for the scheduler's next
//! tick or for the hypervisor to run the vCPU again: on this project's machine, one
//! wake-up in a few hundred waited 3-4 ms with both CPUs kept busy (a sleep of
//! 300 µs, 1,500 times), and one-core-busy convergence matrices saw a brownout of
//! 1-3 ms predicted take 4.8 ms, its commit round trip 4.3 ms. The model budgets
//! one such stall when the host is busy.
//!
//! What counts is other processes' threads that are runnable while our own VM is
//! about to stop: the kernel's count of runnable threads (`/proc/loadavg`) less
//! those of this process in state `R`, which include the VMM's vCPU threads (they
//! stop at the pause) and, in `bench`, the destination. The kernel's count and ours
//! are read alternately, twice each, and a sample in which either changed is
//! dropped; of a few samples the median is kept, so that a thread passing through
//! neither makes an idle host look busy nor hides a busy one. A sample costs about
//! 0.4 ms (a `/proc` read per thread of ours, twice).

use std::time::Duration;

/// Threads of other processes runnable right now, or `None` where `/proc` does
/// not say (not Linux, hidden), or either count changed while the other was taken
/// (they are not taken at one instant: the host's count is read around our own,
/// twice, and all must agree; a VMM's vCPU threads that run in bursts would
/// otherwise make an idle host look busy).
pub fn others_runnable() -> Option<u64> {
    let all = runnable()?;
    let ours = own_running()?;
    let all_again = runnable()?;
    let ours_again = own_running()?;
    (all == all_again && ours == ours_again && all == runnable()?).then(|| all.saturating_sub(ours))
}

/// The median of `samples` clean counts of [`others_runnable`], `gap` apart, out
/// of at most three times as many tries (samples in which the counts moved are
/// dropped, and on a loaded host many are); `None` if none was clean.
pub fn others_runnable_median(samples: u32, gap: Duration) -> Option<u64> {
    let samples = samples.max(1) as usize;
    let mut counts = Vec::with_capacity(samples);
    for i in 0..samples * 3 {
        if counts.len() == samples {
            break;
        }
        if i > 0 {
            std::thread::sleep(gap);
        }
        counts.extend(others_runnable());
    }
    counts.sort_unstable();
    counts.get(counts.len() / 2).copied()
}

/// Whether `others` runnable threads leave fewer CPUs than the downtime's hand-offs
/// need: two of our threads run at once there (a sender and a receiver side), so
/// the host is busy when fewer than two CPUs are left to them.
pub fn is_busy(others: u64, cpus: u64) -> bool {
    others + 2 > cpus
}

/// Whether other processes keep this host busy now: the median of three clean
/// samples, 50 µs apart, judged by [`is_busy`] against this process's CPUs (false
/// where `/proc` does not say).
pub fn host_is_busy() -> bool {
    others_runnable_median(3, Duration::from_micros(50)).is_some_and(|n| is_busy(n, cpus()))
}

/// CPUs this process may run on.
pub fn cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// Runnable threads on the host: the numerator of the fourth field of
/// `/proc/loadavg` (the kernel's `nr_running()`, as `procs_running` in
/// `/proc/stat`, in a file a tenth the size).
fn runnable() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    parse_runnable(&text)
}

fn parse_runnable(loadavg: &str) -> Option<u64> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .0
        .parse()
        .ok()
}

/// Threads of this process in state `R` (the caller's own included).
fn own_running() -> Option<u64> {
    let mut n = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        // A thread that exited meanwhile has no stat: it is not running.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if task_state(&stat) == Some('R') {
            n += 1;
        }
    }
    Some(n)
}

/// The state letter of a `/proc/<pid>/task/<tid>/stat` line: the first field after
/// the command name, which is in parentheses and may itself hold `)` or spaces.
fn task_state(stat: &str) -> Option<char> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_count_and_the_state_letter() {
        assert_eq!(parse_runnable("0.97 1.14 1.45 3/107 30265\n"), Some(3));
        assert_eq!(parse_runnable("0.97 1.14 1.45\n"), None);
        assert_eq!(parse_runnable("0.97 1.14 1.45 x/107 1\n"), None);
        assert_eq!(task_state("42 (livemig-send0) R 1 2 3"), Some('R'));
        // A command name with a parenthesis and a space in it.
        assert_eq!(task_state("42 (a) S (b) R 1 2"), Some('R'));
        assert_eq!(task_state("42 (idle) S 1 2"), Some('S'));
        assert_eq!(task_state("garbage"), None);
    }

    #[test]
    fn busy_when_fewer_than_two_cpus_are_left() {
        assert!(!is_busy(0, 2));
        assert!(is_busy(1, 2));
        assert!(!is_busy(1, 4));
        assert!(is_busy(3, 4));
        assert!(is_busy(0, 1));
    }

    #[test]
    fn a_spinning_process_is_counted_and_our_own_threads_are_not() {
        if !std::path::Path::new("/proc/self/task").exists() {
            eprintln!("skipped: no /proc on this system");
            assert!(
                std::env::var_os("LIVEMIG_CI").is_none(),
                "LIVEMIG_CI is set but /proc is missing"
            );
            return;
        }
        // Our own spinning thread is ours: it must not count as another process.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let spinner = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        let ours = own_running().expect("own threads");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().unwrap();
        // This thread and the spinner, at least (other tests may run too).
        assert!(ours >= 2, "own running threads: {ours}");
        // Another process that spins is counted.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawn a spinning shell");
        std::thread::sleep(Duration::from_millis(50));
        let others = others_runnable_median(5, Duration::from_millis(2));
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            others.is_some_and(|n| n >= 1),
            "a spinning process runs beside us: {others:?}"
        );
    }
}

//! Cost of the userfaultfd trackers on this machine: per-write-fault cost and harvest
//! time over 1 GiB (clean, 1 % and 100 % dirty), for the async and sync modes.
//!
//! `cargo run --release --example uffd_cost [GiB] [reps]`

#[cfg(not(feature = "uffd"))]
fn main() {
    eprintln!("uffd_cost needs the `uffd` feature");
}

#[cfg(feature = "uffd")]
fn main() {
    imp::main()
}

#[cfg(feature = "uffd")]
mod imp {
    use std::time::Instant;

    use livemig::dirty::{DirtyTracker, UffdMode, UffdTracker};
    use livemig::memory::PageSet;
    use livemig::{GuestMemory, PAGE_SIZE};

    fn stats(mut v: Vec<f64>) -> String {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        format!("{:.3} ({:.3}-{:.3})", v[v.len() / 2], v[0], v[v.len() - 1])
    }

    /// Write one u64 into every `stride`-th page; returns seconds.
    fn touch(mem: &GuestMemory, stride: u64, value: u64) -> f64 {
        let r = &mem.regions()[0];
        let t = Instant::now();
        let mut p = 0;
        while p < r.pages() {
            r.write_u64(p as usize * PAGE_SIZE, value).unwrap();
            p += stride;
        }
        t.elapsed().as_secs_f64()
    }

    pub fn main() {
        let mut args = std::env::args().skip(1);
        let gib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
        let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
        let mem = GuestMemory::anonymous(gib << 30, false).unwrap();
        let pages = mem.total_pages();
        mem.regions()[0].prefault(0, pages).unwrap();
        // Baseline: the same write loop on populated, untracked memory.
        let base: Vec<f64> = (0..reps)
            .map(|i| touch(&mem, 1, i as u64) * 1e9 / pages as f64)
            .collect();
        println!("{gib} GiB, {pages} pages, populated 4 KiB pages, reps={reps}; median (min-max)");
        println!("untracked write loop: {} ns/page", stats(base.clone()));
        let base_med = {
            let mut b = base.clone();
            b.sort_by(|a, b| a.partial_cmp(b).unwrap());
            b[b.len() / 2]
        };

        for mode in [UffdMode::Async, UffdMode::Sync] {
            let mut t = UffdTracker::new(mode);
            let t0 = Instant::now();
            if let Err(e) = t.start(&mem) {
                println!("{mode:?}: unavailable: {e}");
                continue;
            }
            let start_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut set = PageSet::new(pages);
            let (mut fault_us, mut h_clean, mut h_full, mut h_1pct) =
                (vec![], vec![], vec![], vec![]);
            for rep in 0..reps {
                set.clear();
                let t0 = Instant::now();
                t.harvest(&mem, &mut set).unwrap();
                h_clean.push(t0.elapsed().as_secs_f64() * 1e3);
                assert!(set.is_empty());

                // 100 %: every page takes one write-protect fault.
                let s = touch(&mem, 1, rep as u64 + 100);
                fault_us.push((s * 1e9 / pages as f64 - base_med) / 1e3);
                set.clear();
                let t0 = Instant::now();
                t.harvest(&mem, &mut set).unwrap();
                h_full.push(t0.elapsed().as_secs_f64() * 1e3);
                assert_eq!(set.count(), pages);

                // 1 %: every 100th page.
                touch(&mem, 100, rep as u64 + 200);
                set.clear();
                let t0 = Instant::now();
                t.harvest(&mem, &mut set).unwrap();
                h_1pct.push(t0.elapsed().as_secs_f64() * 1e3);
                assert_eq!(set.count(), pages.div_ceil(100));
            }
            let t0 = Instant::now();
            t.stop(&mem).unwrap();
            let stop_ms = t0.elapsed().as_secs_f64() * 1e3;
            println!(
                "{}: start {start_ms:.2} ms, stop {stop_ms:.2} ms\n  WP fault (minus baseline): {} us/fault\n  harvest clean: {} ms\n  harvest 1% dirty: {} ms\n  harvest 100% dirty: {} ms",
                t.name(),
                stats(fault_us),
                stats(h_clean),
                stats(h_1pct),
                stats(h_full)
            );
        }

        // First write to never-touched memory: untracked vs. under each tracker
        // (the WP_UNPOPULATED marker path), 256 MiB fresh mapping per rep.
        let fresh = 256usize << 20;
        let fresh_pages = (fresh / PAGE_SIZE) as f64;
        let first_touch = |mode: Option<UffdMode>| -> Option<String> {
            let mut v = vec![];
            for rep in 0..reps {
                let m = GuestMemory::anonymous(fresh, false).unwrap();
                let mut t = mode.map(UffdTracker::new);
                if let Some(t) = t.as_mut() {
                    if let Err(e) = t.start(&m) {
                        return Some(format!("unavailable: {e}"));
                    }
                }
                v.push(touch(&m, 1, rep as u64 + 1) * 1e6 / fresh_pages);
                if let Some(t) = t.as_mut() {
                    let mut set = PageSet::new(m.total_pages());
                    t.harvest(&m, &mut set).unwrap();
                    assert_eq!(set.count(), m.total_pages());
                    t.stop(&m).unwrap();
                }
            }
            Some(stats(v))
        };
        println!("first write to never-touched 4 KiB pages (256 MiB), us/page:");
        for (label, mode) in [
            ("untracked", None),
            ("uffd-async", Some(UffdMode::Async)),
            ("uffd-sync", Some(UffdMode::Sync)),
        ] {
            println!("  {label}: {}", first_touch(mode).unwrap_or_default());
        }
    }
}

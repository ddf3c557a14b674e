//! userfaultfd write-protect trackers: exact reporting (including never-touched
//! pages and multi-region memory), re-arming, concurrent writers, clean stop/drop.
//!
//! A mode the kernel lacks is skipped with its reason, unless `LIVEMIG_CI=1`, where
//! it fails.
#![cfg(feature = "uffd")]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use livemig::dirty::{DirtyTracker, TrackError, UffdMode, UffdTracker};
use livemig::memory::PageSet;
use livemig::{GuestMemory, GuestRegion, PAGE_SIZE};

fn ci() -> bool {
    std::env::var("LIVEMIG_CI").is_ok_and(|v| v == "1")
}

/// Start a tracker of `mode` over `mem`, or `None` (printed reason) when the kernel
/// lacks it and we are not under CI.
fn start(mode: UffdMode, mem: &GuestMemory) -> Option<UffdTracker> {
    let mut t = UffdTracker::new(mode);
    match t.start(mem) {
        Ok(()) => Some(t),
        Err(e @ TrackError::Unavailable { .. }) => {
            if ci() {
                panic!("uffd mode {mode:?} unavailable under LIVEMIG_CI=1: {e}");
            }
            eprintln!("skipping uffd mode {mode:?}: {e}");
            None
        }
        Err(e) => panic!("starting uffd mode {mode:?} failed: {e}"),
    }
}

/// The workload's guest write: one u64 into page `index`.
fn write_page(mem: &GuestMemory, index: u64, value: u64) {
    let (r, p) = mem.locate(index).unwrap();
    let off = p as usize * PAGE_SIZE + (value as usize % (PAGE_SIZE / 8)) * 8;
    mem.regions()[r].write_u64(off, value).unwrap();
}

fn read_page(mem: &GuestMemory, index: u64) {
    let mut buf = vec![0u8; PAGE_SIZE];
    mem.read_pages(index, &mut buf).unwrap();
}

fn harvest(t: &mut UffdTracker, mem: &GuestMemory) -> BTreeSet<u64> {
    let mut set = PageSet::new(mem.total_pages());
    t.harvest(mem, &mut set).unwrap();
    set.iter().collect()
}

fn exact_single_region(mode: UffdMode) {
    let mem = GuestMemory::anonymous(64 << 20, false).unwrap();
    let n = mem.total_pages();
    // Some pages populated by writes, some only read (zero page), most untouched.
    for i in 0..64 {
        write_page(&mem, i, i + 1);
    }
    for i in 200..264 {
        read_page(&mem, i);
    }
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    if mode == UffdMode::Auto {
        assert!(
            t.name() == "uffd-async" || t.name() == "uffd-sync",
            "{}",
            t.name()
        );
    } else {
        assert_eq!(
            t.name(),
            if mode == UffdMode::Async {
                "uffd-async"
            } else {
                "uffd-sync"
            }
        );
    }
    assert!(
        harvest(&mut t, &mem).is_empty(),
        "nothing written since start"
    );

    // Populated, zero-page-mapped and never-touched pages, both ends of memory.
    let written: BTreeSet<u64> =
        [0, 5, 63, 64, 201, 263, 1000, 1001, 1002, 8191, 8192, n - 1].into();
    for &i in &written {
        write_page(&mem, i, 0xdead_0000 + i);
    }
    // Reads of never-touched / populated pages are not writes.
    for i in [3000, 3001, 7, 230] {
        read_page(&mem, i);
    }
    assert_eq!(harvest(&mut t, &mem), written);
    assert!(
        harvest(&mut t, &mem).is_empty(),
        "second harvest must be empty"
    );

    // Re-armed: the same pages (and a new one) are reported again.
    let again: BTreeSet<u64> = [5, 1001, n - 1, 4242].into();
    for &i in &again {
        write_page(&mem, i, 7);
        write_page(&mem, i, 8);
    }
    assert_eq!(harvest(&mut t, &mem), again);
    assert!(harvest(&mut t, &mem).is_empty());
    t.stop(&mem).unwrap();
    // After stop writes proceed untracked (and do not block).
    for i in 0..n {
        write_page(&mem, i, i);
    }
}

fn two_regions(mode: UffdMode) {
    let mem = GuestMemory::new(vec![
        GuestRegion::anonymous(1 << 30, 8 << 20, false).unwrap(),
        GuestRegion::anonymous(0, 16 << 20, false).unwrap(),
    ])
    .unwrap();
    let first2 = mem.region_first_page(1);
    assert_eq!(first2, 4096);
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    let written: BTreeSet<u64> = [
        0,
        17,
        4095,
        first2,
        first2 + 1,
        first2 + 999,
        mem.total_pages() - 1,
    ]
    .into();
    for &i in &written {
        write_page(&mem, i, i * 3 + 1);
    }
    assert_eq!(harvest(&mut t, &mem), written);
    assert!(harvest(&mut t, &mem).is_empty());
    write_page(&mem, first2 + 2, 1);
    write_page(&mem, 4095, 1);
    assert_eq!(harvest(&mut t, &mem), [4095, first2 + 2].into());
    t.stop(&mem).unwrap();
}

/// Writers dirty random pages while the main thread runs pre-copy rounds: harvest,
/// then copy the harvested pages into a shadow. After the writers stop and a final
/// round, (1) every written page was reported, (2) nothing unwritten was (exact), and
/// (3) the shadow equals memory — the migration-correctness form of the contract.
fn concurrent_writers(mode: UffdMode, writers: u64) {
    let mem = Arc::new(
        GuestMemory::new(vec![
            GuestRegion::anonymous(0, 32 << 20, false).unwrap(),
            GuestRegion::anonymous(1 << 30, 32 << 20, false).unwrap(),
        ])
        .unwrap(),
    );
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    let n = mem.total_pages();
    // Round 0: copy everything.
    let mut shadow = vec![0u8; n as usize * PAGE_SIZE];
    for (i, r) in mem.regions().iter().enumerate() {
        let off = mem.region_first_page(i) as usize * PAGE_SIZE;
        r.read_pages(0, &mut shadow[off..off + r.len()]).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut wrote = BTreeSet::new();
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (w << 32);
                let mut count = 0u64;
                while (!stop.load(Ordering::Relaxed) || count < 20_000) && count < 200_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Skewed: half the writes hit a hot 1/64 of memory (shared by
                    // all writers, so faults on the same page collide).
                    let i = if x & 1 == 0 {
                        (x >> 8) % (n / 64)
                    } else {
                        (x >> 8) % n
                    };
                    write_page(&mem, i, x);
                    wrote.insert(i);
                    count += 1;
                }
                wrote
            })
        })
        .collect();
    let mut union = PageSet::new(n);
    let mut round = PageSet::new(n);
    let mut copy_round = |t: &mut UffdTracker, union: &mut PageSet, shadow: &mut [u8]| {
        round.clear();
        t.harvest(&mem, &mut round).unwrap();
        for i in round.iter() {
            let off = i as usize * PAGE_SIZE;
            mem.read_pages(i, &mut shadow[off..off + PAGE_SIZE])
                .unwrap();
        }
        union.union_with(&round);
    };
    let mut harvests = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_millis(300) {
        copy_round(&mut t, &mut union, &mut shadow);
        harvests += 1;
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mut wrote = BTreeSet::new();
    for h in handles {
        wrote.extend(h.join().unwrap());
    }
    copy_round(&mut t, &mut union, &mut shadow);
    let got: BTreeSet<u64> = union.iter().collect();
    let missing: Vec<u64> = wrote.difference(&got).copied().take(10).collect();
    assert!(
        missing.is_empty(),
        "{} of {} written pages never reported, e.g. {missing:?}",
        wrote.difference(&got).count(),
        wrote.len()
    );
    // Exact tracker: nothing reported that was not written.
    let extra: Vec<u64> = got.difference(&wrote).copied().take(10).collect();
    assert!(extra.is_empty(), "reported but never written: {extra:?}");
    // The shadow (what a destination would hold) equals memory.
    let mut buf = vec![0u8; PAGE_SIZE];
    let stale: Vec<u64> = (0..n)
        .filter(|&i| {
            mem.read_pages(i, &mut buf).unwrap();
            buf[..] != shadow[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
        })
        .take(10)
        .collect();
    assert!(stale.is_empty(), "shadow copy stale for pages {stale:?}");
    eprintln!(
        "{mode:?} x{writers}: {} pages written, {harvests} harvests",
        wrote.len()
    );
    t.stop(&mem).unwrap();
}

fn drop_without_stop(mode: UffdMode) {
    let mem = GuestMemory::anonymous(4 << 20, false).unwrap();
    {
        let Some(mut t) = start(mode, &mem) else {
            return;
        };
        write_page(&mem, 3, 1);
        let mut s = PageSet::new(mem.total_pages());
        t.harvest(&mem, &mut s).unwrap();
        assert!(s.contains(3));
        // Dropped armed: must release the protection and the handler thread.
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = Arc::new(mem);
    let m3 = Arc::clone(&m2);
    std::thread::spawn(move || {
        for i in 0..m3.total_pages() {
            write_page(&m3, i, i);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("writes after drop blocked");
}

fn order_errors(mode: UffdMode) {
    let mem = GuestMemory::anonymous(1 << 20, false).unwrap();
    let mut t = UffdTracker::new(mode);
    let mut s = PageSet::new(mem.total_pages());
    assert!(matches!(t.harvest(&mem, &mut s), Err(TrackError::Order(_))));
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    assert!(matches!(t.start(&mem), Err(TrackError::Order(_))));
    t.stop(&mem).unwrap();
    assert!(matches!(t.harvest(&mem, &mut s), Err(TrackError::Order(_))));
    // Restartable after stop.
    t.start(&mem).unwrap();
    write_page(&mem, 1, 1);
    t.harvest(&mem, &mut s).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), vec![1]);
    t.stop(&mem).unwrap();
}

/// Transparent huge pages: the tracker may report at 2 MiB granularity until the
/// kernel splits a huge page, but never misses a write.
fn huge_pages_superset(mode: UffdMode) {
    let mem = GuestMemory::anonymous(64 << 20, true).unwrap();
    // Populate (with THP where the kernel grants it) before tracking.
    for i in (0..mem.total_pages()).step_by(512) {
        write_page(&mem, i, 1);
    }
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    for round in 0..3u64 {
        let written: BTreeSet<u64> =
            [round, 513 + round, 5000, mem.total_pages() - 1 - round].into();
        for &i in &written {
            write_page(&mem, i, round + 10);
        }
        let got = harvest(&mut t, &mem);
        eprintln!(
            "{mode:?} THP round {round}: {} written, {} reported",
            written.len(),
            got.len()
        );
        assert!(
            got.is_superset(&written),
            "round {round}: {written:?} not all in {} reported",
            got.len()
        );
    }
    t.stop(&mem).unwrap();
}

/// Memory unmapped while the tracker is still armed: dropping the tracker afterwards
/// neither hangs nor panics.
fn memory_dropped_first(mode: UffdMode) {
    let mem = GuestMemory::anonymous(4 << 20, false).unwrap();
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    write_page(&mem, 0, 1);
    let mut s = PageSet::new(mem.total_pages());
    t.harvest(&mem, &mut s).unwrap();
    drop(mem);
    drop(t);
}

/// More written ranges than one PAGEMAP_SCAN output vector holds (every other page),
/// so the async harvest must continue from `walk_end`.
fn many_ranges(mode: UffdMode) {
    let mem = GuestMemory::anonymous(64 << 20, false).unwrap();
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    let written: BTreeSet<u64> = (0..mem.total_pages()).step_by(2).collect();
    for &i in &written {
        write_page(&mem, i, i);
    }
    assert_eq!(harvest(&mut t, &mem), written);
    assert!(harvest(&mut t, &mem).is_empty());
    t.stop(&mem).unwrap();
}

/// A private file mapping cannot be write-protect tracked: a clear `Unavailable`.
fn file_mapping_unavailable(mode: UffdMode) {
    let path =
        std::env::temp_dir().join(format!("livemig-uffd-{}-{mode:?}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let mem = GuestMemory::new(vec![GuestRegion::image_file(0, &path).unwrap()]).unwrap();
    let mut t = UffdTracker::new(mode);
    let r = t.start(&mem);
    let _ = std::fs::remove_file(&path);
    match r {
        Err(TrackError::Unavailable { reason, .. }) => {
            eprintln!("{mode:?} on image file: {reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Shared memory (memfd, what a VMM hands to another process) mixed with anonymous.
fn memfd_region(mode: UffdMode) {
    let mem = GuestMemory::new(vec![
        GuestRegion::memfd(0, 8 << 20, "livemig-uffd-test").unwrap(),
        GuestRegion::anonymous(1 << 30, 8 << 20, false).unwrap(),
    ])
    .unwrap();
    let Some(mut t) = start(mode, &mem) else {
        return;
    };
    let written: BTreeSet<u64> = [0, 1, 77, 2047, 2048, 3000].into();
    for &i in &written {
        write_page(&mem, i, i + 5);
    }
    assert_eq!(harvest(&mut t, &mem), written);
    assert!(harvest(&mut t, &mem).is_empty());
    write_page(&mem, 77, 1);
    assert_eq!(harvest(&mut t, &mem), [77].into());
    t.stop(&mem).unwrap();
}

macro_rules! per_mode {
    ($($modname:ident => $mode:expr),*) => {$(
        mod $modname {
            use super::*;
            #[test] fn exact_single_region() { super::exact_single_region($mode) }
            #[test] fn two_regions() { super::two_regions($mode) }
            #[test] fn concurrent_writer() { super::concurrent_writers($mode, 1) }
            #[test] fn concurrent_writers_2() { super::concurrent_writers($mode, 2) }
            #[test] fn drop_without_stop() { super::drop_without_stop($mode) }
            #[test] fn order_errors() { super::order_errors($mode) }
            #[test] fn memfd_region() { super::memfd_region($mode) }
            #[test] fn many_ranges() { super::many_ranges($mode) }
            #[test] fn file_mapping_unavailable() { super::file_mapping_unavailable($mode) }
            #[test] fn huge_pages_superset() { super::huge_pages_superset($mode) }
            #[test] fn memory_dropped_first() { super::memory_dropped_first($mode) }
        }
    )*};
}

per_mode!(async_wp => UffdMode::Async, sync_wp => UffdMode::Sync, auto => UffdMode::Auto);

#[test]
fn auto_name_before_start() {
    assert_eq!(UffdTracker::new(UffdMode::Auto).name(), "uffd");
    match UffdTracker::probe(UffdMode::Auto) {
        Ok(m) => assert_ne!(m, UffdMode::Auto),
        Err(e) => assert!(!ci(), "{e}"),
    }
}

//! One scenario suite, run against every `DirtyTracker` backend available.
//!
//! A backend is two things: a factory that builds its tracker for a given memory,
//! and a writer that performs one "guest write" to a page the way that backend can
//! see it (for the explicit tracker the writer also marks the bitmap, after the
//! write, as its contract requires). Adding a backend is one test function calling
//! [`scenarios`]; see `uffd_hook` at the bottom for where the uffd backend goes.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::MIB;
use livemig::dirty::{DirtyTracker, ExplicitTracker, HashScanTracker, UnionTracker};
use livemig::memory::{DirtyBitmap, GuestMemory, GuestRegion, PageSet, PAGE_SIZE};
use livemig::workload::{self, splitmix, Content};

/// Writes page `index` of the memory so that the backend can observe it.
pub type Writer = Arc<dyn Fn(&GuestMemory, u64) + Send + Sync>;

/// Builds a backend for one memory: its tracker and its writer.
pub trait Backend: Fn(&Arc<GuestMemory>) -> (Box<dyn DirtyTracker>, Writer) {}
impl<F: Fn(&Arc<GuestMemory>) -> (Box<dyn DirtyTracker>, Writer)> Backend for F {}

/// A guest write: store a never-repeated value into one word of the page (so even
/// a content-based tracker sees it).
pub fn plain_write(mem: &GuestMemory, index: u64) {
    static COUNTER: AtomicU64 = AtomicU64::new(0x5EED_0000_0000_0001);
    let v = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut s = v;
    let word = (splitmix(&mut s) % (PAGE_SIZE as u64 / 8)) as usize;
    let (r, p) = mem.locate(index).expect("page in range");
    mem.regions()[r]
        .write_u64(p as usize * PAGE_SIZE + word * 8, v | 1 << 63)
        .expect("write");
}

fn plain_writer() -> Writer {
    Arc::new(plain_write)
}

/// A writer that writes, then marks `bitmap`.
fn marking_writer(bitmap: Arc<DirtyBitmap>) -> Writer {
    Arc::new(move |mem, index| {
        plain_write(mem, index);
        bitmap.mark(index);
    })
}

fn one_region() -> Arc<GuestMemory> {
    let mem = GuestMemory::anonymous(16 * MIB, false).unwrap();
    workload::fill(&mem, Content::Mix, 1, 2).unwrap();
    Arc::new(mem)
}

fn two_regions() -> Arc<GuestMemory> {
    let mem = GuestMemory::new(vec![
        GuestRegion::anonymous(0, 4 * MIB, false).unwrap(),
        GuestRegion::anonymous(1 << 30, 4 * MIB, false).unwrap(),
    ])
    .unwrap();
    workload::fill(&mem, Content::Mix, 2, 2).unwrap();
    Arc::new(mem)
}

fn harvest(t: &mut dyn DirtyTracker, mem: &GuestMemory) -> PageSet {
    let mut set = PageSet::new(mem.total_pages());
    t.harvest(mem, &mut set).expect("harvest");
    set
}

fn assert_superset(name: &str, what: &str, got: &PageSet, want: &BTreeSet<u64>, exact: bool) {
    let missing: Vec<u64> = want.iter().copied().filter(|&p| !got.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{name}/{what}: {} written page(s) not reported, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    if exact {
        let extra: Vec<u64> = got.iter().filter(|p| !want.contains(p)).collect();
        assert!(
            extra.is_empty(),
            "{name}/{what}: exact tracker reported unwritten pages {:?}",
            &extra[..extra.len().min(8)]
        );
    }
}

/// Every scenario, against one backend.
pub fn scenarios(name: &str, make: impl Backend) {
    written_pages_are_reported(name, &make);
    nothing_written_nothing_reported(name, &make);
    rearmed_after_harvest(name, &make);
    multi_region_indexes(name, &make);
    concurrent_writer(name, &make);
}

fn written_pages_are_reported(name: &str, make: &impl Backend) {
    let mem = one_region();
    let (mut t, write) = make(&mem);
    t.start(&mem).expect("start");
    let n = mem.total_pages();
    // First, last, a run across a bitmap word boundary, scattered pages.
    let mut want: BTreeSet<u64> = [0, 1, n - 1, 63, 64, 65, 127, 128].into();
    let mut s = 99;
    for _ in 0..200 {
        want.insert(splitmix(&mut s) % n);
    }
    for &p in &want {
        write(&mem, p);
    }
    let got = harvest(&mut *t, &mem);
    assert_superset(name, "written pages", &got, &want, t.caps().exact);
    t.stop(&mem).expect("stop");
}

fn nothing_written_nothing_reported(name: &str, make: &impl Backend) {
    let mem = one_region();
    let (mut t, write) = make(&mem);
    // Writes before start need not be reported (round 0 sends everything) and
    // must not leak into the first harvest of an exact tracker either.
    write(&mem, 5);
    t.start(&mem).expect("start");
    for _ in 0..3 {
        let got = harvest(&mut *t, &mem);
        if t.caps().exact {
            assert!(
                got.is_empty(),
                "{name}: reported {:?} with no writes",
                got.iter().take(8).collect::<Vec<_>>()
            );
        } else {
            assert!(
                got.count() <= 1,
                "{name}: reported {} pages with no writes",
                got.count()
            );
        }
    }
    t.stop(&mem).expect("stop");
}

fn rearmed_after_harvest(name: &str, make: &impl Backend) {
    let mem = one_region();
    let (mut t, write) = make(&mem);
    t.start(&mem).expect("start");
    for round in 0..4u64 {
        let pages: BTreeSet<u64> = [7 + round, 1000 + round * 3, 7].into();
        for &p in &pages {
            write(&mem, p);
        }
        let got = harvest(&mut *t, &mem);
        assert_superset(
            name,
            &format!("round {round}"),
            &got,
            &pages,
            t.caps().exact,
        );
        // The same page written again after harvest must be reported again.
    }
    // Harvest with no further writes: nothing new for an exact tracker.
    let got = harvest(&mut *t, &mem);
    if t.caps().exact {
        assert!(got.is_empty(), "{name}: stale pages after re-arm");
    }
    t.stop(&mem).expect("stop");
}

fn multi_region_indexes(name: &str, make: &impl Backend) {
    let mem = two_regions();
    let (mut t, write) = make(&mem);
    t.start(&mem).expect("start");
    let first2 = mem.region_first_page(1);
    let per = mem.regions()[1].pages();
    // Last page of region 0, first/some/last pages of region 1.
    let want: BTreeSet<u64> = [first2 - 1, first2, first2 + 17, first2 + per - 1].into();
    for &p in &want {
        write(&mem, p);
    }
    let got = harvest(&mut *t, &mem);
    assert_superset(name, "two regions", &got, &want, t.caps().exact);
    // The indexes translate to the right guest frames.
    assert_eq!(mem.gfn_of(first2).unwrap(), (1u64 << 30) >> 12);
    assert_eq!(
        mem.gfn_of(first2 - 1).unwrap(),
        ((4 * MIB as u64) >> 12) - 1
    );
    for p in got.iter() {
        let gfn = mem.gfn_of(p).unwrap();
        assert_eq!(mem.index_of_gfn(gfn).unwrap(), p);
    }
    t.stop(&mem).expect("stop");
}

/// A writer thread writes while the tracker is harvested repeatedly: the union of
/// all harvests (plus one after the writer stopped) covers every page written
/// (oracle: the writer's own log) and every page whose content changed (oracle:
/// per-page hashes before and after).
fn concurrent_writer(name: &str, make: &impl Backend) {
    let mem = one_region();
    let (mut t, write) = make(&mem);
    let before = mem.page_hash_table(2).unwrap();
    t.start(&mem).expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(BTreeSet::new()));
    let writer = {
        let (mem, stop, log, write) = (mem.clone(), stop.clone(), log.clone(), write.clone());
        std::thread::spawn(move || {
            let n = mem.total_pages();
            let hot = n / 4;
            let mut s = 1234u64;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) || writes < 1000 {
                let p = splitmix(&mut s) % hot;
                write(&mem, p);
                log.lock().unwrap().insert(p);
                writes += 1;
                if writes.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        })
    };
    let mut union = PageSet::new(mem.total_pages());
    for _ in 0..20 {
        let got = harvest(&mut *t, &mem);
        union.union_with(&got);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    union.union_with(&harvest(&mut *t, &mem));
    let log = log.lock().unwrap().clone();
    assert!(!log.is_empty());
    assert_superset(name, "concurrent (writer log)", &union, &log, false);
    let after = mem.page_hash_table(2).unwrap();
    let changed: BTreeSet<u64> = (0..mem.total_pages())
        .filter(|&i| before[i as usize] != after[i as usize])
        .collect();
    assert_superset(name, "concurrent (content oracle)", &union, &changed, false);
    if t.caps().exact {
        // No page outside the hot set was touched.
        let hot = mem.total_pages() / 4;
        assert!(
            union.iter().all(|p| p < hot),
            "{name}: reported pages never written"
        );
    }
    t.stop(&mem).expect("stop");
}

// ---------------------------------------------------------------------------
// Backends. One line each.

fn explicit(mem: &Arc<GuestMemory>) -> (Box<dyn DirtyTracker>, Writer) {
    let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
    (
        Box::new(ExplicitTracker::new(bitmap.clone())),
        marking_writer(bitmap),
    )
}

fn hash(_mem: &Arc<GuestMemory>) -> (Box<dyn DirtyTracker>, Writer) {
    (Box::new(HashScanTracker::new(2)), plain_writer())
}

fn union_explicit_hash(mem: &Arc<GuestMemory>) -> (Box<dyn DirtyTracker>, Writer) {
    let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
    let t = UnionTracker::new(vec![
        Box::new(ExplicitTracker::new(bitmap.clone())),
        Box::new(HashScanTracker::new(1)),
    ]);
    (Box::new(t), marking_writer(bitmap))
}

/// Half the writes are seen only by the explicit part (marked, but through a
/// mapping the hash part ignores is impossible here), so instead: a union where
/// only the explicit part is ever marked and the hash part sees the content —
/// still the union must be a superset. Exercises OR-combination of two sources.
fn union_hash_then_explicit(mem: &Arc<GuestMemory>) -> (Box<dyn DirtyTracker>, Writer) {
    let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
    let t = UnionTracker::new(vec![
        Box::new(HashScanTracker::new(1)),
        Box::new(ExplicitTracker::new(bitmap.clone())),
    ]);
    (Box::new(t), marking_writer(bitmap))
}

#[test]
fn conformance_explicit() {
    scenarios("explicit", explicit);
}

#[test]
fn conformance_hash_scan() {
    scenarios("hash", hash);
}

#[test]
fn conformance_union_explicit_hash() {
    scenarios("union(explicit+hash)", union_explicit_hash);
}

#[test]
fn conformance_union_hash_explicit() {
    scenarios("union(hash+explicit)", union_hash_then_explicit);
}

/// Misuse is an error, not a panic: harvest before start.
#[test]
fn harvest_before_start_is_an_error() {
    let mem = one_region();
    for (name, make) in [
        ("explicit", explicit as fn(&Arc<GuestMemory>) -> _),
        ("hash", hash),
    ] {
        let (mut t, _) = make(&mem);
        let mut set = PageSet::new(mem.total_pages());
        assert!(t.harvest(&mem, &mut set).is_err(), "{name}");
    }
    // A bitmap of the wrong size is refused at start.
    let mut t = ExplicitTracker::new(Arc::new(DirtyBitmap::new(10)));
    assert!(t.start(&mem).is_err());
}

// The userfaultfd backends see plain writes through the mapping, so they use
// `plain_writer()`; their caps are exact, so the exactness checks apply too.
// Unavailable modes skip with a printed reason, or fail under LIVEMIG_CI=1.
#[cfg(feature = "uffd")]
fn uffd_available(mode: livemig::dirty::UffdMode) -> bool {
    match livemig::dirty::UffdTracker::probe(mode) {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("LIVEMIG_CI").as_deref() == Ok("1") {
                panic!("uffd {mode:?} unavailable under LIVEMIG_CI=1: {e}");
            }
            eprintln!("skipping uffd {mode:?} conformance: {e}");
            false
        }
    }
}

#[cfg(feature = "uffd")]
#[test]
fn conformance_uffd_async() {
    use livemig::dirty::{UffdMode, UffdTracker};
    if uffd_available(UffdMode::Async) {
        scenarios("uffd-async", |_mem: &Arc<GuestMemory>| {
            (
                Box::new(UffdTracker::new(UffdMode::Async)) as Box<dyn DirtyTracker>,
                plain_writer(),
            )
        });
    }
}

#[cfg(feature = "uffd")]
#[test]
fn conformance_uffd_sync() {
    use livemig::dirty::{UffdMode, UffdTracker};
    if uffd_available(UffdMode::Sync) {
        scenarios("uffd-sync", |_mem: &Arc<GuestMemory>| {
            (
                Box::new(UffdTracker::new(UffdMode::Sync)) as Box<dyn DirtyTracker>,
                plain_writer(),
            )
        });
    }
}

//! The proof's audits against a tracker that loses writes on purpose, and
//! destination memory that starts full of garbage.
//!
//! The guest here is scripted inside the tracker (`LossyGuest`): at each harvest
//! while the VM runs it writes a seeded set of pages and reports them, except every
//! N-th write, which it "loses" like a defective tracker. Everything is seeded and
//! the writes happen at harvest time, so each run is deterministic.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{migrate, receiver_config, source_memory, MIB};
use livemig::dirty::{DirtyTracker, TrackError, TrackerCaps};
use livemig::engine::policy::PolicySnapshot;
use livemig::engine::{ConvergencePolicy, Decision, Migration, MigrationConfig, VmControl};
use livemig::memory::{GuestMemory, PageSet, PAGE_SIZE};
use livemig::proof::AuditConfig;
use livemig::receiver::Receiver;
use livemig::stats::{Event, MigrationReport};
use livemig::transport::mem;
use livemig::workload::splitmix;

/// A VM whose "vCPUs" are the `LossyGuest`: pausing stops its writes.
#[derive(Debug, Clone, Default)]
struct Vm(Arc<AtomicBool>);

impl VmControl for Vm {
    fn pause(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::engine::VmControlError> {
        self.0.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&mut self, _percent: u8) -> Result<(), livemig::engine::VmControlError> {
        Ok(())
    }
}

/// How the guest's lost writes look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Every N-th write is not reported.
    OneIn(u64),
    /// Every N-th write restores the page's previous content (A → B, reported and
    /// sent, then → A, not reported).
    AbaOneIn(u64),
}

/// A guest writing at each harvest and a tracker that loses some of its writes.
struct LossyGuest {
    mem: Arc<GuestMemory>,
    paused: Arc<AtomicBool>,
    rng: u64,
    writes_per_harvest: u64,
    loss: Loss,
    /// Writes so far (a seeded offset, so that runs lose different writes).
    count: u64,
    /// Pages whose last write was lost (and not reported since): stale.
    lost: Arc<Mutex<BTreeSet<u64>>>,
    /// Every page a write was ever lost on.
    ever_lost: Arc<Mutex<BTreeSet<u64>>>,
    /// Content before the last reported write, per page (for A → B → A).
    before: std::collections::HashMap<u64, Vec<u8>>,
}

impl LossyGuest {
    fn new(
        mem: Arc<GuestMemory>,
        paused: Arc<AtomicBool>,
        seed: u64,
        writes: u64,
        loss: Loss,
    ) -> Self {
        let mut rng = seed;
        let n = match loss {
            Loss::OneIn(n) | Loss::AbaOneIn(n) => n,
        };
        let count = splitmix(&mut rng) % n;
        Self {
            mem,
            paused,
            rng,
            writes_per_harvest: writes,
            loss,
            count,
            lost: Arc::default(),
            ever_lost: Arc::default(),
            before: Default::default(),
        }
    }
}

impl DirtyTracker for LossyGuest {
    fn name(&self) -> &'static str {
        "lossy"
    }
    fn caps(&self) -> TrackerCaps {
        TrackerCaps {
            sees_guest_writes: true,
            sees_vmm_writes: true,
            exact: true,
        }
    }
    fn start(&mut self, _mem: &GuestMemory) -> Result<(), TrackError> {
        Ok(())
    }
    fn harvest(&mut self, mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let pages = mem.total_pages();
        let mut page = vec![0u8; PAGE_SIZE];
        for _ in 0..self.writes_per_harvest {
            self.count += 1;
            let p = splitmix(&mut self.rng) % pages;
            let stamp = splitmix(&mut self.rng);
            let (lose, restore) = match self.loss {
                Loss::OneIn(n) => (self.count.is_multiple_of(n), false),
                Loss::AbaOneIn(n) => (
                    self.count.is_multiple_of(n) && self.before.contains_key(&p),
                    true,
                ),
            };
            if lose && restore {
                // Back to A; the destination holds B.
                let a = self.before.remove(&p).expect("checked");
                self.mem.write_pages(p, &a)?;
            } else {
                self.mem.read_pages(p, &mut page)?;
                self.before.insert(p, page.clone());
                page[..8].copy_from_slice(&stamp.to_le_bytes());
                page[4000..4008].copy_from_slice(&stamp.to_le_bytes());
                self.mem.write_pages(p, &page)?;
            }
            let mut lost = self.lost.lock().unwrap();
            if lose {
                lost.insert(p);
                self.ever_lost.lock().unwrap().insert(p);
            } else {
                into.insert(p);
            }
        }
        // A page reported in this harvest is sent with its current content,
        // whatever was lost before.
        self.lost.lock().unwrap().retain(|&p| !into.contains(p));
        Ok(())
    }
    fn stop(&mut self, _mem: &GuestMemory) -> Result<(), TrackError> {
        Ok(())
    }
}

/// Brown out after exactly `rounds` rounds (no hot-page deferral).
#[derive(Debug)]
struct Rounds(u32);

impl ConvergencePolicy for Rounds {
    fn decide(&mut self, snap: &PolicySnapshot<'_>) -> Decision {
        if snap.rounds >= self.0 {
            Decision::Brownout(format!("test: {} rounds", self.0))
        } else {
            Decision::Continue
        }
    }
    fn hot_page_rounds(&self) -> u32 {
        0
    }
}

struct Run {
    report: MigrationReport,
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    events: Vec<Event>,
    lost: BTreeSet<u64>,
    ever_lost: BTreeSet<u64>,
    hook_gfns: Option<Vec<u64>>,
}

fn run(seed: u64, bytes: usize, writes: u64, loss: Loss, rounds: u32, audit: AuditConfig) -> Run {
    let src = source_memory(bytes, seed);
    let vm = Vm::default();
    let guest = LossyGuest::new(src.clone(), vm.0.clone(), seed, writes, loss);
    let lost = guest.lost.clone();
    let ever_lost = guest.ever_lost.clone();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let hook_gfns = Arc::new(Mutex::new(None));
    let hg = hook_gfns.clone();
    let m = Migration::new(src.clone())
        .tracker(Box::new(guest))
        .vm_control(Box::new(vm))
        .policy(Box::new(Rounds(rounds)))
        .progress(Arc::new(move |e: &Event| {
            if !matches!(e, Event::Progress { .. }) {
                ev.lock().unwrap().push(e.clone())
            }
        }))
        .on_stale_pages(Box::new(move |gfns: &[u64]| {
            *hg.lock().unwrap() = Some(gfns.to_vec());
        }))
        .config({
            let mut settings = MigrationConfig::default();
            settings.streams = 2;
            settings.audit = audit;
            settings
        });
    let (c, a) = mem::pair();
    let out = migrate(m, c, Receiver::new().config(receiver_config()), a);
    let report = out.source.expect("source");
    let received = out.dest.expect("destination");
    let events = events.lock().unwrap().clone();
    let hook_gfns = hook_gfns.lock().unwrap().clone();
    let lost = lost.lock().unwrap().clone();
    let ever_lost = ever_lost.lock().unwrap().clone();
    Run {
        report,
        src,
        dst: received.memory,
        events,
        lost,
        ever_lost,
        hook_gfns,
    }
}

/// Pages whose content differs between the two memories.
fn differing(a: &GuestMemory, b: &GuestMemory) -> Vec<u64> {
    let (ta, tb) = (a.page_hash_table(2).unwrap(), b.page_hash_table(2).unwrap());
    (0..ta.len() as u64)
        .filter(|&i| ta[i as usize] != tb[i as usize])
        .collect()
}

/// The sample the test audits: a quarter of the guest per round. (The default
/// samples 2 % of each round's pages; the knob is policy, the catch is mechanism.)
fn test_audit(seed: u64) -> AuditConfig {
    AuditConfig {
        sample_pages: 512,
        round_share: 1.0,
        min_pages: 512,
        seed: Some(seed),
    }
}

fn assert_caught_and_repaired(r: &Run, seed: u64) {
    let misses: Vec<&Event> = r
        .events
        .iter()
        .filter(|e| matches!(e, Event::TrackerMiss { .. }))
        .collect();
    assert!(
        r.report.audit_misses >= 1 && !misses.is_empty(),
        "seed {seed}: the sampled audit caught nothing ({} pages checked)",
        r.report.audit_pages_checked
    );
    // Caught during the rounds, before brownout.
    let brownout = r
        .events
        .iter()
        .position(|e| matches!(e, Event::Brownout { .. }))
        .expect("brownout event");
    let first = r
        .events
        .iter()
        .position(|e| matches!(e, Event::TrackerMiss { .. }))
        .expect("miss event");
    assert!(first < brownout, "seed {seed}: caught only at brownout");
    assert!(r.report.tracker_fallback, "seed {seed}: no fallback");
    // No false alarm: every page reported missed is one whose write was lost
    // (single region at gpa 0: gfn = page index).
    for e in misses {
        let Event::TrackerMiss { gfns, .. } = e else {
            unreachable!()
        };
        for g in gfns {
            assert!(
                r.ever_lost.contains(g),
                "seed {seed}: page {g} reported missed but no write to it was lost"
            );
        }
    }
    // After the fallback nothing stale remains: the destination equals the source.
    assert!(
        differing(&r.src, &r.dst).is_empty(),
        "seed {seed}: stale pages"
    );
    let post = r.report.post_audit.as_ref().expect("post audit on");
    assert_eq!(post.mismatches, 0, "seed {seed}");
    assert!(r.report.verified && r.hook_gfns.is_none(), "seed {seed}");
}

/// A tracker that loses 1 write in 1,000 is caught by the sampled audit during the
/// rounds in each of 20 seeded runs; the engine falls back to a safe tracker and
/// the destination ends equal to the source.
#[test]
fn sampled_audit_catches_one_lost_write_in_1000() {
    for seed in 1..=20u64 {
        let r = run(seed, 8 * MIB, 200, Loss::OneIn(1000), 40, test_audit(seed));
        assert_caught_and_repaired(&r, seed);
    }
}

/// The same with A → B → A: the lost write puts back the content from before a
/// write that was reported and sent.
#[test]
fn sampled_audit_catches_a_b_a() {
    for seed in 21..=25u64 {
        let r = run(
            seed,
            8 * MIB,
            200,
            Loss::AbaOneIn(1000),
            40,
            test_audit(seed),
        );
        assert_caught_and_repaired(&r, seed);
    }
}

/// With the sampled audit off, the digest still matches (it compares what was sent
/// with what was applied) but the audit after switchover finds every stale page,
/// and the VMM's hook gets exactly those.
#[test]
fn post_switchover_audit_finds_every_stale_page() {
    for (seed, loss) in [(31u64, Loss::OneIn(50)), (32, Loss::AbaOneIn(50))] {
        let off = AuditConfig {
            sample_pages: 0,
            ..Default::default()
        };
        let r = run(seed, 4 * MIB, 100, loss, 10, off);
        assert_eq!(r.report.audit_pages_checked, 0);
        let stale = differing(&r.src, &r.dst);
        assert!(
            !stale.is_empty(),
            "{loss:?}: the lossy tracker left nothing stale"
        );
        assert_eq!(
            stale,
            r.lost.iter().copied().collect::<Vec<_>>(),
            "{loss:?}: stale pages are exactly those whose last write was lost"
        );
        let post = r.report.post_audit.as_ref().expect("post audit on");
        assert_eq!(post.pages, r.src.total_pages());
        assert_eq!(post.mismatches, stale.len() as u64);
        assert_eq!(r.hook_gfns.as_deref(), Some(&stale[..]), "{loss:?}");
        assert!(
            !r.report.verified,
            "{loss:?}: a failed audit is not verified"
        );
        assert!(r
            .events
            .iter()
            .any(|e| matches!(e, Event::PostAudit(a) if a.mismatches == stale.len() as u64)));
    }
}

/// Destination memory provided by the caller and full of garbage ends equal to the
/// source, zero pages included.
#[test]
fn caller_memory_full_of_garbage_ends_equal_to_the_source() {
    let src = source_memory(8 * MIB, 3);
    let dst = Arc::new(GuestMemory::anonymous(8 * MIB, false).unwrap());
    let mut page = vec![0u8; PAGE_SIZE];
    let mut rng = 99u64;
    for p in 0..dst.total_pages() {
        page.iter_mut()
            .for_each(|b| *b = splitmix(&mut rng) as u8 | 1);
        dst.write_pages(p, &page).unwrap();
    }
    assert!(!differing(&src, &dst).is_empty());
    let (c, a) = mem::pair();
    let out = migrate(
        Migration::new(src.clone()),
        c,
        Receiver::new()
            .memory(dst.clone())
            .config(receiver_config()),
        a,
    );
    let report = out.source.expect("source");
    let received = out.dest.expect("destination");
    assert!(
        report.zero_pages > 0,
        "the source must have zero pages to test this"
    );
    assert!(
        report.post_audit.is_none(),
        "a stopped VM (no tracker) cannot change: no audit after switchover"
    );
    assert!(Arc::ptr_eq(&received.memory, &dst));
    assert_eq!(differing(&src, &dst), Vec::<u64>::new());
}

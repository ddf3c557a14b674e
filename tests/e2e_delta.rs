//! End to end: delta encoding with a dirtier over a small hot set, several rounds,
//! two streams, over the in-process transport. The destination must equal the
//! source byte for byte, and some pages must actually have travelled as deltas.
//!
//! The dirtier is a thread and a loaded machine may not schedule it during the
//! short rounds of a zero-target migration, so each harvest also changes one word
//! in a fixed set of hot pages itself: every round after the first then re-sends
//! pages the previous round cached, whatever the scheduler does.

use std::sync::Arc;
use std::time::Duration;

use livemig::codec::CodecId;
use livemig::dirty::{DirtyTracker, ExplicitTracker, TrackError, TrackerCaps};
use livemig::engine::{DowntimePolicy, Migration, MigrationConfig, Mode, OnLimit};
use livemig::memory::{DirtyBitmap, PageSet, PAGE_SIZE};
use livemig::receiver::Receiver;
use livemig::stats::MigrationReport;
use livemig::transport::mem;
use livemig::workload::{self, Content, Dirtier, DirtierConfig, Skew};
use livemig::GuestMemory;

/// Pages the harvest writes to itself, inside the dirtier's hot set.
const WRITTEN_PAGES: u64 = 32;
const HOT_SET_OFFSET: u64 = 4 << 20;

/// The explicit tracker, plus one word changed in each of `WRITTEN_PAGES` hot
/// pages at every harvest (a small change: a delta against the cached copy).
struct WritingTracker {
    inner: ExplicitTracker,
    mem: Arc<GuestMemory>,
    bitmap: Arc<DirtyBitmap>,
    harvests: u64,
}

impl DirtyTracker for WritingTracker {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn caps(&self) -> TrackerCaps {
        self.inner.caps()
    }
    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        self.inner.start(mem)
    }
    fn harvest(&mut self, mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        self.harvests += 1;
        let first = HOT_SET_OFFSET / PAGE_SIZE as u64;
        let word = (self.harvests % (PAGE_SIZE as u64 / 8)) as usize;
        for index in first..first + WRITTEN_PAGES {
            self.mem.regions()[0]
                .write_u64(index as usize * PAGE_SIZE + word * 8, self.harvests)
                .expect("write a hot page");
            self.bitmap.mark(index);
        }
        self.inner.harvest(mem, into)
    }
    fn stop(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        self.inner.stop(mem)
    }
}

fn migrate(codec: CodecId, mode: Mode, cache_bytes: u64) -> MigrationReport {
    let mem = Arc::new(GuestMemory::anonymous(16 << 20, false).unwrap());
    workload::fill(&mem, Content::Mix, 11, 2).unwrap();
    let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
    let dirtier = Dirtier::start(
        mem.clone(),
        Some(bitmap.clone()),
        DirtierConfig {
            rate_bytes_per_s: 200_000_000,
            hot_set_bytes: 1 << 20,
            hot_set_offset: HOT_SET_OFFSET,
            skew: Skew::Uniform,
            seed: 5,
            ..Default::default()
        },
    );
    let (connector, acceptor) = mem::pair();
    let receiver = std::thread::spawn(move || Receiver::new().run(&acceptor));
    let report = Migration::new(mem.clone())
        .tracker(Box::new(WritingTracker {
            inner: ExplicitTracker::new(bitmap.clone()),
            mem: mem.clone(),
            bitmap,
            harvests: 0,
        }))
        .vm_control(Box::new(dirtier.control()))
        // A zero target never converges: the loop runs to the round limit.
        .policy(Box::new(DowntimePolicy {
            target: Duration::ZERO,
            max_rounds: 10,
            max_time: Duration::from_secs(60),
            on_limit: OnLimit::ForceBrownout,
            ..Default::default()
        }))
        .config({
            let mut settings = MigrationConfig::default();
            settings.mode = mode;
            settings.streams = 2;
            settings.codec = codec;
            settings.zstd_level = 1;
            settings.delta = true;
            settings.delta_cache_bytes = cache_bytes;
            settings
        })
        .run(&connector);
    let received = receiver.join().unwrap().expect("receiver");
    let report = report.expect("migration");
    drop(dirtier); // the source stays paused after the switchover
    assert!(report.verified);
    assert_eq!(
        mem.full_digest(2).unwrap(),
        received.memory.full_digest(2).unwrap(),
        "destination memory differs from the source"
    );
    assert!(report.rounds >= 3, "rounds {}", report.rounds);
    report
}

#[test]
fn compress_lz4_with_delta_two_streams() {
    let r = migrate(CodecId::Lz4, Mode::Compress, 0);
    assert!(r.delta_pages > 0, "no page was sent as a delta: {r:?}");
    assert!(r.delta_bytes_saved > 0);
}

#[test]
fn compress_zstd_with_delta_small_cache() {
    // A cache of 64 pages for a 256-page hot set: constant eviction, so deltas
    // are rare; what matters is that evicted pages are re-sent full and the
    // destination still equals the source (checked in `migrate`).
    let r = migrate(CodecId::Zstd, Mode::Compress, 64 * 4096);
    assert!(r.delta_pages < r.pages_sent);
}

#[test]
fn raw_with_delta_takes_the_copy_path() {
    let r = migrate(CodecId::Raw, Mode::Multichannel, 0);
    assert!(r.delta_pages > 0, "no page was sent as a delta: {r:?}");
}

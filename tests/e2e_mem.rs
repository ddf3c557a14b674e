//! Full migrations over the in-memory transport under a concurrent dirtier: the
//! destination must equal the source at brownout, for every tracker and mode.

mod common;

use common::*;
use livemig::codec::CodecId;
use livemig::engine::{Mode, Verify};
use livemig::transport::mem;

fn mem_e2e(kind: TrackerKind, mode: Mode, streams: u16, codec: CodecId, verify: Verify) {
    let src = Source::default_running(32 * MIB, kind);
    let (c, a) = mem::pair();
    let out = run_e2e(&src, config(mode, streams, codec, verify), c, a);
    let (report, received) = assert_migrated(&src, out);
    assert_eq!(report.streams, streams);
    assert_eq!(received.report.streams, streams);
    assert!(
        report.pages_sent >= src.mem.total_pages(),
        "round 0 sends every page"
    );
    assert!(report.zero_pages > 0, "mixed content has zero pages");
}

#[test]
fn explicit_multichannel_1_stream() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Multichannel,
        1,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn explicit_multichannel_2_streams() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Multichannel,
        2,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn explicit_multichannel_4_streams() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Multichannel,
        4,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn hash_multichannel_1_stream() {
    mem_e2e(
        TrackerKind::Hash,
        Mode::Multichannel,
        1,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn hash_multichannel_2_streams() {
    mem_e2e(
        TrackerKind::Hash,
        Mode::Multichannel,
        2,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn hash_multichannel_4_streams() {
    mem_e2e(
        TrackerKind::Hash,
        Mode::Multichannel,
        4,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn explicit_standard() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Standard,
        1,
        CodecId::Raw,
        Verify::Digest,
    );
}

#[test]
fn explicit_compress_lz4() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Compress,
        2,
        CodecId::Lz4,
        Verify::Digest,
    );
}

#[test]
fn explicit_compress_zstd() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Compress,
        2,
        CodecId::Zstd,
        Verify::Digest,
    );
}

#[test]
fn hash_compress_lz4() {
    mem_e2e(
        TrackerKind::Hash,
        Mode::Compress,
        2,
        CodecId::Lz4,
        Verify::Digest,
    );
}

#[test]
fn hash_compress_zstd() {
    mem_e2e(
        TrackerKind::Hash,
        Mode::Compress,
        2,
        CodecId::Zstd,
        Verify::Digest,
    );
}

#[test]
fn explicit_verify_full() {
    mem_e2e(
        TrackerKind::Explicit,
        Mode::Multichannel,
        2,
        CodecId::Raw,
        Verify::Full,
    );
}

#[test]
fn hash_verify_full_compress() {
    mem_e2e(
        TrackerKind::Hash,
        Mode::Compress,
        2,
        CodecId::Lz4,
        Verify::Full,
    );
}

/// Verify::Full makes a tracker that misses writes harmless: a source whose
/// explicit bitmap is never marked (the dirtier writes unseen) still arrives equal,
/// and the misses are counted.
#[test]
fn verify_full_repairs_a_blind_tracker() {
    let mem = source_memory(16 * MIB, 3);
    // Dirtier marks nothing (Hash kind) but the migration uses an explicit tracker
    // over an unmarked bitmap: every guest write is missed by the tracker.
    let mut src = Source::start(mem, TrackerKind::Hash, 16_000_000, 2 << 20);
    src.kind = TrackerKind::Explicit;
    let (c, a) = mem::pair();
    let out = run_e2e(
        &src,
        config(Mode::Multichannel, 2, CodecId::Raw, Verify::Full),
        c,
        a,
    );
    let (report, _) = assert_migrated(&src, out);
    assert!(
        report.tracker_misses > 0 || src.dirtier.writes() == 0,
        "writes happened but no tracker miss was repaired"
    );
}

/// Two regions (gpa 0 and 1 GiB): gfn ↔ page-index translation end to end.
#[test]
fn two_regions() {
    let src = Source::start(
        two_region_memory(16 * MIB, 5),
        TrackerKind::Explicit,
        16_000_000,
        16 << 20,
    );
    let (c, a) = mem::pair();
    let out = run_e2e(
        &src,
        config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest),
        c,
        a,
    );
    let (_, received) = assert_migrated(&src, out);
    assert_eq!(received.memory.layout(), src.mem.layout());
}

/// A stopped VM (no tracker) takes one pass and an empty final round.
#[test]
fn stopped_vm_single_round() {
    let mem = source_memory(16 * MIB, 9);
    let before = mem.full_digest(2).unwrap();
    let (c, a) = mem::pair();
    let out = migrate(
        livemig::engine::Migration::new(mem.clone()),
        c,
        livemig::receiver::Receiver::new().config(receiver_config()),
        a,
    );
    let report = out.source.expect("source");
    let received = out.dest.expect("dest");
    // Round 0 carries every page; the final (brownout) round is empty.
    assert_eq!(report.rounds, 2);
    assert_eq!(report.final_pages, 0);
    assert!(report.converged);
    assert_eq!(mem.full_digest(2).unwrap(), before);
    assert_eq!(received.memory.full_digest(2).unwrap(), before);
}

/// Count the destination pages that are resident (pagemap).
fn resident_pages(mem: &livemig::memory::GuestMemory) -> u64 {
    let mut present = Vec::new();
    let mut n = 0u64;
    for r in mem.regions() {
        r.populated(0, r.pages(), &mut present).expect("pagemap");
        n += present.iter().filter(|p| **p).count() as u64;
    }
    n
}

/// `prealloc`: the destination commits the whole guest during setup, before any
/// page arrives (the spec's skeleton VM), so even pages that only ever receive
/// "zero" end up resident. Without it (and without THP or background pre-faulting)
/// never-written zero pages stay unpopulated: the check can tell the two apart.
#[test]
fn prealloc_commits_every_destination_page_before_transfer() {
    for prealloc in [false, true] {
        let src = Source::default_running(32 * MIB, TrackerKind::Explicit);
        let (c, a) = mem::pair();
        let m = livemig::engine::Migration::new(src.mem.clone())
            .tracker(src.tracker())
            .vm_control(Box::new(src.dirtier.control()))
            .policy(Box::new(test_policy()))
            .config(config(Mode::Multichannel, 2, CodecId::Raw, Verify::Digest));
        let rc = {
            let mut settings = receiver_config();
            settings.prealloc = prealloc;
            settings
        };
        let out = migrate(m, c, livemig::receiver::Receiver::new().config(rc), a);
        // Count before anything reads the destination (a read maps the shared zero
        // page, which pagemap reports as present).
        let resident = out
            .dest
            .as_ref()
            .map(|d| resident_pages(&d.memory))
            .unwrap_or(0);
        let (report, received) = assert_migrated(&src, out);
        let total = received.memory.total_pages();
        if prealloc {
            assert_eq!(resident, total, "prealloc leaves no page unpopulated");
        } else {
            assert!(report.zero_pages > 0);
            assert!(
                resident < total,
                "without prealloc, zero pages stay unpopulated ({resident} of {total})"
            );
        }
    }
}

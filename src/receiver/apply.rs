//! Applying batch frames to destination memory (one thread per page stream).

use std::io::IoSliceMut;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::gate::RoundGate;
use crate::codec::{CodecId, CodecSet};
use crate::memory::{page_hash, zero_page_hash, DirtyBitmap, GuestMemory, PAGE_SIZE};
use crate::proof::{DigestDelta, PageLedger};
use crate::transport::framed::FrameReader;
use crate::wire::batch::{BatchMeta, FLAG_DELTA, FLAG_RACY};
use crate::wire::frame::RoundEnd;
use crate::wire::resume::{HeldRun, MAX_HELD_RUNS};
use crate::wire::FrameKind;

/// What kind of failure stopped a page stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageErrorKind {
    /// The stream broke: closed, reset or silent past its deadline. The session
    /// can resume on new connections (docs/PROTOCOL.md, "Resumption").
    Link,
    /// The source sent something the protocol forbids: a malformed or corrupt
    /// frame, a page out of bounds or twice in a round, a bad checksum.
    Invalid,
    /// Another stream's failure, or the control stream's, stopped this one.
    Stopped,
}

/// Why applying a page stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("page stream {stream}: {message}")]
pub struct PageError {
    /// The stream's index.
    pub stream: u16,
    /// What kind of failure.
    pub kind: PageErrorKind,
    /// What went wrong.
    pub message: String,
}

impl PageError {
    /// Whether the session may resume after this failure.
    pub fn is_link(&self) -> bool {
        self.kind == PageErrorKind::Link
    }
}

/// A failure inside one batch: the link broke, or the batch is invalid.
enum BatchFault {
    Link(String),
    Invalid(String),
}

impl From<String> for BatchFault {
    fn from(s: String) -> Self {
        Self::Invalid(s)
    }
}

impl From<&str> for BatchFault {
    fn from(s: &str) -> Self {
        Self::Invalid(s.into())
    }
}

impl From<crate::transport::TransportError> for BatchFault {
    fn from(e: crate::transport::TransportError) -> Self {
        if e.is_link_loss() {
            Self::Link(e.to_string())
        } else {
            Self::Invalid(e.to_string())
        }
    }
}

/// State shared by the apply threads and the control thread.
#[derive(Debug)]
pub struct ApplyShared {
    /// Destination memory.
    pub memory: Arc<GuestMemory>,
    /// xxh3 of the last version of each page applied, and the running digest over
    /// them (the destination side of the brownout proof).
    pub applied: PageLedger,
    /// Pages written at least once (untouched zero pages need no write when the
    /// memory started zeroed).
    pub touched: DirtyBitmap,
    /// Per page: the round in which a batch last claimed it, plus one (0: never).
    /// A batch claims all its pages before writing any, so a page arrives at most
    /// once per round across all streams (see [`claim_pages`]).
    pub stamps: Vec<AtomicU32>,
    /// The memory was provided by the caller and may hold anything: an untouched
    /// page is not known to be zero (see [`ApplyShared::caller_memory`]).
    pub unknown_contents: bool,
    /// Round gate.
    pub gate: RoundGate,
    /// Pages applied.
    pub pages: AtomicU64,
    /// Zero pages applied.
    pub zero_pages: AtomicU64,
    /// Pages whose racy (zero-copy) hash did not match: re-sent later by design.
    pub torn_pages: AtomicU64,
    /// Bytes received on page streams.
    pub bytes: AtomicU64,
    /// Set on the first failure.
    pub failed: AtomicBool,
    /// First failure.
    pub error: Mutex<Option<PageError>>,
}

impl ApplyShared {
    /// Shared state for `streams` streams over `memory`, accepting at most
    /// `max_rounds` rounds.
    pub fn new(memory: Arc<GuestMemory>, streams: usize, max_rounds: u32) -> Self {
        let n = memory.total_pages();
        Self {
            applied: PageLedger::new(n),
            touched: DirtyBitmap::new(n),
            stamps: (0..n).map(|_| AtomicU32::new(0)).collect(),
            unknown_contents: false,
            gate: RoundGate::new(streams, max_rounds),
            memory,
            pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            torn_pages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    /// Record a failure (first one wins) and wake the gate.
    pub fn fail(&self, e: PageError) {
        let mut slot = self.error.lock().expect("error lock");
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::Release);
        self.gate.abort();
    }

    /// Stop every stream for a reason outside the page streams (the control
    /// stream failed or the source aborted).
    pub fn stop(&self, reason: String) {
        self.fail(PageError {
            stream: u16::MAX,
            kind: PageErrorKind::Stopped,
            message: reason,
        });
    }

    /// The first failure recorded.
    pub fn first_error(&self) -> Option<PageError> {
        self.error.lock().expect("error lock").clone()
    }

    /// Make ready for a resumed session's streams, which start at `round`. Call
    /// only once every applier of the broken connection has stopped.
    pub fn reopen(&self, round: u32) {
        *self.error.lock().expect("error lock") = None;
        self.failed.store(false, Ordering::Release);
        self.gate.reopen(round);
    }

    /// What this destination holds from rounds `complete_rounds..`: runs of
    /// consecutive pages applied completely in the same round (at most
    /// [`MAX_HELD_RUNS`]; pages beyond are left out and sent again), and the
    /// highest round any page was claimed in. Call only while no applier runs.
    pub fn held_since(&self, complete_rounds: u32) -> (Vec<HeldRun>, Option<u32>) {
        let mut runs: Vec<HeldRun> = Vec::new();
        let mut highest = None;
        for (i, stamp) in self.stamps.iter().enumerate() {
            let stamp = stamp.load(Ordering::Acquire);
            if stamp == 0 {
                continue;
            }
            let round = stamp - 1;
            highest = highest.max(Some(round));
            if round < complete_rounds {
                continue;
            }
            let i = i as u64;
            let full = runs.len() == MAX_HELD_RUNS;
            match runs.last_mut() {
                Some(r) if r.end() == i && r.round == round && r.count < u32::MAX => r.count += 1,
                _ if full => {}
                _ => runs.push(HeldRun {
                    first: i,
                    count: 1,
                    round,
                }),
            }
        }
        (runs, highest)
    }

    /// The memory was provided by the caller (`Receiver::memory`) and may hold
    /// anything: a zero page is then written unless the page already reads as zero,
    /// instead of being skipped while untouched.
    pub fn caller_memory(mut self, yes: bool) -> Self {
        self.unknown_contents = yes;
        self
    }
}

struct Scratch {
    meta: BatchMeta,
    indexes: Vec<u64>,
    data: Vec<u8>,
    decoded: Vec<u8>,
    codecs: CodecSet,
    /// This thread's digest updates, merged into the ledger after each batch.
    digest: DigestDelta,
}

/// Apply frames from one page stream, from round `first_round` (0, or the round a
/// resumed session goes on with), until StreamEnd. Fails on a broken link and on
/// any malformed, corrupt or out-of-order input, saying which.
pub fn apply_stream(
    shared: &ApplyShared,
    r: FrameReader,
    stream_index: u16,
    first_round: u32,
) -> Result<(), PageError> {
    let link = |message: String| PageError {
        stream: stream_index,
        kind: PageErrorKind::Link,
        message,
    };
    let invalid = |message: String| PageError {
        stream: stream_index,
        kind: PageErrorKind::Invalid,
        message,
    };
    let from_transport = |e: crate::transport::TransportError| {
        if e.is_link_loss() {
            link(e.to_string())
        } else {
            invalid(e.to_string())
        }
    };
    apply_frames(
        shared,
        r,
        stream_index,
        first_round,
        &from_transport,
        &invalid,
    )
}

fn apply_frames(
    shared: &ApplyShared,
    mut r: FrameReader,
    stream_index: u16,
    first_round: u32,
    from_transport: &dyn Fn(crate::transport::TransportError) -> PageError,
    invalid: &dyn Fn(String) -> PageError,
) -> Result<(), PageError> {
    let mut s = Scratch {
        meta: BatchMeta::default(),
        indexes: Vec::with_capacity(crate::wire::MAX_BATCH_PAGES),
        data: Vec::new(),
        decoded: Vec::new(),
        codecs: CodecSet::new(1),
        digest: DigestDelta::default(),
    };
    let mut round = first_round;
    let stopped = |e: super::gate::GateError| PageError {
        stream: stream_index,
        kind: if e == super::gate::GateError::Aborted {
            PageErrorKind::Stopped
        } else {
            PageErrorKind::Invalid
        },
        message: e.to_string(),
    };
    let result = loop {
        let h = match r.header() {
            Ok(h) => h,
            Err(e) => break Err(from_transport(e)),
        };
        match h.kind {
            FrameKind::Batch => {
                let meta = match r.meta(&h) {
                    Ok(m) => m,
                    Err(e) => break Err(from_transport(e)),
                };
                if let Err(e) = s.meta.decode_from(meta) {
                    break Err(invalid(format!("bad batch: {e}")));
                }
                if s.meta.round != round {
                    break Err(invalid(format!(
                        "batch of round {} arrived during round {round}",
                        s.meta.round
                    )));
                }
                s.indexes.clear();
                let applied = apply_batch(shared, &mut r, &h, &mut s);
                shared.applied.merge(&mut s.digest);
                match applied {
                    Ok(()) => {}
                    Err(BatchFault::Link(e)) => {
                        // The batch's pages may be half written: they are not held
                        // from this round, and never again taken as untouched zero.
                        for &idx in &s.indexes {
                            if let Some(stamp) = shared.stamps.get(idx as usize) {
                                stamp.store(0, Ordering::Release);
                                shared.touched.mark(idx);
                            }
                        }
                        break Err(PageError {
                            stream: stream_index,
                            kind: PageErrorKind::Link,
                            message: e,
                        });
                    }
                    Err(BatchFault::Invalid(e)) => break Err(invalid(e)),
                }
            }
            FrameKind::RoundEnd => {
                let end = match r.meta(&h) {
                    Ok(m) => match RoundEnd::decode(m) {
                        Ok(e) => e,
                        Err(e) => break Err(invalid(e.to_string())),
                    },
                    Err(e) => break Err(from_transport(e)),
                };
                if end.round != round {
                    break Err(invalid(format!(
                        "round end {} during round {round}",
                        end.round
                    )));
                }
                if let Err(e) = shared.gate.arrive(round) {
                    break Err(stopped(e));
                }
                round += 1;
            }
            FrameKind::StreamEnd => {
                if h.meta_len != 0 || h.data_len != 0 {
                    break Err(invalid("malformed stream end".into()));
                }
                // Valid only after the final round, with the same round count on
                // every stream; waiters of a round that cannot finish now fail.
                if let Err(e) = shared.gate.end(stream_index, round) {
                    break Err(stopped(e));
                }
                break Ok(());
            }
            FrameKind::Control => {
                break Err(invalid("unexpected control frame".into()));
            }
        }
    };
    shared.bytes.fetch_add(r.bytes(), Ordering::Relaxed);
    if let Err(e) = &result {
        shared.fail(e.clone());
    }
    result
}

fn apply_batch(
    shared: &ApplyShared,
    r: &mut FrameReader,
    h: &crate::wire::FrameHeader,
    s: &mut Scratch,
) -> Result<(), BatchFault> {
    let mem = &*shared.memory;
    // Resolve every gfn to a page index; an extent must stay inside one region.
    let mut indexes = std::mem::take(&mut s.indexes);
    indexes.clear();
    for e in &s.meta.extents {
        let first = mem.index_of_gfn(e.gfn).map_err(|e| e.to_string())?;
        let left = mem.pages_left_in_region(first).map_err(|e| e.to_string())?;
        if (e.count as u64) > left {
            return Err(BatchFault::Invalid(format!(
                "extent at gfn {:#x} of {} pages crosses the end of its region",
                e.gfn, e.count
            )));
        }
        indexes.extend(first..first + e.count as u64);
    }
    claim_pages(shared, &indexes, s.meta.round)?;
    // Only claimed pages are listed: a failed batch gives up exactly these.
    s.indexes = indexes;
    let codec = s.meta.codec.ok_or("batch without codec")?;
    let racy = s.meta.flags & FLAG_RACY != 0;
    if s.meta.flags & FLAG_DELTA != 0 {
        return apply_delta_batch(shared, r, h, s, codec);
    }
    let n = s.meta.pages();
    if codec == CodecId::Raw {
        if h.data_len as usize != s.meta.payload_len as usize {
            return Err("raw payload length mismatch".into());
        }
        // Scatter-read the payload straight into guest memory: merge consecutive
        // non-zero pages that are also contiguous in memory into one slice.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for i in 0..n {
            if s.meta.is_zero(i) {
                continue;
            }
            let idx = s.indexes[i];
            match spans.last_mut() {
                Some((start, count))
                    if *start + *count == idx && mem.locate(idx).map(|x| x.1).unwrap_or(0) != 0 =>
                {
                    *count += 1
                }
                _ => spans.push((idx, 1)),
            }
        }
        let mut slices: Vec<IoSliceMut<'_>> = Vec::with_capacity(spans.len());
        for &(start, count) in &spans {
            // SAFETY: `io_slice_mut` needs that no guest runs on these pages and that
            // no other thread reads or writes them while the slice lives. This holds
            // for any input, hostile included, because of checks made above in safe
            // code, not because the sender behaves:
            // - no guest: the receiver's memory runs no vCPU until `run` returns;
            // - no alias within this batch: `BatchMeta::decode_from` refused extents
            //   that are unsorted or overlap, and each extent was resolved inside one
            //   region, so the spans built from them are disjoint;
            // - no other stream in this round: `claim_pages` stamped every page of
            //   this batch with this round (an atomic swap) before any slice was made,
            //   and refuses a page already stamped with it, so any other batch of the
            //   round naming one of these pages failed before touching it;
            // - no stream in another round: a stream only moves to round r+1 through
            //   the gate, after every stream (this one included, once this batch is
            //   done and the slices dropped) reported round r, and the gate's mutex
            //   orders those writes before the next round's;
            // - not the prefault thread: it only asks the kernel to populate pages
            //   (no userspace read or write of their bytes).
            slices.push(unsafe { mem.io_slice_mut(start, count) }.map_err(|e| e.to_string())?);
        }
        r.data_vectored(h, &mut slices)?;
        drop(slices);
        for i in 0..n {
            let idx = s.indexes[i];
            if s.meta.is_zero(i) {
                apply_zero(shared, idx, s.meta.hashes[i], &mut s.digest)?;
                continue;
            }
            // SAFETY: as above: this batch claimed the page for this round, so this
            // thread is its only reader and writer until it passes the gate.
            let got = unsafe { mem.hash_page_exclusive(idx) }.map_err(|e| e.to_string())?;
            record(shared, idx, s.meta.hashes[i], got, racy, &mut s.digest)?;
        }
    } else {
        r.data_into(h, &mut s.data)?;
        s.decoded.resize(s.meta.payload_len as usize, 0);
        s.codecs
            .get(codec)
            .decode(&s.data, &mut s.decoded)
            .map_err(|e| e.to_string())?;
        let mut off = 0;
        for i in 0..n {
            let idx = s.indexes[i];
            if s.meta.is_zero(i) {
                apply_zero(shared, idx, s.meta.hashes[i], &mut s.digest)?;
                continue;
            }
            let page = &s.decoded[off..off + PAGE_SIZE];
            off += PAGE_SIZE;
            let got = page_hash(page);
            if got != s.meta.hashes[i] && !racy {
                return Err(format!(
                    "page at index {idx} fails its checksum after {} decoding",
                    codec.name()
                )
                .into());
            }
            mem.write_pages(idx, page).map_err(|e| e.to_string())?;
            record(shared, idx, s.meta.hashes[i], got, racy, &mut s.digest)?;
        }
    }
    shared.pages.fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

/// A `FLAG_DELTA` batch: the decoded payload is a record stream, one record per
/// non-zero page in batch order: `kind u8` then either a full page (kind 1) or
/// `len u32` and a delta (kind 2) applied onto the page's current content. Every
/// length is checked against what is left; the stream must be consumed exactly.
fn apply_delta_batch(
    shared: &ApplyShared,
    r: &mut FrameReader,
    h: &crate::wire::FrameHeader,
    s: &mut Scratch,
    codec: CodecId,
) -> Result<(), BatchFault> {
    use crate::codec::cache::{Record, RecordReader};
    let mem = &*shared.memory;
    r.data_into(h, &mut s.data)?;
    let records: &[u8] = if codec == CodecId::Raw {
        if s.data.len() != s.meta.payload_len as usize {
            return Err("raw delta payload length mismatch".into());
        }
        &s.data
    } else {
        s.decoded.resize(s.meta.payload_len as usize, 0);
        s.codecs
            .get(codec)
            .decode(&s.data, &mut s.decoded)
            .map_err(|e| e.to_string())?;
        &s.decoded
    };
    let n = s.meta.pages();
    let mut page = [0u8; PAGE_SIZE];
    let mut rd = RecordReader::new(records);
    for i in 0..n {
        let idx = s.indexes[i];
        if s.meta.is_zero(i) {
            apply_zero(shared, idx, s.meta.hashes[i], &mut s.digest)?;
            continue;
        }
        let rec = rd
            .next_record()
            .map_err(|e| format!("page at index {idx}: {e}"))?;
        let what = match rec {
            Record::Full(src) => {
                page.copy_from_slice(src);
                "decoding its record"
            }
            Record::Delta(delta) => {
                mem.read_pages(idx, &mut page).map_err(|e| e.to_string())?;
                crate::codec::delta::apply(delta, &mut page)
                    .map_err(|e| format!("delta of page at index {idx}: {e}"))?;
                "applying its delta"
            }
        };
        let got = page_hash(&page);
        if got != s.meta.hashes[i] {
            return Err(format!(
                "page at index {idx} fails its checksum after {what} (wrong delta base or corrupt)"
            )
            .into());
        }
        mem.write_pages(idx, &page).map_err(|e| e.to_string())?;
        record(shared, idx, s.meta.hashes[i], got, false, &mut s.digest)?;
    }
    rd.finish()
        .map_err(|e| format!("batch delta records: {e}"))?;
    shared.pages.fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

/// Claim `indexes` for `round`: stamp each page with `round + 1` and refuse a page
/// already stamped with it (sent twice in one round, on this stream or another).
/// All claims happen before any byte is written, so the refused batch touches
/// nothing; the session then fails as a whole.
pub fn claim_pages(shared: &ApplyShared, indexes: &[u64], round: u32) -> Result<(), String> {
    // `round < max_rounds < u32::MAX` (the gate's bound), so `round + 1` fits.
    let stamp = round.saturating_add(1);
    for &idx in indexes {
        let slot = shared
            .stamps
            .get(idx as usize)
            .ok_or_else(|| format!("page at index {idx} is outside guest memory"))?;
        if slot.swap(stamp, Ordering::AcqRel) == stamp {
            return Err(format!(
                "page at index {idx} arrives twice in round {round} (a page is sent at most once per round)"
            ));
        }
    }
    Ok(())
}

fn apply_zero(
    shared: &ApplyShared,
    idx: u64,
    claimed: u64,
    digest: &mut DigestDelta,
) -> Result<(), String> {
    if claimed != zero_page_hash() {
        return Err(format!("zero page at index {idx} carries a non-zero hash"));
    }
    // An untouched page of memory this receiver allocated is zero: skip it (no
    // write, no page fault). Caller-provided memory may hold anything: read the page
    // (cheap, and it commits nothing) and write zeros only when it is not zero.
    let write = shared.touched.is_marked(idx)
        || (shared.unknown_contents && {
            // SAFETY: the destination VM is not running, and within a round this
            // page is in one batch only, applied by this thread (round gate).
            !unsafe { shared.memory.page_is_zero_exclusive(idx) }.map_err(|e| e.to_string())?
        });
    if write {
        shared
            .memory
            .zero_pages(idx, 1)
            .map_err(|e| e.to_string())?;
    }
    shared.applied.record(idx, claimed, digest);
    shared.zero_pages.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn record(
    shared: &ApplyShared,
    idx: u64,
    claimed: u64,
    got: u64,
    racy: bool,
    digest: &mut DigestDelta,
) -> Result<(), String> {
    if got != claimed {
        if !racy {
            return Err(format!(
                "page at index {idx} fails its checksum (corrupted in transit)"
            ));
        }
        shared.torn_pages.fetch_add(1, Ordering::Relaxed);
    }
    shared.touched.mark(idx);
    shared.applied.record(idx, got, digest);
    Ok(())
}

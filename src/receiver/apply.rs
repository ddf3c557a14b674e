//! Applying batch frames to destination memory (one thread per page stream).
//!
//! Why over 600 lines: applying a batch writes into destination memory through
//! `unsafe`, and its safety argument (page claims per round, stamps, the round gate)
//! is kept in the same file as every write it covers.

use std::io::IoSliceMut;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::gate::GateError;
use super::gate::RoundGate;
use crate::codec::cache::RecordError;
use crate::codec::delta::DeltaError;
use crate::codec::{CodecError, CodecId, CodecSet};
use crate::memory::zeroed::ZeroedAtomics;
use crate::memory::{page_hash, zero_page_hash, DirtyBitmap, GuestMemory, MemoryError, PAGE_SIZE};
use crate::proof::{DigestDelta, PageLedger};
use crate::transport::framed::FrameReader;
use crate::transport::TransportError;
use crate::wire::batch::{BatchMeta, FLAG_DELTA, FLAG_RACY};
use crate::wire::frame::RoundEnd;
use crate::wire::resume::{HeldRun, MAX_HELD_RUNS};
use crate::wire::FrameKind;
use crate::wire::WireError;

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
#[derive(Debug, Clone, thiserror::Error)]
#[error("page stream {stream}: {fault}")]
pub struct PageError {
    /// The stream's index (`u16::MAX`: the session as a whole was stopped).
    pub stream: u16,
    /// What went wrong.
    #[source]
    pub fault: PageFault,
}

impl PageError {
    /// What kind of failure.
    pub fn kind(&self) -> PageErrorKind {
        self.fault.kind()
    }
    /// Whether the session may resume after this failure.
    pub fn is_link(&self) -> bool {
        self.kind() == PageErrorKind::Link
    }
}

/// What stopped a page stream. Shared causes are behind `Arc` so the first
/// failure, recorded for the session, can be handed to every stream.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PageFault {
    /// The connection broke (closed, reset or silent past its deadline).
    #[error("{0}")]
    Link(#[source] Arc<TransportError>),
    /// The stream delivered something that is no valid frame.
    #[error("{0}")]
    Transport(#[source] Arc<TransportError>),
    /// A frame's metadata does not decode.
    #[error("bad {what}: {source}")]
    Wire {
        /// Which metadata.
        what: &'static str,
        /// The decoding error.
        #[source]
        source: WireError,
    },
    /// A batch of another round than the one in progress.
    #[error("batch of round {got} arrived during round {current}")]
    BatchRound {
        /// Its round.
        got: u32,
        /// The round in progress.
        current: u32,
    },
    /// A round end of another round than the one in progress.
    #[error("round end {got} during round {current}")]
    RoundEndRound {
        /// Its round.
        got: u32,
        /// The round in progress.
        current: u32,
    },
    /// A stream end with a payload.
    #[error("malformed stream end")]
    MalformedStreamEnd,
    /// A control frame on a page stream.
    #[error("unexpected control frame")]
    ControlFrame,
    /// The round gate refused the stream (other than by being stopped).
    #[error("{0}")]
    Gate(#[source] GateError),
    /// Another stream's failure, or the control stream's, stopped this one.
    #[error("stopped: another stream or the control stream failed, or the source aborted")]
    Stopped,
    /// A batch names memory outside the guest (its gfn maps nowhere).
    #[error("{0}")]
    Memory(#[source] Arc<MemoryError>),
    /// An extent that runs past the end of its memory region.
    #[error("extent at gfn {gfn:#x} of {count} pages crosses the end of its region")]
    ExtentCrossesRegion {
        /// Its first guest frame.
        gfn: u64,
        /// Its pages.
        count: u32,
    },
    /// A page index outside guest memory.
    #[error("page at index {index} is outside guest memory")]
    OutOfBounds {
        /// The page index.
        index: u64,
    },
    /// A page sent twice in one round.
    #[error("page at index {index} arrives twice in round {round} (a page is sent at most once per round)")]
    Twice {
        /// The page index.
        index: u64,
        /// The round.
        round: u32,
    },
    /// A batch that names no codec.
    #[error("batch without codec")]
    NoCodec,
    /// A raw payload whose length differs from the batch's.
    #[error("raw {}payload length mismatch", if *delta { "delta " } else { "" })]
    PayloadLength {
        /// It is a delta batch's record stream.
        delta: bool,
    },
    /// The payload does not decompress.
    #[error("{0}")]
    Codec(#[source] Arc<CodecError>),
    /// A page whose content does not hash to what the batch says.
    #[error("page at index {index} fails its checksum {stage}")]
    Checksum {
        /// The page index.
        index: u64,
        /// Where it was found (a fixed description: "(corrupted in transit)",
        /// "after lz4 decoding", …).
        stage: &'static str,
    },
    /// A zero page whose hash is not the zero page's.
    #[error("zero page at index {index} carries a non-zero hash")]
    ZeroHash {
        /// The page index.
        index: u64,
    },
    /// A delta batch's record for one page is malformed.
    #[error("page at index {index}: {source}")]
    Record {
        /// The page index.
        index: u64,
        /// What is wrong.
        #[source]
        source: RecordError,
    },
    /// A delta batch's record stream does not end where it should.
    #[error("batch delta records: {0}")]
    Records(#[source] RecordError),
    /// A page's delta does not apply.
    #[error("delta of page at index {index}: {source}")]
    Delta {
        /// The page index.
        index: u64,
        /// What is wrong.
        #[source]
        source: DeltaError,
    },
    /// The stream's receiver thread panicked.
    #[error("its receiver thread panicked")]
    Panicked,
}

impl PageFault {
    /// What kind of failure.
    pub fn kind(&self) -> PageErrorKind {
        match self {
            Self::Link(_) => PageErrorKind::Link,
            Self::Stopped | Self::Gate(GateError::Aborted) => PageErrorKind::Stopped,
            _ => PageErrorKind::Invalid,
        }
    }
}

/// A failure inside one batch: the link broke, or the batch is invalid.
enum BatchFault {
    Link(Arc<TransportError>),
    Invalid(PageFault),
}

impl From<PageFault> for BatchFault {
    fn from(f: PageFault) -> Self {
        Self::Invalid(f)
    }
}

impl From<MemoryError> for BatchFault {
    fn from(e: MemoryError) -> Self {
        Self::Invalid(PageFault::Memory(Arc::new(e)))
    }
}

impl From<CodecError> for BatchFault {
    fn from(e: CodecError) -> Self {
        Self::Invalid(PageFault::Codec(Arc::new(e)))
    }
}

impl From<TransportError> for BatchFault {
    fn from(e: TransportError) -> Self {
        match PageFault::of_transport(e) {
            PageFault::Link(e) => Self::Link(e),
            other => Self::Invalid(other),
        }
    }
}

impl PageFault {
    fn of_transport(e: TransportError) -> Self {
        if e.is_link_loss() {
            Self::Link(Arc::new(e))
        } else {
            Self::Transport(Arc::new(e))
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
    pub stamps: ZeroedAtomics<AtomicU32>,
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
            stamps: ZeroedAtomics::new(n as usize),
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
    pub fn stop(&self) {
        self.fail(PageError {
            stream: u16::MAX,
            fault: PageFault::Stopped,
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
    apply_frames(shared, r, stream_index, first_round)
}

fn apply_frames(
    shared: &ApplyShared,
    mut r: FrameReader,
    stream_index: u16,
    first_round: u32,
) -> Result<(), PageError> {
    let invalid = |fault: PageFault| PageError {
        stream: stream_index,
        fault,
    };
    let from_transport = |e: TransportError| invalid(PageFault::of_transport(e));
    let mut s = Scratch {
        meta: BatchMeta::default(),
        indexes: Vec::with_capacity(crate::wire::MAX_BATCH_PAGES),
        data: Vec::new(),
        decoded: Vec::new(),
        codecs: CodecSet::new(1),
        digest: DigestDelta::default(),
    };
    let mut round = first_round;
    let stopped = |e: GateError| invalid(PageFault::Gate(e));
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
                    break Err(invalid(PageFault::Wire {
                        what: "batch",
                        source: e,
                    }));
                }
                if s.meta.round != round {
                    break Err(invalid(PageFault::BatchRound {
                        got: s.meta.round,
                        current: round,
                    }));
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
                        break Err(invalid(PageFault::Link(e)));
                    }
                    Err(BatchFault::Invalid(e)) => break Err(invalid(e)),
                }
            }
            FrameKind::RoundEnd => {
                let end = match r.meta(&h) {
                    Ok(m) => match RoundEnd::decode(m) {
                        Ok(e) => e,
                        Err(e) => {
                            break Err(invalid(PageFault::Wire {
                                what: "round end",
                                source: e,
                            }))
                        }
                    },
                    Err(e) => break Err(from_transport(e)),
                };
                if end.round != round {
                    break Err(invalid(PageFault::RoundEndRound {
                        got: end.round,
                        current: round,
                    }));
                }
                if let Err(e) = shared.gate.arrive(round) {
                    break Err(stopped(e));
                }
                round += 1;
            }
            FrameKind::StreamEnd => {
                if h.meta_len != 0 || h.data_len != 0 {
                    break Err(invalid(PageFault::MalformedStreamEnd));
                }
                // Valid only after the final round, with the same round count on
                // every stream; waiters of a round that cannot finish now fail.
                if let Err(e) = shared.gate.end(stream_index, round) {
                    break Err(stopped(e));
                }
                break Ok(());
            }
            FrameKind::Control => {
                break Err(invalid(PageFault::ControlFrame));
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
        let first = mem.index_of_gfn(e.gfn)?;
        let left = mem.pages_left_in_region(first)?;
        if (e.count as u64) > left {
            return Err(PageFault::ExtentCrossesRegion {
                gfn: e.gfn,
                count: e.count,
            }
            .into());
        }
        indexes.extend(first..first + e.count as u64);
    }
    claim_pages(shared, &indexes, s.meta.round)?;
    // Only claimed pages are listed: a failed batch gives up exactly these.
    s.indexes = indexes;
    let codec = s.meta.codec.ok_or(PageFault::NoCodec)?;
    let racy = s.meta.flags & FLAG_RACY != 0;
    if s.meta.flags & FLAG_DELTA != 0 {
        return apply_delta_batch(shared, r, h, s, codec);
    }
    let n = s.meta.pages();
    if codec == CodecId::Raw {
        if h.data_len as usize != s.meta.payload_len as usize {
            return Err(PageFault::PayloadLength { delta: false }.into());
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
            slices.push(unsafe { mem.io_slice_mut(start, count) }?);
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
            let got = unsafe { mem.hash_page_exclusive(idx) }?;
            record(shared, idx, s.meta.hashes[i], got, racy, &mut s.digest)?;
        }
    } else {
        r.data_into(h, &mut s.data)?;
        s.decoded.resize(s.meta.payload_len as usize, 0);
        s.codecs.get(codec).decode(&s.data, &mut s.decoded)?;
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
                return Err(PageFault::Checksum {
                    index: idx,
                    stage: match codec {
                        CodecId::Lz4 => "after lz4 decoding",
                        CodecId::Zstd => "after zstd decoding",
                        CodecId::Raw => "after raw decoding",
                    },
                }
                .into());
            }
            mem.write_pages(idx, page)?;
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
            return Err(PageFault::PayloadLength { delta: true }.into());
        }
        &s.data
    } else {
        s.decoded.resize(s.meta.payload_len as usize, 0);
        s.codecs.get(codec).decode(&s.data, &mut s.decoded)?;
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
            .map_err(|source| PageFault::Record { index: idx, source })?;
        let stage = match rec {
            Record::Full(src) => {
                page.copy_from_slice(src);
                "after decoding its record (wrong delta base or corrupt)"
            }
            Record::Delta(delta) => {
                mem.read_pages(idx, &mut page)?;
                crate::codec::delta::apply(delta, &mut page)
                    .map_err(|source| PageFault::Delta { index: idx, source })?;
                "after applying its delta (wrong delta base or corrupt)"
            }
        };
        let got = page_hash(&page);
        if got != s.meta.hashes[i] {
            return Err(PageFault::Checksum { index: idx, stage }.into());
        }
        mem.write_pages(idx, &page)?;
        record(shared, idx, s.meta.hashes[i], got, false, &mut s.digest)?;
    }
    rd.finish().map_err(PageFault::Records)?;
    shared.pages.fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

/// Claim `indexes` for `round`: stamp each page with `round + 1` and refuse a page
/// already stamped with it (sent twice in one round, on this stream or another).
/// All claims happen before any byte is written, so the refused batch touches
/// nothing; the session then fails as a whole.
pub fn claim_pages(shared: &ApplyShared, indexes: &[u64], round: u32) -> Result<(), PageFault> {
    // `round < max_rounds < u32::MAX` (the gate's bound), so `round + 1` fits.
    let stamp = round.saturating_add(1);
    for &idx in indexes {
        let slot = shared
            .stamps
            .get(idx as usize)
            .ok_or(PageFault::OutOfBounds { index: idx })?;
        if slot.swap(stamp, Ordering::AcqRel) == stamp {
            return Err(PageFault::Twice { index: idx, round });
        }
    }
    Ok(())
}

fn apply_zero(
    shared: &ApplyShared,
    idx: u64,
    claimed: u64,
    digest: &mut DigestDelta,
) -> Result<(), BatchFault> {
    if claimed != zero_page_hash() {
        return Err(PageFault::ZeroHash { index: idx }.into());
    }
    // An untouched page of memory this receiver allocated is zero: skip it (no
    // write, no page fault). Caller-provided memory may hold anything: read the page
    // (cheap, and it commits nothing) and write zeros only when it is not zero.
    let write = shared.touched.is_marked(idx)
        || (shared.unknown_contents && {
            // SAFETY: the destination VM is not running, and within a round this
            // page is in one batch only, applied by this thread (round gate).
            !unsafe { shared.memory.page_is_zero_exclusive(idx) }?
        });
    if write {
        shared.memory.zero_pages(idx, 1)?;
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
) -> Result<(), PageFault> {
    if got != claimed {
        if !racy {
            return Err(PageFault::Checksum {
                index: idx,
                stage: "(corrupted in transit)",
            });
        }
        shared.torn_pages.fetch_add(1, Ordering::Relaxed);
    }
    shared.touched.mark(idx);
    shared.applied.record(idx, got, digest);
    Ok(())
}

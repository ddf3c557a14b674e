//! The send pipeline: one worker thread per page stream.
//!
//! The round loop pushes [`Batch`]es into one bounded queue shared by all workers
//! (back-pressure: the loop never runs more than `QUEUE_DEPTH` batches ahead). A
//! worker copies the batch's pages out of guest memory, elides zero pages, hashes
//! every page (xxh3-64; the hash is both the end-to-end check the receiver verifies
//! and, recorded in the sent [`PageLedger`], an entry of the brownout digest),
//! encodes the non-zero pages with the chosen codec and writes one frame.
//!
//! Rounds are gated: at the end of a round the loop sends [`Ctl::RoundEnd`] on every
//! worker's own control channel and waits at a [`SendGate`] that every worker
//! passes after draining the batch queue and writing its RoundEnd frame, so no page
//! of round r+1 is sent before every stream finished round r. (Per-worker control
//! channels let `auto` mode leave workers idle without stalling the gate.) The
//! receiver mirrors the gate, so a later copy of a page can never be overwritten by
//! an earlier one. The gate never blocks a worker, and a worker that fails or
//! panics aborts it ([`run_worker`]), so the loop never waits for a dead party.
//!
//! Why one file of over 600 lines: the worker loop and both send paths (copy and
//! zero-copy) still share it; merging the two batch-encoding loops into one will
//! shrink it below that.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;

use super::gate::SendGate;
use crate::codec::cache::DeltaCache;
use crate::codec::{zero::is_zero_page, CodecId, CodecSet};
use crate::memory::{page_hash, zero_page_hash, GuestMemory, PAGE_SIZE};
use crate::proof::{DigestDelta, PageLedger};
use crate::transport::framed::FrameWriter;
use crate::wire::batch::BatchMeta;
use crate::wire::frame::RoundEnd;
use crate::wire::{Extent, FrameKind};

/// Queue depth between the round loop and the workers, in batches. Two per worker
/// keeps every worker busy while bounding memory to a few MiB.
pub const QUEUE_DEPTH_PER_WORKER: usize = 2;
/// Bytes each compressor sees once before `auto` mode's first probe.
const PROBE_WARMUP_BYTES: usize = 16 * 1024;

/// A batch: extents in page-index space (never crossing a region), ≤ MAX_BATCH_PAGES.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Round (generation).
    pub round: u32,
    /// The memory cannot change while this batch is sent (VM paused or stopped):
    /// page hashes are exact. Otherwise zero-copy batches are marked racy.
    pub quiescent: bool,
    /// (first page index, count).
    pub extents: Vec<(u64, u32)>,
}

impl Batch {
    /// Pages in the batch.
    pub fn pages(&self) -> u64 {
        self.extents.iter().map(|e| e.1 as u64).sum()
    }
}

/// Control messages to one worker (batches come on the shared queue).
#[derive(Debug)]
pub enum Ctl {
    /// End of round: all its batches are queued. Drain the queue, send RoundEnd,
    /// then pass the gate.
    RoundEnd(u32),
    /// Last message: send StreamEnd and exit.
    Finish,
}

/// Counters shared by workers and read by the round loop.
#[derive(Debug, Default)]
pub struct Counters {
    /// Pages sent.
    pub pages: AtomicU64,
    /// Zero pages.
    pub zero_pages: AtomicU64,
    /// Wire bytes.
    pub wire_bytes: AtomicU64,
    /// Pages sent as a delta against their previously sent version.
    pub delta_pages: AtomicU64,
    /// Bytes the delta records saved against full-page records (before block codec).
    pub delta_bytes_saved: AtomicU64,
}

/// State shared by all workers of one migration.
#[derive(Debug)]
pub struct Shared {
    /// Guest memory being migrated.
    pub memory: Arc<GuestMemory>,
    /// xxh3 of the last version of each page put on the wire, and the running
    /// digest over them (the source side of the brownout proof).
    pub sent: Arc<PageLedger>,
    /// Counters.
    pub counters: Counters,
    /// Set when a worker fails; the round loop checks it after each round.
    pub failed: AtomicBool,
    /// The first worker failure.
    pub error: Mutex<Option<WorkerFailure>>,
    /// Round gate.
    pub gate: SendGate,
    /// zstd level.
    pub zstd_level: i32,
    /// Codec choice and active streams (fixed unless the mode is auto).
    pub tuner: super::auto::AutoTuner,
    /// Previously sent page versions, when delta encoding is on (copy path only).
    pub delta: Option<DeltaCache>,
    /// Page streams that send raw guest pages with vmsplice + splice.
    pub spliced_streams: u16,
}

impl Shared {
    /// Shared state for `workers` workers.
    pub fn new(
        memory: Arc<GuestMemory>,
        workers: usize,
        codec: CodecId,
        zstd_level: i32,
        auto: bool,
    ) -> Self {
        let pages = memory.total_pages() as usize;
        Self {
            memory,
            sent: Arc::new(PageLedger::new(pages as u64)),
            counters: Counters::default(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            gate: SendGate::new(workers),
            zstd_level,
            tuner: super::auto::AutoTuner::new(auto, workers, codec),
            delta: None,
            spliced_streams: 0,
        }
    }

    /// Record how many page streams splice raw guest pages (for the report).
    pub fn with_spliced_streams(mut self, n: u16) -> Self {
        self.spliced_streams = n;
        self
    }

    /// Turn delta encoding on with a cache of `budget_bytes` (0: the default for
    /// this guest's size). Raw batches then also take the copy path.
    pub fn with_delta(mut self, enabled: bool, budget_bytes: u64) -> Self {
        self.delta = enabled.then(|| {
            let budget = match budget_bytes {
                0 => crate::codec::cache::default_budget(self.memory.total_bytes()),
                b => b,
            };
            DeltaCache::new(budget)
        });
        self
    }

    /// Record a worker failure (the first one wins) and abort the round gate.
    pub fn fail(&self, f: WorkerFailure) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(f);
        }
        self.failed.store(true, Ordering::Release);
        drop(slot);
        self.gate.abort();
    }

    /// Make ready for the workers of a resumed session: no failure, the gate open,
    /// and no cached page version the destination may lack (`unsent(index)`).
    /// Call only when every worker of the broken connection has stopped.
    pub fn reopen(&self, unsent: impl Iterator<Item = u64>) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.failed.store(false, Ordering::Release);
        self.gate.reopen();
        if let Some(cache) = &self.delta {
            unsent.for_each(|p| cache.invalidate(p));
        }
    }

    /// The first worker failure, if any.
    pub fn failure(&self) -> Option<WorkerFailure> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Why a page-stream worker stopped.
#[derive(Debug, Clone)]
pub enum WorkerFailure {
    /// The stream's connection was lost (closed, reset, or the peer took nothing
    /// within the deadline): the session can resume on new connections.
    Lost {
        /// Page stream index.
        stream: usize,
        /// The transport error.
        source: Arc<crate::transport::TransportError>,
    },
    /// Encoding or writing failed.
    Failed {
        /// Page stream index.
        stream: usize,
        /// The error.
        source: Arc<super::StreamFailure>,
    },
    /// The worker panicked (a bug, or a stream implementation that panicked).
    Panicked {
        /// Page stream index.
        stream: usize,
        /// The panic message.
        message: super::PanicMessage,
    },
}

impl WorkerFailure {
    /// The failure of writing to stream `stream`.
    fn of_stream(stream: usize, e: crate::transport::TransportError) -> Self {
        if e.is_link_loss() {
            Self::Lost {
                stream,
                source: Arc::new(e),
            }
        } else {
            Self::Failed {
                stream,
                source: Arc::new(super::StreamFailure::Write(e)),
            }
        }
    }
}

/// Why one batch was not sent.
#[derive(Debug)]
pub enum BatchError {
    /// Writing the frame failed.
    Stream(crate::transport::TransportError),
    /// Reading or encoding the pages failed.
    Encode(super::StreamFailure),
}

impl From<crate::memory::MemoryError> for BatchError {
    fn from(e: crate::memory::MemoryError) -> Self {
        Self::Encode(super::StreamFailure::Memory(e))
    }
}

impl From<crate::codec::CodecError> for BatchError {
    fn from(e: crate::codec::CodecError) -> Self {
        Self::Encode(super::StreamFailure::Codec(e))
    }
}

/// [`worker`] with its panics caught: a panic becomes
/// [`WorkerFailure::Panicked`], which aborts the round gate, so the round loop
/// sees a typed failure instead of waiting for the worker forever.
pub fn run_worker(
    shared: &Shared,
    index: usize,
    batches: Receiver<Batch>,
    ctl: Receiver<Ctl>,
    out: FrameWriter,
) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        worker(shared, index, batches, ctl, out)
    }));
    if let Err(p) = r {
        shared.fail(WorkerFailure::Panicked {
            stream: index,
            message: super::PanicMessage::of(&*p),
        });
    }
}

/// Reusable buffers of one worker.
struct Scratch {
    pages: Vec<u8>,
    encoded: Vec<u8>,
    meta: BatchMeta,
    meta_bytes: Vec<u8>,
    codecs: CodecSet,
    present: Vec<bool>,
    indexes: Vec<u64>,
    records: Vec<u8>,
    /// This worker's digest updates, merged into the ledger after each batch.
    digest: DigestDelta,
}

/// Run one worker until `Finish` (or until its control channel closes).
pub fn worker(
    shared: &Shared,
    index: usize,
    batches: Receiver<Batch>,
    ctl: Receiver<Ctl>,
    mut out: FrameWriter,
) {
    let mut s = Scratch {
        pages: vec![0u8; crate::wire::MAX_BATCH_PAGES * PAGE_SIZE],
        encoded: Vec::with_capacity(crate::wire::MAX_BATCH_DATA),
        meta: BatchMeta::default(),
        meta_bytes: Vec::with_capacity(crate::wire::MAX_BATCH_META),
        codecs: CodecSet::new(shared.zstd_level),
        present: Vec::with_capacity(crate::wire::MAX_BATCH_PAGES),
        indexes: Vec::with_capacity(crate::wire::MAX_BATCH_PAGES),
        records: Vec::with_capacity(crate::wire::MAX_BATCH_DATA),
        digest: DigestDelta::default(),
    };
    if shared.tuner.is_enabled() {
        // Warm the compressors (zstd allocates its context tables on first use) so
        // that the first probes time compression, not set-up.
        let sample: Vec<u8> = (0..PROBE_WARMUP_BYTES).map(|i| (i % 251) as u8).collect();
        for c in [CodecId::Lz4, CodecId::Zstd] {
            let _ = s.codecs.get(c).encode(&sample, &mut s.encoded);
        }
    }
    let mut st = WorkerState {
        round_batches: 0,
        round_pages: 0,
        broken: false,
    };
    loop {
        let msg = if shared.tuner.is_active(index) {
            if let Ok(b) = batches.try_recv() {
                handle_batch(shared, index, &b, &mut s, &mut out, &mut st);
                continue;
            }
            crossbeam_channel::select! {
                recv(batches) -> b => {
                    if let Ok(b) = b {
                        handle_batch(shared, index, &b, &mut s, &mut out, &mut st);
                    }
                    continue;
                }
                recv(ctl) -> c => c,
            }
        } else {
            match ctl.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(c) => Ok(c),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        };
        let Ok(msg) = msg else { return };
        // Every batch of the round was queued before this marker: take what is left.
        while let Ok(b) = batches.try_recv() {
            handle_batch(shared, index, &b, &mut s, &mut out, &mut st);
        }
        match msg {
            Ctl::RoundEnd(round) => {
                if !st.broken {
                    let before = out.bytes();
                    let r = out.send_round_end(RoundEnd {
                        round,
                        batches: st.round_batches,
                        pages: st.round_pages,
                    });
                    match r {
                        Ok(()) => {
                            shared
                                .counters
                                .wire_bytes
                                .fetch_add(out.bytes() - before, Ordering::Relaxed);
                        }
                        Err(e) => {
                            st.broken = true;
                            shared.fail(WorkerFailure::of_stream(index, e));
                        }
                    }
                }
                st.round_batches = 0;
                st.round_pages = 0;
                shared.gate.arrive();
            }
            Ctl::Finish => {
                if !st.broken {
                    if let Err(e) = out
                        .send(FrameKind::StreamEnd, 0, &[], &[])
                        .and_then(|_| out.flush())
                    {
                        shared.fail(WorkerFailure::of_stream(index, e));
                    }
                }
                return;
            }
        }
    }
}

struct WorkerState {
    round_batches: u32,
    round_pages: u64,
    broken: bool,
}

fn handle_batch(
    shared: &Shared,
    index: usize,
    b: &Batch,
    s: &mut Scratch,
    out: &mut FrameWriter,
    st: &mut WorkerState,
) {
    if st.broken || shared.failed.load(Ordering::Relaxed) {
        return; // drain, keep passing the gate
    }
    let before = out.bytes();
    let codec = shared.tuner.codec();
    let t = std::time::Instant::now();
    let sent = if codec == CodecId::Raw && shared.delta.is_none() {
        send_batch_zero_copy(shared, b, s, out)
    } else {
        send_batch(shared, b, codec, s, out)
    };
    match sent {
        Ok(write_time) => {
            st.round_batches += 1;
            st.round_pages += b.pages();
            let wire = out.bytes() - before;
            shared
                .counters
                .wire_bytes
                .fetch_add(wire, Ordering::Relaxed);
            shared.tuner.record(
                wire,
                b.pages() * PAGE_SIZE as u64,
                write_time.min(t.elapsed()),
            );
            if let Some(probe) = shared.tuner.probe_codec() {
                // Sample the first non-zero pages of this batch (zero pages cost
                // nothing in any mode), doing what the compress path does per page:
                // copy out of guest memory, hash, then compress.
                let t_copy = super::auto::thread_cpu_secs();
                let max = super::auto::PROBE_BYTES / PAGE_SIZE;
                let mut n = 0usize;
                let mut i = 0usize;
                'pick: for &(start, count) in &b.extents {
                    for p in 0..count as u64 {
                        if !s.meta.is_zero(i) {
                            let dst = &mut s.pages[n * PAGE_SIZE..(n + 1) * PAGE_SIZE];
                            if shared.memory.read_pages(start + p, dst).is_ok() {
                                std::hint::black_box(page_hash(dst));
                                n += 1;
                                if n == max {
                                    break 'pick;
                                }
                            }
                        }
                        i += 1;
                    }
                }
                let copy_secs = (super::auto::thread_cpu_secs() - t_copy).max(0.0);
                shared.tuner.probe(
                    &mut s.codecs,
                    probe,
                    &s.pages[..n * PAGE_SIZE],
                    &mut s.encoded,
                    copy_secs,
                );
            }
        }
        Err(BatchError::Stream(e)) => {
            st.broken = true;
            shared.fail(WorkerFailure::of_stream(index, e));
        }
        Err(BatchError::Encode(e)) => {
            st.broken = true;
            shared.fail(WorkerFailure::Failed {
                stream: index,
                source: Arc::new(e),
            });
        }
    }
}

/// Copy path: returns the time spent writing the frame.
fn send_batch(
    shared: &Shared,
    b: &Batch,
    codec: CodecId,
    s: &mut Scratch,
    out: &mut FrameWriter,
) -> Result<std::time::Duration, BatchError> {
    let mem = &*shared.memory;
    s.meta.clear();
    s.meta.round = b.round;
    let npages = b.pages() as usize;
    s.meta.zero_map.resize(npages.div_ceil(8), 0);
    s.meta.zero_map.iter_mut().for_each(|z| *z = 0);
    let mut pos = 0usize; // write position of the next non-zero page in s.pages
    let mut i = 0usize; // page number within the batch
    let mut zeros = 0u64;
    let zero_hash = zero_page_hash();
    s.indexes.clear();
    for &(start, count) in &b.extents {
        let gfn = mem.gfn_of(start)?;
        s.meta.extents.push(Extent { gfn, count });
        // Copy each populated page to the next payload slot; a zero page's slot is
        // reused by the next page. Unpopulated pages are zero without being read.
        let (r, rp) = mem.locate(start)?;
        mem.regions()[r].populated(rp, count as u64, &mut s.present)?;
        let mut wr = pos;
        for p in 0..count as usize {
            let is_zero = !s.present[p] || {
                mem.read_pages(start + p as u64, &mut s.pages[wr..wr + PAGE_SIZE])?;
                is_zero_page(&s.pages[wr..wr + PAGE_SIZE])
            };
            let hash = if is_zero {
                s.meta.zero_map[i / 8] |= 1 << (i % 8);
                zeros += 1;
                if let Some(cache) = &shared.delta {
                    cache.invalidate(start + p as u64);
                }
                zero_hash
            } else {
                let h = page_hash(&s.pages[wr..wr + PAGE_SIZE]);
                s.indexes.push(start + p as u64);
                wr += PAGE_SIZE;
                h
            };
            s.meta.hashes.push(hash);
            shared.sent.record(start + p as u64, hash, &mut s.digest);
            i += 1;
        }
        pos = wr;
    }
    shared.sent.merge(&mut s.digest);
    let mut payload = &s.pages[..pos];
    // Delta: pages found in the cache become delta records (none can be in round 0
    // unless the cache policy caches round 0).
    if let Some(cache) = shared
        .delta
        .as_ref()
        .filter(|_| b.round > 0 || crate::codec::cache::caches_round(b.round))
    {
        let (deltas, saved) = cache.encode_records(b.round, payload, &s.indexes, &mut s.records);
        if deltas > 0 {
            payload = &s.records;
            s.meta.flags |= crate::wire::batch::FLAG_DELTA;
            let c = &shared.counters;
            c.delta_pages.fetch_add(deltas, Ordering::Relaxed);
            c.delta_bytes_saved.fetch_add(saved, Ordering::Relaxed);
        }
    }
    s.meta.payload_len = payload.len() as u32;
    let mut codec = codec;
    if codec != CodecId::Raw && !payload.is_empty() {
        let smaller = s.codecs.get(codec).encode(payload, &mut s.encoded)?;
        if !smaller {
            codec = CodecId::Raw;
        }
    } else {
        codec = CodecId::Raw;
    }
    s.meta.codec = Some(codec);
    s.meta.encode_into(&mut s.meta_bytes);
    let data: &[u8] = if codec == CodecId::Raw {
        payload
    } else {
        &s.encoded
    };
    write_batch(shared, out, &s.meta_bytes, &[data], npages, zeros, false)
}

/// Raw batches without a user-space copy: zero detection and hashing read guest
/// memory in place and the frame is written with `writev` straight from it.
/// Unpopulated anonymous pages are sent as zero pages without being touched.
///
/// While the VM runs, a page may change between hashing and the kernel's copy, so
/// such batches carry `FLAG_RACY`: the receiver stores the hash of what arrived and
/// the page, being dirty, is sent again. Quiescent batches (final round, stopped VM)
/// carry exact hashes.
fn send_batch_zero_copy(
    shared: &Shared,
    b: &Batch,
    s: &mut Scratch,
    out: &mut FrameWriter,
) -> Result<std::time::Duration, BatchError> {
    let mem = &*shared.memory;
    s.meta.clear();
    s.meta.round = b.round;
    s.meta.codec = Some(CodecId::Raw);
    s.meta.flags = if b.quiescent {
        0
    } else {
        crate::wire::batch::FLAG_RACY
    };
    let npages = b.pages() as usize;
    s.meta.zero_map.resize(npages.div_ceil(8), 0);
    s.meta.zero_map.iter_mut().for_each(|z| *z = 0);
    let zero_hash = zero_page_hash();
    let mut data: Vec<&[u8]> = Vec::with_capacity(b.extents.len() + 4);
    let mut i = 0usize;
    let mut zeros = 0u64;
    let mut nonzero = 0usize;
    for &(start, count) in &b.extents {
        let gfn = mem.gfn_of(start)?;
        s.meta.extents.push(Extent { gfn, count });
        let (r, rp) = mem.locate(start)?;
        let region = &mem.regions()[r];
        region.populated(rp, count as u64, &mut s.present)?;
        // SAFETY: a racy view of guest memory; everything derived from it is marked
        // racy unless the batch is quiescent (VM paused/stopped), see above.
        let view = unsafe { region.racy_slice(rp, count as u64) }?;
        let mut run: Option<usize> = None;
        for p in 0..count as usize {
            let page = &view[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
            let hash = if !s.present[p] || is_zero_page(page) {
                if let Some(st) = run.take() {
                    data.push(&view[st..p * PAGE_SIZE]);
                }
                s.meta.zero_map[i / 8] |= 1 << (i % 8);
                zeros += 1;
                zero_hash
            } else {
                run.get_or_insert(p * PAGE_SIZE);
                nonzero += 1;
                page_hash(page)
            };
            s.meta.hashes.push(hash);
            shared.sent.record(start + p as u64, hash, &mut s.digest);
            if let Some(cache) = &shared.delta {
                cache.invalidate(start + p as u64); // bytes sent were not cached
            }
            i += 1;
        }
        if let Some(st) = run.take() {
            data.push(&view[st..]);
        }
    }
    shared.sent.merge(&mut s.digest);
    s.meta.payload_len = (nonzero * PAGE_SIZE) as u32;
    s.meta.encode_into(&mut s.meta_bytes);
    write_batch(shared, out, &s.meta_bytes, &data, npages, zeros, true)
}

/// Write one batch frame and count its pages; returns the time spent writing
/// (back-pressure from the link, which `auto` mode measures). `guest_memory`: the
/// `data` slices are guest memory itself (the zero-copy path), which may be spliced;
/// otherwise they are reused buffers, which must be copied.
fn write_batch(
    shared: &Shared,
    out: &mut FrameWriter,
    meta: &[u8],
    data: &[&[u8]],
    npages: usize,
    zeros: u64,
    guest_memory: bool,
) -> Result<std::time::Duration, BatchError> {
    let t_write = std::time::Instant::now();
    if guest_memory {
        // SAFETY: `data` is guest memory, read by the kernel possibly after this
        // returns. A page written after the harvest that scheduled it is dirty and
        // sent again (the batch is FLAG_RACY while the VM runs, so the receiver keeps
        // the hash of what arrived); quiescent batches are sent with the VM stopped,
        // and it stays stopped until the destination has received and verified them.
        // Guest memory stays mapped for the whole migration (`Shared` holds it).
        unsafe { out.send_guest_pages(FrameKind::Batch, 0, meta, data) }
    } else {
        out.send(FrameKind::Batch, 0, meta, data)
    }
    .map_err(BatchError::Stream)?;
    let write_time = t_write.elapsed();
    let c = &shared.counters;
    c.pages.fetch_add(npages as u64, Ordering::Relaxed);
    c.zero_pages.fetch_add(zeros, Ordering::Relaxed);
    Ok(write_time)
}

/// Split a dirty set into batches (extents never cross a region boundary).
pub fn batches_of(
    mem: &GuestMemory,
    pages: impl Iterator<Item = u64>,
    round: u32,
    quiescent: bool,
    max_pages: usize,
    mut emit: impl FnMut(Batch) -> bool,
) -> bool {
    let mut cur = Batch {
        round,
        quiescent,
        extents: Vec::new(),
    };
    let mut in_batch = 0usize;
    let region_starts: Vec<u64> = (0..mem.regions().len())
        .map(|i| mem.region_first_page(i))
        .collect();
    for p in pages {
        let extend = match cur.extents.last() {
            Some(&(s, c)) => s + c as u64 == p && region_starts.binary_search(&p).is_err(),
            None => false,
        };
        if extend {
            cur.extents.last_mut().expect("non-empty").1 += 1;
        } else {
            cur.extents.push((p, 1));
        }
        in_batch += 1;
        if in_batch == max_pages {
            let full = std::mem::replace(
                &mut cur,
                Batch {
                    round,
                    quiescent,
                    extents: Vec::new(),
                },
            );
            if !emit(full) {
                return false;
            }
            in_batch = 0;
        }
    }
    if in_batch > 0 {
        return emit(cur);
    }
    true
}

//! The send pipeline: one worker thread per page stream.
//!
//! The round loop pushes [`Batch`]es into one bounded queue shared by all workers
//! (back-pressure: the loop never runs more than `QUEUE_DEPTH` batches ahead). A
//! worker copies the batch's pages out of guest memory, elides zero pages, hashes
//! every page (xxh3-64; the hash is both the end-to-end check the receiver verifies
//! and, recorded in the sent [`PageLedger`], an entry of the brownout digest),
//! encodes the non-zero pages with the chosen codec and writes one frame.
//!
//! Rounds are gated: at the end of a round the loop sends [`WorkerCommand::RoundEnd`] on every
//! worker's own control channel and waits at a [`SendGate`] that every worker
//! passes after draining the batch queue and writing its RoundEnd frame, so no page
//! of round r+1 is sent before every stream finished round r. (Per-worker control
//! channels let `auto` mode leave workers idle without stalling the gate.) The
//! receiver mirrors the gate, so a later copy of a page can never be overwritten by
//! an earlier one. The gate never blocks a worker, and a worker that fails or
//! panics aborts it ([`run_worker`]), so the loop never waits for a dead party.
//!
//! What a worker does with one batch (read, zero check, hash, encode, write) is the
//! batch encoder's job ([`super::encode`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;

use super::encode::{
    from_file, send_batch, send_batch_from_file, send_batch_zero_copy, zero_copy, Scratch,
};
use super::gate::SendGate;
use crate::codec::cache::DeltaCache;
use crate::codec::CodecId;
use crate::memory::{page_hash, GuestMemory, PAGE_SIZE};
use crate::proof::PageLedger;
use crate::transport::framed::FrameWriter;
use crate::wire::frame::RoundEnd;
use crate::wire::FrameKind;

/// Queue depth between the round loop and the workers, in batches (page ranges,
/// not data: a queued batch costs a few dozen bytes). Sixteen per worker keeps the
/// workers fed while the round loop's thread waits for a core on a busy host;
/// two per worker left both cores 15 % idle in round 0 of a prepared send/recv,
/// and measured 7-9 % slower (docs/BENCHMARKS.md). The streams share the queue,
/// so one stream may carry most of a round when the other's worker is slow to
/// wake: that is the point (no stream waits for another), and nothing relies on
/// a stream's share.
pub const QUEUE_DEPTH_PER_WORKER: usize = 16;
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
pub enum WorkerCommand {
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
pub struct SendState {
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
    /// How raw pages of guest memory that is all image files are read (`None` for
    /// other memory).
    pub image_read: Option<super::encode::ImageRead>,
}

impl SendState {
    /// SendState state for `workers` workers.
    pub fn new(
        memory: Arc<GuestMemory>,
        workers: usize,
        codec: CodecId,
        zstd_level: i32,
        auto: bool,
    ) -> Self {
        let pages = memory.total_pages() as usize;
        let mut image_read = super::encode::ImageRead::of(&memory);
        if !auto && codec != CodecId::Raw {
            image_read = image_read.map(|_| super::encode::ImageRead::Mapping); // no raw batches
        }
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
            image_read,
        }
    }

    /// The destination runs on this host (its page streams' peer is a loopback
    /// address): `auto` stops adding raw streams at half the CPUs once writes block,
    /// since each stream's receiving thread shares them
    /// (`codec_policy::local_stream_cap`).
    pub fn with_peer_on_this_host(mut self, on_this_host: bool) -> Self {
        if on_this_host {
            let cpus = crate::stats::host_load::cpus() as usize;
            self.tuner.peer_on_this_host(cpus);
        }
        self
    }

    /// Record how many page streams splice raw guest pages (for the report).
    pub fn with_spliced_streams(mut self, n: u16) -> Self {
        self.spliced_streams = n;
        if n > 0 {
            self.image_read_through_mapping(); // spliced from the mapping
        }
        self
    }

    /// Raw batches will not take the file path: say so in the report.
    fn image_read_through_mapping(&mut self) {
        self.image_read = self.image_read.map(|_| super::encode::ImageRead::Mapping);
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
        if enabled {
            self.image_read_through_mapping(); // the delta encoder reads the mapping
        }
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
    shared: &SendState,
    index: usize,
    batches: Receiver<Batch>,
    ctl: Receiver<WorkerCommand>,
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

/// Run one worker until `Finish` (or until its control channel closes).
pub fn worker(
    shared: &SendState,
    index: usize,
    batches: Receiver<Batch>,
    ctl: Receiver<WorkerCommand>,
    mut out: FrameWriter,
) {
    let mut s = Scratch::new(shared.zstd_level);
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
            WorkerCommand::RoundEnd(round) => {
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
            WorkerCommand::Finish => {
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
    shared: &SendState,
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
    let sent = if from_file(shared, codec, out) {
        send_batch_from_file(shared, b, s, out)
    } else if zero_copy(shared, codec, out) {
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

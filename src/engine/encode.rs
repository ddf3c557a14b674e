//! The batch encoder of a page stream: one 256-page batch read out of guest memory,
//! zero-checked, hashed, recorded in the sent ledger, encoded and written as one
//! frame. The three send paths share one loop ([`walk_batch`]) and differ only in
//! how each page is read ([`PageSink`]), reading it out of memory once for its zero
//! check and its hash:
//! - the copy path ([`send_batch`]) copies the pages into the batch's payload buffer
//!   (the copy tells whether the page is zero) and hashes the copy; the delta
//!   encoder and the block codecs then read the payload;
//! - the zero-copy path ([`send_batch_zero_copy`]) copies nothing: it hashes each
//!   page where it lies (`memory::page_pass`), and writes the runs of non-zero pages
//!   with `writev` straight from guest memory;
//! - the file path ([`send_batch_from_file`]), for raw batches of memory that is an
//!   image file on tmpfs in 4 KiB pages: the pages are read out of the file with
//!   `pread` into the batch's buffer, which costs less than faulting the image's
//!   mapping in, then hashed and written from there (see [`from_file`]).
//!
//! Guest memory is read only through [`RacyPages`]: no `&[u8]` is formed over memory
//! the guest may write, except the ranges handed to the kernel for `writev`.

use std::sync::atomic::Ordering;

use super::pipeline::{Batch, BatchError, SendState};
use crate::codec::{CodecId, CodecSet};
use crate::memory::page_pass::PageSummary;
use crate::memory::{
    page_hash, zero_page_hash, GuestRegion, GuestRun, MemoryError, RacyPages, PAGE_SIZE,
};
use crate::proof::DigestDelta;
use crate::transport::framed::FrameWriter;
use crate::wire::batch::BatchMeta;
use crate::wire::{Extent, FrameKind};

/// Reusable buffers of one worker.
pub(super) struct Scratch {
    pub(super) pages: Vec<u8>,
    pub(super) encoded: Vec<u8>,
    pub(super) meta: BatchMeta,
    meta_bytes: Vec<u8>,
    pub(super) codecs: CodecSet,
    present: Vec<bool>,
    indexes: Vec<u64>,
    records: Vec<u8>,
    /// This worker's digest updates, merged into the ledger after each batch.
    digest: DigestDelta,
}

impl Scratch {
    pub(super) fn new(zstd_level: i32) -> Self {
        Self {
            pages: vec![0u8; crate::wire::MAX_BATCH_PAGES * PAGE_SIZE],
            encoded: Vec::with_capacity(crate::wire::MAX_BATCH_DATA),
            meta: BatchMeta::default(),
            meta_bytes: Vec::with_capacity(crate::wire::MAX_BATCH_META),
            codecs: CodecSet::new(zstd_level),
            present: Vec::with_capacity(crate::wire::MAX_BATCH_PAGES),
            indexes: Vec::with_capacity(crate::wire::MAX_BATCH_PAGES),
            records: Vec::with_capacity(crate::wire::MAX_BATCH_DATA),
            digest: DigestDelta::default(),
        }
    }
}

/// One page stream's batch encoder driven by hand, for the micro-benchmark of the
/// batch walk (`benches/batch.rs`): what a worker does with one batch (read, zero
/// check, hash, digest record, encode, write), without the queue and the gate.
#[cfg(feature = "bench")]
pub struct BatchBench {
    shared: SendState,
    scratch: Scratch,
    out: FrameWriter,
}

#[cfg(feature = "bench")]
impl std::fmt::Debug for BatchBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBench")
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "bench")]
impl BatchBench {
    /// An encoder of `memory`'s pages with `codec` writing frames to `out` (raw
    /// batches on a socket stream take the zero-copy path, see [`zero_copy`]).
    pub fn new(
        memory: std::sync::Arc<crate::memory::GuestMemory>,
        codec: CodecId,
        out: Box<dyn crate::transport::Stream>,
    ) -> Self {
        let shared = SendState::new(memory, 1, codec, 1, false);
        let scratch = Scratch::new(shared.zstd_level);
        Self {
            shared,
            scratch,
            out: FrameWriter::new(out, "page"),
        }
    }

    /// Send `count` pages from page index `first` (one region, at most
    /// `MAX_BATCH_PAGES`) as one batch; returns the frame's wire bytes.
    pub fn send(
        &mut self,
        first: u64,
        count: u32,
        quiescent: bool,
    ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        let b = Batch {
            round: 0,
            quiescent,
            extents: vec![(first, count)],
        };
        let before = self.out.bytes();
        let codec = self.shared.tuner.codec();
        let r = if from_file(&self.shared, codec, &self.out) {
            send_batch_from_file(&self.shared, &b, &mut self.scratch, &mut self.out)
        } else if zero_copy(&self.shared, codec, &self.out) {
            send_batch_zero_copy(&self.shared, &b, &mut self.scratch, &mut self.out)
        } else {
            send_batch(&self.shared, &b, codec, &mut self.scratch, &mut self.out)
        };
        match r {
            Ok(_) => Ok(self.out.bytes() - before),
            Err(BatchError::Stream(e)) => Err(Box::new(e)),
            Err(BatchError::Encode(e)) => Err(Box::new(e)),
        }
    }
}

/// Where the batch walk ([`walk_batch`]) copies each page it reads, and what it
/// keeps of the non-zero ones: the one thing the two send paths do differently.
trait PageSink<'m> {
    /// Whether the kept pages go through the delta encoder, which keeps the delta
    /// cache right for them; otherwise every page sent invalidates its cached version.
    const DELTA_ENCODED: bool;
    /// The `count` pages at region-relative `page` of `region` (the extent `view`
    /// covers) come next.
    fn begin_extent(
        &mut self,
        _region: &'m GuestRegion,
        _page: u64,
        _count: u64,
    ) -> Result<(), MemoryError> {
        Ok(())
    }
    /// Read page `p` of `view` out of guest memory once: its hash and whether it is
    /// zero (and, on the copy path, the copy into the next payload slot).
    fn read(&mut self, view: &RacyPages<'m>, p: usize) -> Result<PageSummary, MemoryError>;
    /// The page just copied is not zero: keep page `p` of `view` (page index `index`).
    fn keep(&mut self, view: &RacyPages<'m>, p: usize, index: u64);
    /// Page `p` of `view` is zero: it travels in the zero map only.
    fn skip(&mut self, view: &RacyPages<'m>, p: usize) -> Result<(), MemoryError>;
    /// The extent of `view` is done.
    fn end_extent(&mut self, view: &RacyPages<'m>) -> Result<(), MemoryError>;
}

/// Copy path: the payload is the non-zero pages packed in order in `pages`, and
/// `indexes` their page indexes (for the delta encoder). A zero page's slot is reused
/// by the next page.
struct PayloadSink<'s> {
    pages: &'s mut [u8],
    indexes: &'s mut Vec<u64>,
    len: usize,
}

impl<'m> PageSink<'m> for PayloadSink<'_> {
    const DELTA_ENCODED: bool = true;

    #[inline]
    fn read(&mut self, view: &RacyPages<'m>, p: usize) -> Result<PageSummary, MemoryError> {
        let slot: &mut [u8; PAGE_SIZE] = (&mut self.pages[self.len..self.len + PAGE_SIZE])
            .try_into()
            .expect("one page");
        // The copy tells whether it is zero; the hash reads the copy, in L1.
        let nonzero = view.copy_page(p, slot)?;
        Ok(PageSummary {
            hash: page_hash(slot),
            nonzero,
        })
    }

    #[inline]
    fn keep(&mut self, _: &RacyPages<'m>, _: usize, index: u64) {
        self.indexes.push(index);
        self.len += PAGE_SIZE;
    }

    #[inline]
    fn skip(&mut self, _: &RacyPages<'m>, _: usize) -> Result<(), MemoryError> {
        Ok(())
    }

    fn end_extent(&mut self, _: &RacyPages<'m>) -> Result<(), MemoryError> {
        Ok(())
    }
}

/// Zero-copy path: each page is read once where it lies, for the zero check and the
/// hash only; the payload is the runs of non-zero pages in guest memory itself,
/// which the kernel reads (`writev`).
struct GatherSink<'m> {
    runs: Vec<GuestRun<'m>>,
    /// First page (of the current extent's view) of the open run of non-zero pages.
    open: Option<usize>,
}

impl<'m> GatherSink<'m> {
    /// Close the open run, if any, before page `end` of `view`.
    fn close(&mut self, view: &RacyPages<'m>, end: usize) -> Result<(), MemoryError> {
        if let Some(first) = self.open.take() {
            self.runs.push(view.run(first, end - first)?);
        }
        Ok(())
    }
}

impl<'m> PageSink<'m> for GatherSink<'m> {
    const DELTA_ENCODED: bool = false;

    #[inline]
    fn read(&mut self, view: &RacyPages<'m>, p: usize) -> Result<PageSummary, MemoryError> {
        view.hash_page(p)
    }

    #[inline]
    fn keep(&mut self, _: &RacyPages<'m>, p: usize, _: u64) {
        self.open.get_or_insert(p);
    }

    #[inline]
    fn skip(&mut self, view: &RacyPages<'m>, p: usize) -> Result<(), MemoryError> {
        self.close(view, p)
    }

    fn end_extent(&mut self, view: &RacyPages<'m>) -> Result<(), MemoryError> {
        self.close(view, view.pages())
    }
}

/// Read path: the pages of an image-file region are copied out of the file with
/// `pread` ([`GuestRegion::read_from_file`]: no page faults on the image's mapping)
/// into `buf`, 64 pages at a time as the walk reaches them, so that each page is
/// zero-checked and hashed from cache; the runs of non-zero pages are then written
/// from `buf`. (Reading each extent whole, up to 1 MiB, before walking it was no
/// faster: `send` of a 2 GiB image into fresh memory, 6 interleaved runs, 6.18
/// against 6.25 GiB/s, medians.)
struct FileReadSink<'m, 's> {
    buf: &'s mut [u8],
    /// The current extent: its region, its first page there, where it starts in
    /// `buf` and how many of its bytes have been read into `buf`.
    extent: Option<(&'m GuestRegion, u64)>,
    base: usize,
    filled: usize,
    /// End of the extents begun so far in `buf` (bytes).
    len: usize,
    /// Byte ranges of `buf` to send, in page order.
    runs: Vec<std::ops::Range<usize>>,
    /// Start (in `buf`) of the open run of non-zero pages.
    open: Option<usize>,
}

impl<'m, 's> FileReadSink<'m, 's> {
    /// Bytes read from the file at a time.
    const CHUNK: usize = 64 * PAGE_SIZE;

    fn new(buf: &'s mut [u8], extents: usize) -> Self {
        Self {
            buf,
            extent: None,
            base: 0,
            filled: 0,
            len: 0,
            runs: Vec::with_capacity(extents + 4),
            open: None,
        }
    }

    fn close(&mut self, end: usize) {
        if let Some(first) = self.open.take() {
            self.runs.push(first..end);
        }
    }
}

impl<'m> PageSink<'m> for FileReadSink<'m, '_> {
    const DELTA_ENCODED: bool = false;

    fn begin_extent(
        &mut self,
        region: &'m GuestRegion,
        page: u64,
        count: u64,
    ) -> Result<(), MemoryError> {
        let end = self.len + count as usize * PAGE_SIZE;
        if end > self.buf.len() {
            return Err(MemoryError::OutOfRange {
                page: (end / PAGE_SIZE) as u64,
                pages: (self.buf.len() / PAGE_SIZE) as u64,
            });
        }
        self.extent = Some((region, page));
        self.base = self.len;
        self.filled = 0;
        self.len = end;
        Ok(())
    }

    #[inline]
    fn read(&mut self, _: &RacyPages<'m>, p: usize) -> Result<PageSummary, MemoryError> {
        let at = p * PAGE_SIZE;
        // Pages come in order; `while` keeps this right should the walk skip some.
        while at >= self.filled {
            let extent_bytes = self.len - self.base;
            let (Some((region, first)), true) = (self.extent, self.filled < extent_bytes) else {
                return Err(MemoryError::OutOfRange {
                    page: p as u64,
                    pages: (extent_bytes / PAGE_SIZE) as u64,
                });
            };
            let end = (self.filled + Self::CHUNK).min(extent_bytes);
            region.read_from_file(
                first + (self.filled / PAGE_SIZE) as u64,
                &mut self.buf[self.base + self.filled..self.base + end],
            )?;
            self.filled = end;
        }
        let page: &[u8; PAGE_SIZE] = (&self.buf[self.base + at..self.base + at + PAGE_SIZE])
            .try_into()
            .expect("one page");
        let nonzero = !crate::codec::zero::is_zero_page(page);
        Ok(PageSummary {
            hash: if nonzero {
                page_hash(page)
            } else {
                zero_page_hash()
            },
            nonzero,
        })
    }

    #[inline]
    fn keep(&mut self, _: &RacyPages<'m>, p: usize, _: u64) {
        self.open.get_or_insert(self.base + p * PAGE_SIZE);
    }

    #[inline]
    fn skip(&mut self, _: &RacyPages<'m>, p: usize) -> Result<(), MemoryError> {
        self.close(self.base + p * PAGE_SIZE);
        Ok(())
    }

    fn end_extent(&mut self, _: &RacyPages<'m>) -> Result<(), MemoryError> {
        self.close(self.len);
        Ok(())
    }
}

/// The batch-encoding loop of the send paths. For each page of `b`, in order: its
/// extent goes into `meta`; a page the kernel reports never populated (or mapped to
/// the shared zero page) is zero without being read; any other page is read out of
/// guest memory once by `sink.read`, which hashes it and tells whether it is zero
/// (copying it into the payload on the copy path). Zero pages are marked in the
/// zero map and handed to `sink.skip`, the others to `sink.keep`. Every page's hash
/// goes into `meta` and is recorded in the sent ledger (merged from `digest` at the
/// end).
/// Returns the number of zero pages.
fn walk_batch<'m, S: PageSink<'m>>(
    shared: &'m SendState,
    b: &Batch,
    meta: &mut BatchMeta,
    present: &mut Vec<bool>,
    digest: &mut DigestDelta,
    sink: &mut S,
) -> Result<u64, MemoryError> {
    let mem = &*shared.memory;
    let npages = b.pages() as usize;
    meta.zero_map.resize(npages.div_ceil(8), 0);
    meta.zero_map.iter_mut().for_each(|z| *z = 0);
    let zero_hash = zero_page_hash();
    let mut i = 0usize; // page number within the batch
    let mut zeros = 0u64;
    for &(start, count) in &b.extents {
        let gfn = mem.gfn_of(start)?;
        meta.extents.push(Extent { gfn, count });
        let (r, rp) = mem.locate(start)?;
        let region = &mem.regions()[r];
        region.populated(rp, count as u64, present)?;
        let view = region.racy_pages(rp, count as u64)?;
        sink.begin_extent(region, rp, count as u64)?;
        for (p, &populated) in present.iter().enumerate() {
            let index = start + p as u64;
            // A page never populated is zero without being read.
            let read = if populated {
                sink.read(&view, p)?
            } else {
                PageSummary {
                    hash: zero_hash,
                    nonzero: false,
                }
            };
            let nonzero = read.nonzero;
            let hash = if nonzero {
                sink.keep(&view, p, index);
                read.hash
            } else {
                meta.zero_map[i / 8] |= 1 << (i % 8);
                zeros += 1;
                sink.skip(&view, p)?;
                zero_hash
            };
            if !nonzero || !S::DELTA_ENCODED {
                if let Some(cache) = &shared.delta {
                    cache.invalidate(index); // a zero page, or bytes that were not cached
                }
            }
            meta.hashes.push(hash);
            shared.sent.record(index, hash, digest);
            i += 1;
        }
        sink.end_extent(&view)?;
    }
    shared.sent.merge(digest);
    Ok(zeros)
}

/// Copy path: returns the time spent writing the frame.
pub(super) fn send_batch(
    shared: &SendState,
    b: &Batch,
    codec: CodecId,
    s: &mut Scratch,
    out: &mut FrameWriter,
) -> Result<std::time::Duration, BatchError> {
    s.meta.clear();
    s.meta.round = b.round;
    let npages = b.pages() as usize;
    s.indexes.clear();
    let mut sink = PayloadSink {
        pages: &mut s.pages,
        indexes: &mut s.indexes,
        len: 0,
    };
    let zeros = walk_batch(
        shared,
        b,
        &mut s.meta,
        &mut s.present,
        &mut s.digest,
        &mut sink,
    )?;
    let pos = sink.len;
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
        let smaller = s
            .codecs
            .get(codec)
            .encode(payload, &mut s.encoded)
            .map_err(|e| BatchError::Encode(super::StreamFailure::Codec(e)))?;
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
    let t_write = std::time::Instant::now();
    out.send(FrameKind::Batch, 0, &s.meta_bytes, &[data])
        .map_err(BatchError::Stream)?;
    Ok(count_batch(shared, t_write, npages, zeros))
}

/// Whether raw batches are read out of image files by copy ([`send_batch_from_file`]):
/// no delta encoding (which keeps its own copies of the pages it reads), a stream
/// not asked to splice guest pages (`--splice` splices them from the mapping), and
/// guest memory that is all image files on tmpfs in 4 KiB pages
/// ([`GuestRegion::image_in_small_pages`]).
///
/// Why only those files: reading a 2 GiB image on this project's machine, one
/// thread (`pread`s of 256 KiB into one buffer against reads through the mapping,
/// 3–5 runs each), a tmpfs file in 4 KiB pages took 162–197 ms by copy against
/// 207–222 ms through the mapping in three of four files written as the
/// benchmark writes them; 232 against 216 ms in the fourth. On ext4 (large folios)
/// the mapping won, 154–156 against 167–169 ms, and on a tmpfs mounted
/// `huge=always` by more, 62–64 against 83 ms.
pub(super) fn from_file(shared: &SendState, codec: CodecId, out: &FrameWriter) -> bool {
    codec == CodecId::Raw
        && shared.delta.is_none()
        && !out.splices()
        && shared.image_read == Some(ImageRead::Copy)
}

/// How raw pages of guest memory that is all image files are read (`image_read`
/// in the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRead {
    /// Copied out of the files with `pread` (tmpfs in 4 KiB pages).
    Copy,
    /// Read through the mapping, like any guest memory.
    Mapping,
}

impl ImageRead {
    /// How `memory`'s raw pages are read if it is all image files (else `None`).
    pub fn of(memory: &crate::memory::GuestMemory) -> Option<Self> {
        let regions = memory.regions();
        if !regions.iter().all(|r| r.reads_from_file()) {
            return None;
        }
        Some(if regions.iter().all(|r| r.image_in_small_pages()) {
            Self::Copy
        } else {
            Self::Mapping
        })
    }
}

/// Raw batches of an image file: each extent is read out of the file with `pread`
/// into the worker's page buffer, hashed there and written from it (see
/// [`FileReadSink`]). The hashes describe exactly the bytes sent, so no batch is
/// `FLAG_RACY`, and any stream can carry it.
pub(super) fn send_batch_from_file(
    shared: &SendState,
    b: &Batch,
    s: &mut Scratch,
    out: &mut FrameWriter,
) -> Result<std::time::Duration, BatchError> {
    // The page buffer is lent to the sink while the walk fills the rest of `s`.
    let mut pages = std::mem::take(&mut s.pages);
    let mut sink = FileReadSink::new(&mut pages, b.extents.len());
    let walked = walk_raw_batch(shared, b, 0, s, &mut sink);
    let runs = std::mem::take(&mut sink.runs);
    let sent = walked
        .map_err(BatchError::from)
        .and_then(|(npages, zeros)| {
            let data: Vec<&[u8]> = runs.iter().map(|r| &pages[r.clone()]).collect();
            let t_write = std::time::Instant::now();
            out.send(FrameKind::Batch, 0, &s.meta_bytes, &data)
                .map_err(BatchError::Stream)?;
            Ok(count_batch(shared, t_write, npages, zeros))
        });
    s.pages = pages;
    sent
}

/// The walk of a raw batch, whose payload is its non-zero pages in order: fills
/// `s.meta` (with `flags`) and encodes it into `s.meta_bytes`; returns the batch's
/// pages and zero pages.
fn walk_raw_batch<'m, S: PageSink<'m>>(
    shared: &'m SendState,
    b: &Batch,
    flags: u8,
    s: &mut Scratch,
    sink: &mut S,
) -> Result<(usize, u64), MemoryError> {
    s.meta.clear();
    s.meta.round = b.round;
    s.meta.codec = Some(CodecId::Raw);
    s.meta.flags = flags;
    let npages = b.pages() as usize;
    let zeros = walk_batch(shared, b, &mut s.meta, &mut s.present, &mut s.digest, sink)?;
    s.meta.payload_len = ((npages - zeros as usize) * PAGE_SIZE) as u32;
    s.meta.encode_into(&mut s.meta_bytes);
    Ok((npages, zeros))
}

/// Whether a raw batch goes out on `out` without a user-space copy: no delta
/// encoding (which needs the bytes), and a stream that hands its writes straight to
/// a kernel socket, so no Rust code reads the guest memory it is given. Streams that
/// see every byte (TLS, shaping, fault injection, in-memory pipes) take the copy path.
pub(super) fn zero_copy(shared: &SendState, codec: CodecId, out: &FrameWriter) -> bool {
    codec == CodecId::Raw && shared.delta.is_none() && out.stream().splice_fd().is_some()
}

/// Raw batches without a user-space copy of the payload: each page is read once
/// where it lies for the zero check and the hash, and the frame is written with
/// `writev` straight from guest memory (see [`zero_copy`] for when).
/// Unpopulated (or zero-page-mapped) anonymous pages are sent as zero pages without
/// being touched.
///
/// While the VM runs, a page may change between hashing and the kernel's copy, so
/// such batches carry `FLAG_RACY`: the receiver stores the hash of what arrived and
/// the page, being dirty, is sent again. Quiescent batches (final round, stopped VM)
/// carry exact hashes.
pub(super) fn send_batch_zero_copy(
    shared: &SendState,
    b: &Batch,
    s: &mut Scratch,
    out: &mut FrameWriter,
) -> Result<std::time::Duration, BatchError> {
    let flags = if b.quiescent {
        0
    } else {
        crate::wire::batch::FLAG_RACY
    };
    let mut sink = GatherSink {
        runs: Vec::with_capacity(b.extents.len() + 4),
        open: None,
    };
    let (npages, zeros) = walk_raw_batch(shared, b, flags, s, &mut sink)?;
    // SAFETY: each slice covers a run of guest pages that stays mapped while
    // `shared.memory` lives (the runs borrow it), and is only handed to the kernel:
    // the stream writes straight to a socket (`zero_copy`), so no Rust code reads
    // through it. The kernel may read the pages after this returns, and the guest may
    // write them meanwhile: a page written after the harvest that scheduled it is
    // dirty and sent again (the batch is FLAG_RACY while the VM runs, so the
    // receiver keeps the hash of what arrived); quiescent batches are sent with the
    // VM stopped, and it stays stopped until the destination has received and
    // verified them.
    let data: Vec<&[u8]> = sink
        .runs
        .iter()
        .map(|r| unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len()) })
        .collect();
    let t_write = std::time::Instant::now();
    // SAFETY: as above, `data` is guest memory under dirty tracking or of a stopped VM.
    unsafe { out.send_guest_pages(FrameKind::Batch, 0, &s.meta_bytes, &data) }
        .map_err(BatchError::Stream)?;
    Ok(count_batch(shared, t_write, npages, zeros))
}

/// Count a batch written since `t_write`; returns the time spent writing
/// (back-pressure from the link, which `auto` mode measures).
fn count_batch(
    shared: &SendState,
    t_write: std::time::Instant,
    npages: usize,
    zeros: u64,
) -> std::time::Duration {
    let write_time = t_write.elapsed();
    let c = &shared.counters;
    c.pages.fetch_add(npages as u64, Ordering::Relaxed);
    c.zero_pages.fetch_add(zeros, Ordering::Relaxed);
    write_time
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::GuestMemory;

    /// 16 pages: 0-2 written, 3 written with zeros, 4-5 written, the rest never
    /// touched; the batch covers 1..10 in two extents.
    fn setup() -> (SendState, Batch) {
        let mem = GuestMemory::anonymous(16 * PAGE_SIZE, false).unwrap();
        for p in [0u64, 1, 2, 4, 5] {
            mem.write_pages(p, &[p as u8 + 1; PAGE_SIZE]).unwrap();
        }
        mem.write_pages(3, &[0; PAGE_SIZE]).unwrap();
        let shared = SendState::new(Arc::new(mem), 1, CodecId::Raw, 1, false);
        let batch = Batch {
            round: 0,
            quiescent: false,
            extents: vec![(1, 5), (8, 2)],
        };
        (shared, batch)
    }

    fn walk<'m, S: PageSink<'m>>(
        shared: &'m SendState,
        b: &Batch,
        sink: &mut S,
    ) -> (BatchMeta, u64) {
        let mut meta = BatchMeta::default();
        let mut present = Vec::new();
        let mut digest = DigestDelta::default();
        let zeros = walk_batch(shared, b, &mut meta, &mut present, &mut digest, sink).unwrap();
        (meta, zeros)
    }

    /// The copy path's walk of `b`: its meta, its zero pages, the payload (the
    /// sent pages packed in order) and their page indexes.
    fn copy_walk(shared: &SendState, b: &Batch) -> (BatchMeta, u64, Vec<u8>, Vec<u64>) {
        let mut pages = vec![0u8; 7 * PAGE_SIZE];
        let mut indexes = Vec::new();
        let mut payload = PayloadSink {
            pages: &mut pages,
            indexes: &mut indexes,
            len: 0,
        };
        let (meta, zeros) = walk(shared, b, &mut payload);
        let len = payload.len;
        pages.truncate(len);
        (meta, zeros, pages, indexes)
    }

    #[test]
    fn both_sinks_walk_a_batch_alike() {
        let (shared, b) = setup();
        let (copied, zeros, pages, indexes) = copy_walk(&shared, &b);
        let mut gather = GatherSink {
            runs: Vec::new(),
            open: None,
        };
        let (gathered, gather_zeros) = walk(&shared, &b, &mut gather);

        // Pages 1, 2, 4, 5 are sent; 3 (zeros), 8 and 9 (never touched) are zero.
        assert_eq!(zeros, 3);
        assert_eq!(gather_zeros, 3);
        assert_eq!(copied.zero_map, vec![0b0110_0100]);
        assert_eq!(gathered.zero_map, copied.zero_map);
        assert_eq!(gathered.hashes, copied.hashes);
        let gfns: Vec<_> = copied.extents.iter().map(|e| (e.gfn, e.count)).collect();
        assert_eq!(gfns, vec![(1, 5), (8, 2)]);
        let expect = |p: u64| page_hash(&[p as u8 + 1; PAGE_SIZE]);
        let zero = zero_page_hash();
        let want = [expect(1), expect(2), zero, expect(4), expect(5), zero, zero];
        assert_eq!(copied.hashes, want);
        // Every page is in the sent ledger with its hash.
        for (i, p) in [1u64, 2, 3, 4, 5, 8, 9].into_iter().enumerate() {
            assert_eq!(shared.sent.hash(p), want[i], "page {p}");
        }

        // The copy path packs the sent pages in order...
        assert_eq!(indexes, vec![1, 2, 4, 5]);
        assert_eq!(pages.len(), 4 * PAGE_SIZE);
        for (k, p) in [1u64, 2, 4, 5].into_iter().enumerate() {
            assert!(pages[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]
                .iter()
                .all(|&x| x == p as u8 + 1));
        }
        // ...and the zero-copy path gathers the same pages as runs of guest memory.
        let base = shared.memory.regions()[0].host_addr() as usize;
        let runs: Vec<_> = gather
            .runs
            .iter()
            .map(|r| {
                (
                    (r.as_ptr() as usize - base) / PAGE_SIZE,
                    r.len() / PAGE_SIZE,
                )
            })
            .collect();
        assert_eq!(runs, vec![(1, 2), (4, 2)]);
    }

    /// The 16 pages of `setup` as an image file named after `test` in `dir`,
    /// mapped read-only (the file is unlinked at once; the region keeps it open).
    fn image_in(dir: &std::path::Path, test: &str) -> (SendState, std::fs::File) {
        let path = dir.join(format!("livemig-encode-{test}-{}.img", std::process::id()));
        let mut bytes = vec![0u8; 16 * PAGE_SIZE];
        for p in [0usize, 1, 2, 4, 5] {
            bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(p as u8 + 1);
        }
        std::fs::write(&path, &bytes).unwrap();
        let region = GuestRegion::image_file(0, &path).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mem = GuestMemory::new(vec![region]).unwrap();
        let state = SendState::new(Arc::new(mem), 1, CodecId::Raw, 1, false);
        (state, file)
    }

    fn image_setup(test: &str) -> (SendState, std::fs::File) {
        image_in(&std::env::temp_dir(), test)
    }

    /// The same image on tmpfs in 4 KiB pages (`/dev/shm`), or `None` with the
    /// reason printed (a failure under `LIVEMIG_CI=1`).
    fn image_on_tmpfs(test: &str) -> Option<(SendState, std::fs::File)> {
        let (image, file) = image_in(std::path::Path::new("/dev/shm"), test);
        if image.memory.regions()[0].image_in_small_pages() {
            return Some((image, file));
        }
        let why = "/dev/shm is not a tmpfs in 4 KiB pages";
        assert!(
            !std::env::var("LIVEMIG_CI").is_ok_and(|v| v == "1"),
            "LIVEMIG_CI=1 but {why}"
        );
        eprintln!("skipped: {why}");
        None
    }

    #[test]
    fn only_images_on_tmpfs_in_small_pages_are_read_by_copy() {
        let Some((shm, _f)) = image_on_tmpfs("kind") else {
            return;
        };
        assert_eq!(shm.image_read, Some(ImageRead::Copy));
        // Settings that keep every batch off the file path say so in the report.
        let mem = shm.memory.clone();
        let lz4 = SendState::new(mem.clone(), 1, CodecId::Lz4, 1, false);
        let auto = SendState::new(mem.clone(), 1, CodecId::Lz4, 1, true);
        let delta = SendState::new(mem.clone(), 1, CodecId::Raw, 1, false).with_delta(true, 0);
        let spliced =
            SendState::new(mem.clone(), 1, CodecId::Raw, 1, false).with_spliced_streams(1);
        assert_eq!(lz4.image_read, Some(ImageRead::Mapping), "compress");
        assert_eq!(auto.image_read, Some(ImageRead::Copy), "auto sends raw");
        assert_eq!(delta.image_read, Some(ImageRead::Mapping), "delta");
        assert_eq!(spliced.image_read, Some(ImageRead::Mapping), "splice");
        let (anon, _) = setup();
        assert_eq!(anon.image_read, None, "anonymous memory is no image");
        // An image on another file system (the temporary directory, unless that
        // is a tmpfs too) is read through its mapping.
        let tmp_fs = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(std::env::temp_dir())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let (other, _f) = image_setup("kind");
        if tmp_fs != "tmpfs" && !tmp_fs.is_empty() {
            assert_eq!(other.image_read, Some(ImageRead::Mapping), "{tmp_fs}");
        } else {
            eprintln!("the temporary directory is {tmp_fs:?}: no second file system to compare");
        }
    }

    #[test]
    fn the_file_read_path_walks_a_batch_like_the_copy_path() {
        let (image, _file) = image_setup("walk");
        let (anon, b) = setup();
        let (copied, zeros, pages, _) = copy_walk(&anon, &b);
        let mut buf = vec![0u8; crate::wire::MAX_BATCH_PAGES * PAGE_SIZE];
        let mut read = FileReadSink::new(&mut buf, b.extents.len());
        let (from_file_meta, file_zeros) = walk(&image, &b, &mut read);

        assert_eq!(file_zeros, zeros);
        assert_eq!(from_file_meta.zero_map, copied.zero_map);
        assert_eq!(from_file_meta.hashes, copied.hashes);
        for p in [1u64, 2, 3, 4, 5, 8, 9] {
            assert_eq!(image.sent.hash(p), anon.sent.hash(p), "page {p}");
        }
        // The runs to send are pages 1-2 and 4-5 of the image, in order, as read
        // into the buffer (the batch's extents (1, 5) and (8, 2) sit at 0 and 5).
        let runs = read.runs.clone();
        assert_eq!(
            runs,
            vec![0..2 * PAGE_SIZE, 3 * PAGE_SIZE..5 * PAGE_SIZE],
            "buffer ranges"
        );
        let sent: Vec<u8> = runs.iter().flat_map(|r| buf[r.clone()].to_vec()).collect();
        assert_eq!(sent, pages);
    }

    #[test]
    fn raw_batches_of_an_image_are_read_from_the_file_and_arrive_whole() {
        use crate::transport::{framed::FrameReader, Connector as _};
        let Some((image, _file)) = image_on_tmpfs("frame") else {
            return;
        };
        let (anon, b) = setup();
        let (conn, acc) = crate::transport::mem::pair();
        let mut out = FrameWriter::new(conn.connect().unwrap(), "page");
        let mut inp = FrameReader::new(
            crate::transport::Acceptor::accept(&acc, std::time::Duration::from_secs(5)).unwrap(),
            "page",
        );
        // Only raw batches, without delta encoding, of memory that is all image files.
        assert!(from_file(&image, CodecId::Raw, &out));
        assert!(!from_file(&image, CodecId::Lz4, &out));
        assert!(!from_file(&anon, CodecId::Raw, &out), "anonymous memory");

        let mut s = Scratch::new(1);
        send_batch_from_file(&image, &b, &mut s, &mut out).unwrap();
        let h = inp.header().unwrap();
        assert_eq!(h.kind, FrameKind::Batch);
        let mut meta = BatchMeta::default();
        meta.decode_from(inp.meta(&h).unwrap()).unwrap();
        let mut data = Vec::new();
        inp.data_into(&h, &mut data).unwrap();
        // Exact hashes: the pages sent are the bytes hashed, never racy.
        assert_eq!(meta.flags & crate::wire::batch::FLAG_RACY, 0);
        assert_eq!(meta.payload_len as usize, 4 * PAGE_SIZE);
        let mut want = Vec::new();
        for p in [1u8, 2, 4, 5] {
            want.extend_from_slice(&[p + 1; PAGE_SIZE]);
        }
        assert_eq!(data, want);
        let zero = zero_page_hash();
        let h = |p: u8| page_hash(&[p + 1; PAGE_SIZE]);
        assert_eq!(meta.hashes, [h(1), h(2), zero, h(4), h(5), zero, zero]);
    }

    #[test]
    fn asking_to_splice_keeps_the_image_on_the_zero_copy_path() {
        let Some((image, _file)) = image_on_tmpfs("splice") else {
            return;
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        let mut out = FrameWriter::new(Box::new(tcp), "page");
        assert!(from_file(&image, CodecId::Raw, &out));
        if out.enable_splice() {
            assert!(!from_file(&image, CodecId::Raw, &out));
            assert!(zero_copy(&image, CodecId::Raw, &out));
        }
    }

    #[test]
    fn the_file_sink_reads_the_page_asked_for_and_refuses_pages_past_its_extent() {
        let path =
            std::env::temp_dir().join(format!("livemig-encode-skip-{}.img", std::process::id()));
        let bytes: Vec<u8> = (0..200 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ 0x5a)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let region = GuestRegion::image_file(0, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let view = region.racy_pages(0, 200).unwrap();
        let mut buf = vec![0u8; crate::wire::MAX_BATCH_PAGES * PAGE_SIZE];
        let mut sink = FileReadSink::new(&mut buf, 1);
        sink.begin_extent(&region, 0, 200).unwrap();
        // Page 150 lies two chunks past the start: both are read first.
        let got = sink.read(&view, 150).unwrap();
        assert!(got.nonzero);
        assert_eq!(
            got.hash,
            page_hash(&bytes[150 * PAGE_SIZE..151 * PAGE_SIZE])
        );
        let got = sink.read(&view, 3).unwrap();
        assert_eq!(got.hash, page_hash(&bytes[3 * PAGE_SIZE..4 * PAGE_SIZE]));
        assert!(matches!(
            sink.read(&view, 200),
            Err(MemoryError::OutOfRange {
                page: 200,
                pages: 200
            })
        ));
        // An extent larger than the buffer is refused before anything is read.
        let mut small = vec![0u8; 8 * PAGE_SIZE];
        let mut sink = FileReadSink::new(&mut small, 1);
        assert!(sink.begin_extent(&region, 0, 9).is_err());
    }

    #[test]
    fn an_image_that_shrank_is_an_error_naming_it() {
        let (image, file) = image_setup("shrank");
        file.set_len(4 * PAGE_SIZE as u64).unwrap();
        let b = Batch {
            round: 0,
            quiescent: true,
            extents: vec![(2, 4)],
        };
        let mut buf = vec![0u8; crate::wire::MAX_BATCH_PAGES * PAGE_SIZE];
        let mut read = FileReadSink::new(&mut buf, 1);
        let mut meta = BatchMeta::default();
        let err = walk_batch(
            &image,
            &b,
            &mut meta,
            &mut Vec::new(),
            &mut DigestDelta::default(),
            &mut read,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("reading memory image") && msg.contains("livemig-encode-shrank"),
            "{msg}"
        );
        assert!(matches!(
            err,
            MemoryError::ImageRead { ref source, offset, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof
                    && offset == 2 * PAGE_SIZE as u64
        ));
        assert!(read.runs.is_empty());
    }

    #[test]
    fn a_batch_past_memory_is_an_error() {
        let (shared, _) = setup();
        let b = Batch {
            round: 0,
            quiescent: false,
            extents: vec![(15, 2)],
        };
        let mut gather = GatherSink {
            runs: Vec::new(),
            open: None,
        };
        let mut meta = BatchMeta::default();
        let r = walk_batch(
            &shared,
            &b,
            &mut meta,
            &mut Vec::new(),
            &mut DigestDelta::default(),
            &mut gather,
        );
        assert!(r.is_err());
        assert!(gather.runs.is_empty());
    }
}

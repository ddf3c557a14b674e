//! Guest memory: an ordered, non-overlapping set of regions at guest-physical
//! addresses, with 4 KiB pages.
//!
//! The engine consumes guest memory; it never provides it to a guest. Pages are
//! addressed two ways:
//! - by **gfn** (guest frame number, `gpa >> 12`) on the wire, and
//! - by **page index** (`0..total_pages`, regions concatenated in gpa order) inside the
//!   engine, so that one dirty bitmap and one hash table cover all of memory.

mod bitmap;
pub mod page_pass;
pub(crate) mod pagemap;
mod region;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;
pub mod zeroed;

pub use bitmap::{DirtyBitmap, PageSet, SetBits};
pub use region::{GuestRegion, GuestRun, RacyPages, RegionKind};

use serde::{Deserialize, Serialize};

/// Page size used throughout (bytes).
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// Errors from building or accessing guest memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A region's address or length is not page aligned (or is empty).
    #[error("region at gpa {gpa:#x} with length {len} is not page aligned or is empty")]
    Unaligned {
        /// Guest-physical address.
        gpa: u64,
        /// Length in bytes.
        len: usize,
    },
    /// Two regions overlap.
    #[error("regions overlap at gpa {0:#x}")]
    Overlap(u64),
    /// No regions at all.
    #[error("guest memory needs at least one region")]
    Empty,
    /// A page access outside a region.
    #[error("page {page} is outside a region of {pages} pages")]
    OutOfRange {
        /// The page asked for.
        page: u64,
        /// The region's page count.
        pages: u64,
    },
    /// A gfn that no region covers.
    #[error("guest frame {0:#x} is not backed by any region")]
    NoRegion(u64),
    /// Writing into a read-only image.
    #[error("region is read-only")]
    ReadOnly,
    /// mmap / memfd failure.
    #[error("mapping guest memory failed: {0}")]
    Map(#[source] std::io::Error),
    /// Image file could not be opened.
    #[error("cannot open memory image {path}: {source}")]
    Image {
        /// The image file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading pages out of a memory image failed (the file shrank, or an I/O error).
    #[error("reading memory image {path} at byte {offset}: {source}")]
    ImageRead {
        /// The image file.
        path: std::path::PathBuf,
        /// Byte offset of the read in the file.
        offset: u64,
        /// Why (`UnexpectedEof` if the file is now shorter).
        source: std::io::Error,
    },
    /// A read by copy out of a region that is not an image file.
    #[error("region is not backed by an image file")]
    NotAFile,
    /// memfd name contains NUL.
    #[error("memfd name contains a NUL byte")]
    BadName,
    /// Layout arithmetic does not fit in 64 bits (or in this host's address space).
    #[error("memory layout overflows: {0} does not fit")]
    Overflow(&'static str),
}

/// The memory layout: what both sides must agree on before any page moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// `(gpa, length in bytes)` of each region, sorted by gpa.
    pub regions: Vec<(u64, u64)>,
}

impl MemoryLayout {
    /// Total bytes, or `None` if the sum overflows `u64`.
    pub fn checked_total_bytes(&self) -> Option<u64> {
        self.regions
            .iter()
            .try_fold(0u64, |acc, r| acc.checked_add(r.1))
    }
    /// Total bytes, saturating at `u64::MAX` (a layout that overflows is refused
    /// by [`MemoryLayout::validate`]; this never wraps or panics).
    pub fn total_bytes(&self) -> u64 {
        self.checked_total_bytes().unwrap_or(u64::MAX)
    }
    /// Total pages (saturating like [`MemoryLayout::total_bytes`]).
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE as u64
    }

    /// Check everything a destination relies on before mapping anything: at least
    /// one region; every region non-empty, page aligned, ending below 2^64 and
    /// addressable on this host; regions sorted by gpa and disjoint; the total
    /// fitting in 64 bits. Returns the total bytes. All arithmetic is checked, so
    /// a hostile layout gets an error, never a wrapped size or a panic.
    pub fn validate(&self) -> Result<u64, MemoryError> {
        if self.regions.is_empty() {
            return Err(MemoryError::Empty);
        }
        let mut prev_end: Option<u64> = None;
        let mut total = 0u64;
        for &(gpa, len) in &self.regions {
            let len_usize =
                usize::try_from(len).map_err(|_| MemoryError::Overflow("region length"))?;
            if len == 0 || len % PAGE_SIZE as u64 != 0 || gpa % PAGE_SIZE as u64 != 0 {
                return Err(MemoryError::Unaligned {
                    gpa,
                    len: len_usize,
                });
            }
            let end = gpa
                .checked_add(len)
                .ok_or(MemoryError::Overflow("region end (gpa + length)"))?;
            if prev_end.is_some_and(|p| gpa < p) {
                return Err(MemoryError::Overlap(gpa));
            }
            prev_end = Some(end);
            total = total
                .checked_add(len)
                .ok_or(MemoryError::Overflow("total memory size"))?;
        }
        if usize::try_from(total).is_err() {
            return Err(MemoryError::Overflow("total memory size"));
        }
        Ok(total)
    }
}

/// Guest memory: regions sorted by gpa.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
    /// First page index of each region (prefix sums), plus the total at the end.
    first_page: Vec<u64>,
}

impl GuestMemory {
    /// Build from regions (any order); fails if they overlap.
    pub fn new(mut regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        if regions.is_empty() {
            return Err(MemoryError::Empty);
        }
        regions.sort_by_key(|r| r.gpa());
        for w in regions.windows(2) {
            let end = w[0]
                .gpa()
                .checked_add(w[0].len() as u64)
                .ok_or(MemoryError::Overflow("region end (gpa + length)"))?;
            if end > w[1].gpa() {
                return Err(MemoryError::Overlap(w[1].gpa()));
            }
        }
        let mut first_page = Vec::with_capacity(regions.len() + 1);
        let mut acc = 0u64;
        for r in &regions {
            first_page.push(acc);
            acc = acc
                .checked_add(r.pages())
                .ok_or(MemoryError::Overflow("total page count"))?;
        }
        first_page.push(acc);
        Ok(Self {
            regions,
            first_page,
        })
    }

    /// One anonymous region at gpa 0 (`huge_pages`: ask for THP).
    pub fn anonymous(len: usize, huge_pages: bool) -> Result<Self, MemoryError> {
        Self::new(vec![GuestRegion::anonymous(0, len, huge_pages)?])
    }

    /// Anonymous regions matching a layout (the destination's skeleton VM).
    pub fn from_layout(layout: &MemoryLayout, huge_pages: bool) -> Result<Self, MemoryError> {
        layout.validate()?;
        let regions = layout
            .regions
            .iter()
            .map(|&(gpa, len)| GuestRegion::anonymous(gpa, len as usize, huge_pages))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(regions)
    }

    /// The regions, sorted by gpa.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// This memory's layout.
    pub fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            regions: self
                .regions
                .iter()
                .map(|r| (r.gpa(), r.len() as u64))
                .collect(),
        }
    }

    /// Total number of pages over all regions.
    pub fn total_pages(&self) -> u64 {
        *self.first_page.last().expect("non-empty")
    }

    /// Total bytes over all regions.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages() * PAGE_SIZE as u64
    }

    /// First page index of region `i`.
    pub fn region_first_page(&self, i: usize) -> u64 {
        self.first_page[i]
    }

    /// Map a page index to (region number, page within region).
    #[inline]
    pub fn locate(&self, index: u64) -> Result<(usize, u64), MemoryError> {
        if index >= self.total_pages() {
            return Err(MemoryError::OutOfRange {
                page: index,
                pages: self.total_pages(),
            });
        }
        let i = match self.first_page.binary_search(&index) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        // `Ok(i)` with i == regions.len() is impossible since index < total.
        Ok((i, index - self.first_page[i]))
    }

    /// Guest frame number of a page index.
    #[inline]
    pub fn gfn_of(&self, index: u64) -> Result<u64, MemoryError> {
        let (r, p) = self.locate(index)?;
        Ok((self.regions[r].gpa() >> PAGE_SHIFT) + p)
    }

    /// Page index of a guest frame number.
    #[inline]
    pub fn index_of_gfn(&self, gfn: u64) -> Result<u64, MemoryError> {
        let gpa = gfn
            .checked_mul(PAGE_SIZE as u64)
            .ok_or(MemoryError::NoRegion(gfn))?;
        let pos = self.regions.partition_point(|r| r.gpa() <= gpa);
        if pos == 0 {
            return Err(MemoryError::NoRegion(gfn));
        }
        let r = &self.regions[pos - 1];
        let off = gpa - r.gpa();
        if off >= r.len() as u64 {
            return Err(MemoryError::NoRegion(gfn));
        }
        Ok(self.first_page[pos - 1] + off / PAGE_SIZE as u64)
    }

    /// Number of pages from `index` to the end of its region (runs never cross regions).
    pub fn pages_left_in_region(&self, index: u64) -> Result<u64, MemoryError> {
        let (r, p) = self.locate(index)?;
        Ok(self.regions[r].pages() - p)
    }

    /// Copy pages `[index, index + dst.len()/PAGE_SIZE)` into `dst` (within one region).
    #[inline]
    pub fn read_pages(&self, index: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let (r, p) = self.locate(index)?;
        self.regions[r].read_pages(p, dst)
    }

    /// Copy `src` into pages starting at `index` (within one region).
    #[inline]
    pub fn write_pages(&self, index: u64, src: &[u8]) -> Result<(), MemoryError> {
        let (r, p) = self.locate(index)?;
        self.regions[r].write_pages(p, src)
    }

    /// Zero `count` pages starting at `index` (within one region).
    pub fn zero_pages(&self, index: u64, count: u64) -> Result<(), MemoryError> {
        let (r, p) = self.locate(index)?;
        self.regions[r].zero_pages(p, count)
    }

    /// A mutable I/O slice over `count` pages at `index` (within one region).
    ///
    /// # Safety
    /// See [`GuestRegion::io_slice_mut`]: no guest runs on this memory and no other
    /// thread reads or writes these pages while the slice lives.
    pub unsafe fn io_slice_mut(
        &self,
        index: u64,
        count: u64,
    ) -> Result<std::io::IoSliceMut<'_>, MemoryError> {
        let (r, p) = self.locate(index)?;
        // SAFETY: forwarded contract.
        unsafe { self.regions[r].io_slice_mut(p, count) }
    }

    /// xxh3-64 of a page that no one else writes (the receiver's own memory).
    ///
    /// # Safety
    /// No thread or guest may write the page during the call.
    pub unsafe fn hash_page_exclusive(&self, index: u64) -> Result<u64, MemoryError> {
        let (r, p) = self.locate(index)?;
        // SAFETY: forwarded contract.
        Ok(page_hash(unsafe { self.regions[r].slice(p, 1)? }))
    }

    /// True when a page that no one else writes (the receiver's own memory) reads
    /// as all zeros.
    ///
    /// # Safety
    /// No thread or guest may write the page during the call.
    pub unsafe fn page_is_zero_exclusive(&self, index: u64) -> Result<bool, MemoryError> {
        let (r, p) = self.locate(index)?;
        // SAFETY: forwarded contract.
        Ok(crate::codec::zero::is_zero_page(unsafe {
            self.regions[r].slice(p, 1)?
        }))
    }

    /// Populate (pre-fault) all pages with `threads` threads (destination only).
    pub fn prefault(&self, threads: usize) -> Result<(), MemoryError> {
        self.prefault_until(threads, &std::sync::atomic::AtomicBool::new(false))
    }

    /// [`GuestMemory::prefault`] that stops within one 2 MiB chunk once `stop` is
    /// set. Each chunk is one `madvise` call, so the process's memory-map lock is
    /// held for one chunk at a time, never for the whole guest.
    pub fn prefault_until(
        &self,
        threads: usize,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(), MemoryError> {
        const CHUNK: u64 = 512; // 2 MiB: one huge page per call when THP is on
        let next = std::sync::atomic::AtomicU64::new(0);
        let total = self.total_pages();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| -> Result<(), MemoryError> {
                        loop {
                            let i = next.fetch_add(CHUNK, std::sync::atomic::Ordering::Relaxed);
                            if i >= total || stop.load(std::sync::atomic::Ordering::Relaxed) {
                                return Ok(());
                            }
                            let (r, p) = self.locate(i)?;
                            let n = CHUNK.min(self.regions[r].pages() - p);
                            self.regions[r].prefault(p, n)?;
                        }
                    })
                })
                .collect();
            hs.into_iter()
                .try_for_each(|h| h.join().expect("prefault thread panicked"))
        })
    }

    /// xxh3-64 of one page's current contents, read where it lies through raw
    /// pointers and never referenced (`page_pass`: a load loop that keeps many
    /// misses in flight, then the hash from L1; no copy). The guest may be writing
    /// the page: the hash then describes some mix of old and new bytes.
    pub fn page_hash(&self, index: u64) -> Result<u64, MemoryError> {
        let (r, p) = self.locate(index)?;
        Ok(self.regions[r].racy_pages(p, 1)?.hash_page(0)?.hash)
    }

    /// Hash every page (xxh3 per page, then xxh3 of the table) using `threads` threads.
    /// Used by tests and `bench` for the full-memory comparison, and by the `full`
    /// verification mode at brownout.
    pub fn full_digest(&self, threads: usize) -> Result<u64, MemoryError> {
        let table = self.page_hash_table(threads)?;
        Ok(digest_of_table(&table))
    }

    /// Per-page xxh3-64 of all pages, computed by `threads` threads.
    pub fn page_hash_table(&self, threads: usize) -> Result<Vec<u64>, MemoryError> {
        let n = self.total_pages();
        let mut table = vec![0u64; n as usize];
        let threads = threads.max(1);
        let chunk = n.div_ceil(threads as u64).max(1) as usize;
        let results: Vec<Result<(), MemoryError>> = std::thread::scope(|s| {
            let handles: Vec<_> = table
                .chunks_mut(chunk)
                .enumerate()
                .map(|(t, part)| {
                    s.spawn(move || {
                        let base = (t * chunk) as u64;
                        for (i, slot) in part.iter_mut().enumerate() {
                            *slot = self.page_hash(base + i as u64)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("hash thread panicked"))
                .collect()
        });
        for r in results {
            r?;
        }
        Ok(table)
    }
}

/// The host's page size in bytes (`sysconf(_SC_PAGESIZE)`, read once): the unit of
/// `/proc/self/pagemap` entries, which is not [`PAGE_SIZE`] on every host (16 KiB and
/// 64 KiB pages exist on arm64 and ppc64). Falls back to [`PAGE_SIZE`] if the call
/// fails.
pub fn host_page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf takes a constant name and only returns a value.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        match usize::try_from(v) {
            Ok(n) if n.is_power_of_two() && n >= 512 => n,
            _ => PAGE_SIZE,
        }
    })
}

/// The per-page hash used for integrity checks and digests (xxh3-64), for bytes
/// already in cache (the receiver hashes pages it has just written). A whole page
/// goes through [`page_pass::hash_cached`] (AVX-512) where the CPU has it, else
/// the crate's loop, which from cache beats [`page_pass::hash_page`] (56 against
/// 47 GiB/s); that one computes the same value and is meant for memory not in
/// cache (`cargo bench --features bench --bench codecs -- page-hash`).
#[inline]
pub fn page_hash(page: &[u8]) -> u64 {
    if let Ok(whole) = <&[u8; PAGE_SIZE]>::try_from(page) {
        if let Some(h) = page_pass::hash_cached(whole) {
            return h;
        }
    }
    twox_hash::XxHash3_64::oneshot(page)
}

/// The hash of an all-zero page (computed once).
pub fn zero_page_hash() -> u64 {
    static H: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *H.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}

/// The memory digest: xxh3-64 over the little-endian per-page hash table, in page order.
pub fn digest_of_table(table: &[u64]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = twox_hash::XxHash3_64::new();
    let mut bytes = Vec::with_capacity(4096 * 8);
    for chunk in table.chunks(4096) {
        bytes.clear();
        for v in chunk {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        h.write(&bytes);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_arithmetic_is_checked() {
        let ok = MemoryLayout {
            regions: vec![(0, 1 << 20), (1 << 30, 2 << 20)],
        };
        assert_eq!(ok.validate().unwrap(), 3 << 20);
        // Two regions whose lengths sum past 2^64: refused, never wrapped.
        let wraps = MemoryLayout {
            regions: vec![(0, 1 << 63), (1 << 63, 1 << 63)],
        };
        assert_eq!(wraps.checked_total_bytes(), None);
        assert_eq!(wraps.total_bytes(), u64::MAX);
        assert!(matches!(wraps.validate(), Err(MemoryError::Overflow(_))));
        // A region reaching past the end of the address space.
        let past_end = MemoryLayout {
            regions: vec![(u64::MAX - 4095, 8192)],
        };
        assert!(matches!(past_end.validate(), Err(MemoryError::Overflow(_))));
        assert!(matches!(
            GuestMemory::from_layout(&past_end, false),
            Err(MemoryError::Overflow(_))
        ));
        let overlap = MemoryLayout {
            regions: vec![(0, 8192), (4096, 4096)],
        };
        assert!(matches!(
            overlap.validate(),
            Err(MemoryError::Overlap(4096))
        ));
        let unsorted = MemoryLayout {
            regions: vec![(8192, 4096), (0, 4096)],
        };
        assert!(matches!(unsorted.validate(), Err(MemoryError::Overlap(0))));
        let unaligned = MemoryLayout {
            regions: vec![(0, 4097)],
        };
        assert!(matches!(
            unaligned.validate(),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout { regions: vec![] }.validate(),
            Err(MemoryError::Empty)
        ));
    }

    /// Known answers computed with a second XXH3 implementation (the `xxhash-rust`
    /// crate, 0.8.19): the page hash and the digest are wire-visible, so a sender and
    /// a receiver built with different hash crates or SIMD levels must agree.
    #[test]
    fn page_hash_and_digest_are_xxh3_64() {
        let mut page = vec![0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2654435761).wrapping_shr(13) as u8;
        }
        assert_eq!(page_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(zero_page_hash(), 0x93d7_6fe1_48c6_89ba);
        assert_eq!(page_hash(&page), 0x84d9_e7ce_664c_8217);
        let table: Vec<u64> = (0..5000).collect();
        assert_eq!(digest_of_table(&table), 0x3e94_dcde_1637_b00e);
    }

    #[test]
    fn host_page_size_is_the_systems() {
        // SAFETY: as in `host_page_size`.
        let sys = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        assert_eq!(host_page_size() as i64, sys as i64);
        assert!(host_page_size().is_power_of_two());
    }
}

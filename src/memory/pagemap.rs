//! `/proc/self/pagemap`: what the kernel knows of each host page of our own address
//! space. Two users: the userfaultfd tracker harvests written pages with the
//! `PAGEMAP_SCAN` ioctl (and re-protects them in the same walk), and the sender asks
//! which guest pages were never populated, so that it sends them as zero without
//! reading them.
//!
//! `PAGEMAP_SCAN` (Linux ≥ 6.7) looks at page-table entries only and returns ranges.
//! Reading the file instead builds eight bytes per host page and looks at each page's
//! `struct page` (about 80 ns a page here), so it is only the fallback for older
//! kernels. The structs are transcribed from the kernel uapi (`linux/fs.h`); every
//! `unsafe` block of this interface lives in this file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Page category: present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Page category: written since write-protected (async userfaultfd write-protect).
#[cfg(feature = "uffd")]
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Page category: swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Page category: mapped to the shared zero page (read, never written).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Scan flag: write-protect the matching pages in the same walk.
#[cfg(feature = "uffd")]
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Scan flag: fail unless the range is async-WP registered.
#[cfg(feature = "uffd")]
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: `[start, end)` with `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The categories of every page of the range (masked by the scan's return mask).
    pub categories: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

/// Which pages one scan selects and what it reports of them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Categories a page must all have.
    pub all_of: u64,
    /// Categories a page must have at least one of (0: no such condition).
    pub any_of: u64,
    /// Categories reported per range; adjacent pages with the same reported
    /// categories merge into one range.
    pub report: u64,
}

/// Outcome of one `PAGEMAP_SCAN` call.
#[derive(Debug, Clone, Copy)]
pub struct ScanOut {
    /// Entries of the output vector filled.
    pub regions: usize,
    /// Where the walk stopped (`== end` when it completed).
    pub walk_end: u64,
}

/// `/proc/self/pagemap`, opened once.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Open `/proc/self/pagemap`.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// One `PAGEMAP_SCAN` over `[start, end)` (host-page aligned) writing the ranges
    /// of pages that `q` selects into `vec`. The walk stops early when `vec` is full:
    /// continue from `walk_end`. ENOTTY or EINVAL: the kernel lacks the ioctl.
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        vec: &mut [PageRegion],
        q: ScanQuery,
    ) -> io::Result<ScanOut> {
        let mut a = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: q.all_of,
            category_anyof_mask: q.any_of,
            return_mask: q.report,
        };
        // SAFETY: `a` is a correctly sized `pm_scan_arg`; `a.vec` points to
        // `vec.len()` writable `page_region` entries (exclusively borrowed for the
        // call), which is all the kernel writes besides `a` itself. The kernel only
        // walks page tables of the range; it reads or writes none of its bytes.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                PAGEMAP_SCAN as _,
                &mut a as *mut PmScanArg,
            )
        };
        // No EINTR retry: the kernel only aborts the walk for fatal signals, and a
        // retry with PM_SCAN_WP_MATCHING could lose ranges it already re-protected.
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = rc as usize;
        Ok(ScanOut {
            regions: n.min(vec.len()),
            walk_end: a.walk_end,
        })
    }

    /// One `PAGEMAP_SCAN` over `[start, end)` reporting `PAGE_IS_WRITTEN` ranges into
    /// `vec`; with `rearm` it also write-protects them again (`PM_SCAN_WP_MATCHING`,
    /// atomically with the report) and insists the range is async-WP registered
    /// (`PM_SCAN_CHECK_WPASYNC`).
    #[cfg(feature = "uffd")]
    pub fn scan_written(
        &self,
        start: u64,
        end: u64,
        vec: &mut [PageRegion],
        rearm: bool,
    ) -> io::Result<ScanOut> {
        let flags = if rearm {
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        } else {
            0
        };
        self.scan(
            start,
            end,
            vec,
            ScanQuery {
                flags,
                all_of: PAGE_IS_WRITTEN,
                any_of: 0,
                report: PAGE_IS_WRITTEN,
            },
        )
    }

    /// Read the raw 64-bit entries of the host pages from number `first` into
    /// `out` (one per element). The fallback where `PAGEMAP_SCAN` is missing.
    pub fn read_entries(&self, first: u64, out: &mut [u64]) -> io::Result<()> {
        let mut buf = [0u8; 8 * 512];
        let mut done = 0usize;
        while done < out.len() {
            let n = (out.len() - done).min(512);
            self.file
                .read_exact_at(&mut buf[..n * 8], (first + done as u64) * 8)?;
            for (o, e) in out[done..done + n].iter_mut().zip(buf.chunks_exact(8)) {
                *o = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            }
            done += n;
        }
        Ok(())
    }
}

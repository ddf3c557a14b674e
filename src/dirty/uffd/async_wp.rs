//! Asynchronous write-protect: the kernel resolves write faults and PAGEMAP_SCAN
//! collects (and re-protects) the written pages.

use super::sys::{self, PageRegion, Pagemap, Uffd};
use super::{set_range, Span, NAME_ASYNC};
use crate::dirty::{TrackError, Unavailable};
use crate::memory::{PageSet, PAGE_SIZE};

/// Output-vector entries per PAGEMAP_SCAN call (a call stops early when full and the
/// walk continues from `walk_end`).
const SCAN_VEC: usize = 4096;

pub(super) fn no_async_reason(features: u64) -> TrackError {
    let reason = if features & sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
        Unavailable::NoUffdWriteProtect
    } else {
        Unavailable::NoUffdWpAsync { features }
    };
    TrackError::Unavailable {
        tracker: NAME_ASYNC,
        reason,
    }
}

fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> TrackError {
    move |source| TrackError::Os {
        tracker: NAME_ASYNC,
        op,
        source,
    }
}

/// An armed async-WP tracker.
#[derive(Debug)]
pub(super) struct AsyncWp {
    uffd: Uffd,
    pagemap: Pagemap,
    spans: Vec<Span>,
    /// Spans registered so far (unregistered on shutdown/drop).
    registered: usize,
    vec: Vec<PageRegion>,
}

impl AsyncWp {
    pub(super) fn start(spans: Vec<Span>) -> Result<Self, TrackError> {
        let supported = super::probe_features(NAME_ASYNC)?;
        if supported & sys::UFFD_FEATURE_WP_ASYNC == 0
            || supported & sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0
        {
            return Err(no_async_reason(supported));
        }
        let features = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP
            | sys::UFFD_FEATURE_WP_ASYNC
            | (supported
                & (sys::UFFD_FEATURE_WP_UNPOPULATED | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
        let uffd = Uffd::open().map_err(os("userfaultfd"))?;
        uffd.api(features).map_err(os("UFFDIO_API"))?;
        let pagemap = Pagemap::open().map_err(|e| TrackError::Unavailable {
            tracker: NAME_ASYNC,
            reason: Unavailable::Pagemap(e),
        })?;
        let mut vec = vec![PageRegion::default(); SCAN_VEC];
        // Probe PAGEMAP_SCAN (read-only: no re-protect, no registration needed).
        if let Some(s) = spans.first() {
            if let Err(e) =
                pagemap.scan_written(s.start, s.start + PAGE_SIZE as u64, &mut vec[..1], false)
            {
                let reason = match e.raw_os_error() {
                    Some(libc::ENOTTY) | Some(libc::EINVAL) => Unavailable::NoPagemapScan(e),
                    _ => Unavailable::PagemapScan(e),
                };
                return Err(TrackError::Unavailable {
                    tracker: NAME_ASYNC,
                    reason,
                });
            }
        }
        let mut me = Self {
            uffd,
            pagemap,
            spans,
            registered: 0,
            vec,
        };
        // On error, dropping `me` unregisters what was registered.
        for i in 0..me.spans.len() {
            let s = me.spans[i];
            let ioctls = me
                .uffd
                .register_wp(s.start, s.len)
                .map_err(super::register_err(NAME_ASYNC, &s))?;
            me.registered = i + 1;
            if ioctls & sys::UFFDIO_WRITEPROTECT_IOCTL_BIT == 0 {
                return Err(TrackError::Unavailable {
                    tracker: NAME_ASYNC,
                    reason: Unavailable::NoWriteProtect { host: s.start },
                });
            }
            me.uffd
                .writeprotect(s.start, s.len, true)
                .map_err(os("UFFDIO_WRITEPROTECT"))?;
        }
        Ok(me)
    }

    pub(super) fn harvest(&mut self, into: &mut PageSet) -> Result<(), TrackError> {
        let page = PAGE_SIZE as u64;
        let words = into.words_mut();
        for s in &self.spans {
            let end = s.end();
            let mut cur = s.start;
            while cur < end {
                let out = self
                    .pagemap
                    .scan_written(cur, end, &mut self.vec, true)
                    .map_err(os("PAGEMAP_SCAN"))?;
                for r in &self.vec[..out.regions] {
                    let (a, b) = (r.start.max(s.start), r.end.min(end));
                    if a < b {
                        set_range(
                            words,
                            s.first_page + (a - s.start) / page,
                            (b - a).div_ceil(page),
                        );
                    }
                }
                if out.walk_end <= cur {
                    // No progress would loop forever; the kernel never does this.
                    return Err(TrackError::Os {
                        tracker: NAME_ASYNC,
                        op: "PAGEMAP_SCAN",
                        source: std::io::Error::other(format!("walk made no progress at {cur:#x}")),
                    });
                }
                cur = out.walk_end;
            }
        }
        Ok(())
    }

    /// Unregister every region (which also drops the write protection).
    pub(super) fn shutdown(&mut self) -> Result<(), TrackError> {
        let mut first = None;
        for s in &self.spans[..self.registered] {
            if let Err(e) = self.uffd.unregister(s.start, s.len) {
                first.get_or_insert(e);
            }
        }
        self.registered = 0;
        match first {
            Some(source) => Err(TrackError::Os {
                tracker: NAME_ASYNC,
                op: "UFFDIO_UNREGISTER",
                source,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for AsyncWp {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

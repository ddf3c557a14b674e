//! Synchronous write-protect: a handler thread receives each write fault, marks the
//! page and un-protects it; a harvest swaps the marks out and re-protects those pages.
//!
//! Ordering: the handler marks *then* un-protects, and a harvest swaps *then*
//! re-protects, each pair under one mutex. A write completes only after its page was
//! un-protected, hence after its mark; and a harvest can never re-protect a page
//! between another fault's mark and un-protect (which would let that un-protect
//! silently undo the re-arm). So every write is reported by a harvest that starts
//! after it, and a page is write-protected again before harvest returns it.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::sys::{self, EventFd, Uffd, UffdMsg};
use super::{for_each_run, index_of_addr, Span, NAME_SYNC};
use crate::dirty::{TrackError, Unavailable};
use crate::memory::{DirtyBitmap, PageSet, PAGE_SIZE};

/// Harvest re-protects runs of harvested pages, bridging gaps of up to this many
/// clean pages: an ioctl costs ~3 µs here, re-protecting a page ~0.2-0.3 µs. Bridging
/// is harmless because a page outside the harvested set is already protected: only
/// the handler un-protects, and it marks the page first under the same gate that the
/// harvest holds.
const REPROTECT_MERGE_GAP: u64 = 8;

/// Messages read per `read(2)` on the userfaultfd.
const MSG_BATCH: usize = 64;

pub(super) fn no_wp_reason(tracker: &'static str) -> TrackError {
    TrackError::Unavailable {
        tracker,
        reason: Unavailable::NoUffdWriteProtect,
    }
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> TrackError {
    move |source| TrackError::Os {
        tracker: NAME_SYNC,
        op,
        source,
    }
}

/// State shared with the handler thread.
#[derive(Debug)]
struct HandlerState {
    uffd: Uffd,
    stop: EventFd,
    spans: Vec<Span>,
    bitmap: DirtyBitmap,
    /// Serialises {mark, un-protect} in the handler against {swap, re-protect} in
    /// harvest (see the module docs).
    gate: Mutex<()>,
    /// First error the handler hit (reported by the next harvest).
    error: Mutex<Option<io::Error>>,
}

impl HandlerState {
    fn gate(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn record(&self, e: io::Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }
}

/// An armed sync-WP tracker.
#[derive(Debug)]
pub(super) struct SyncWp {
    shared: Arc<HandlerState>,
    thread: Option<JoinHandle<()>>,
    registered: usize,
    scratch: PageSet,
}

impl SyncWp {
    pub(super) fn start(spans: Vec<Span>) -> Result<Self, TrackError> {
        let supported = super::probe_features(NAME_SYNC)?;
        if supported & sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(no_wp_reason(NAME_SYNC));
        }
        let unpopulated = supported & sys::UFFD_FEATURE_WP_UNPOPULATED != 0;
        let features = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP
            | (supported
                & (sys::UFFD_FEATURE_WP_UNPOPULATED | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
        let uffd = Uffd::open().map_err(os("userfaultfd"))?;
        uffd.api(features).map_err(os("UFFDIO_API"))?;
        let stop = EventFd::new().map_err(os("eventfd"))?;
        let pages = spans
            .iter()
            .map(|s| s.first_page + s.pages())
            .max()
            .unwrap_or(0);
        let shared = Arc::new(HandlerState {
            uffd,
            stop,
            spans,
            bitmap: DirtyBitmap::new(pages),
            gate: Mutex::new(()),
            error: Mutex::new(None),
        });
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("uffd-wp-handler".into())
            .spawn(move || handler(&sh))
            .map_err(os("spawn handler thread"))?;
        // From here on, dropping `me` unregisters and joins the thread.
        let mut me = Self {
            shared,
            thread: Some(thread),
            registered: 0,
            scratch: PageSet::new(pages),
        };
        for i in 0..me.shared.spans.len() {
            let s = me.shared.spans[i];
            let ioctls = me
                .shared
                .uffd
                .register_wp(s.start, s.len)
                .map_err(super::register_err(NAME_SYNC, &s))?;
            me.registered = i + 1;
            if ioctls & sys::UFFDIO_WRITEPROTECT_IOCTL_BIT == 0 {
                return Err(TrackError::Unavailable {
                    tracker: NAME_SYNC,
                    reason: Unavailable::NoWriteProtect { host: s.start },
                });
            }
            if !unpopulated {
                // Without WP_UNPOPULATED, a first write to a never-touched page
                // would not fault: populate everything so all of it can be protected.
                sys::populate_write(s.start, s.len).map_err(os("madvise(MADV_POPULATE_WRITE)"))?;
            }
            me.shared
                .uffd
                .writeprotect(s.start, s.len, true)
                .map_err(os("UFFDIO_WRITEPROTECT"))?;
        }
        Ok(me)
    }

    pub(super) fn harvest(&mut self, into: &mut PageSet) -> Result<(), TrackError> {
        if let Some(source) = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(TrackError::Os {
                tracker: NAME_SYNC,
                op: "fault handler",
                source,
            });
        }
        self.scratch.clear();
        {
            let _gate = self.shared.gate();
            self.shared.bitmap.harvest_into(&mut self.scratch);
            let uffd = &self.shared.uffd;
            let r = for_each_run(
                &self.scratch,
                &self.shared.spans,
                REPROTECT_MERGE_GAP,
                |addr, len| uffd.writeprotect(addr, len, true),
            );
            if let Err(source) = r {
                // Put the marks back so nothing is lost if the caller retries.
                for i in self.scratch.iter() {
                    self.shared.bitmap.mark(i);
                }
                return Err(TrackError::Os {
                    tracker: NAME_SYNC,
                    op: "UFFDIO_WRITEPROTECT",
                    source,
                });
            }
        }
        into.union_with(&self.scratch);
        Ok(())
    }

    /// Unregister (clears protection, wakes any blocked writer), then stop and join
    /// the handler thread. Idempotent.
    pub(super) fn shutdown(&mut self) -> Result<(), TrackError> {
        let mut first: Option<(&'static str, io::Error)> = None;
        for s in &self.shared.spans[..self.registered] {
            if let Err(e) = self.shared.uffd.unregister(s.start, s.len) {
                first.get_or_insert(("UFFDIO_UNREGISTER", e));
            }
        }
        self.registered = 0;
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.shared.stop.signal() {
                // Cannot happen for an eventfd with a small counter; without the
                // signal the join below could hang, so leave the thread detached.
                first.get_or_insert(("eventfd write", e));
            } else if t.join().is_err() {
                first.get_or_insert((
                    "join handler thread",
                    io::Error::other("handler thread panicked"),
                ));
            }
        }
        match first {
            Some((op, source)) => Err(TrackError::Os {
                tracker: NAME_SYNC,
                op,
                source,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for SyncWp {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The fault-handler loop: runs until the stop eventfd fires.
fn handler(sh: &HandlerState) {
    let mut msgs = [UffdMsg::default(); MSG_BATCH];
    let mut pages: Vec<u64> = Vec::with_capacity(MSG_BATCH);
    let page_mask = !(PAGE_SIZE as u64 - 1);
    loop {
        let (fault, stop) = match sys::poll2(sh.uffd.raw(), sh.stop.raw()) {
            Ok(r) => r,
            Err(e) => {
                sh.record(e);
                return bail_out(sh);
            }
        };
        if stop {
            return;
        }
        if !fault {
            continue;
        }
        let n = match sh.uffd.read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(e) => {
                sh.record(e);
                return bail_out(sh);
            }
        };
        pages.clear();
        pages.extend(
            msgs[..n]
                .iter()
                .filter(|m| {
                    m.event == sys::UFFD_EVENT_PAGEFAULT
                        && m.flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0
                })
                .map(|m| m.address & page_mask),
        );
        if pages.is_empty() {
            continue;
        }
        pages.sort_unstable();
        pages.dedup();
        let _gate = sh.gate();
        for &a in &pages {
            if let Some(i) = index_of_addr(&sh.spans, a) {
                sh.bitmap.mark(i);
            }
        }
        // Un-protect (and wake) contiguous runs.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + PAGE_SIZE as u64 {
                j += 1;
            }
            let (start, len) = (pages[i], (j - i) as u64 * PAGE_SIZE as u64);
            if let Err(e) = sh.uffd.writeprotect(start, len, false) {
                sh.record(e);
                // At least wake the writer; it faults again and we retry.
                let _ = sh.uffd.wake(start, len);
            }
            i = j;
        }
    }
}

/// The handler cannot continue: drop the protection so that no writer blocks
/// forever, and mark everything dirty so no write goes unreported. The recorded
/// error surfaces at the next harvest.
fn bail_out(sh: &HandlerState) {
    let _gate = sh.gate();
    for s in &sh.spans {
        let _ = sh.uffd.unregister(s.start, s.len);
        sh.bitmap.mark_range(s.first_page, s.pages());
    }
}

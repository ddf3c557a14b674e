//! Dirty-page tracking behind one small trait.
//!
//! A tracker reports which pages were written since the previous harvest. Contract:
//! after [`DirtyTracker::start`] returns, every write that completes later is reported
//! by some later [`DirtyTracker::harvest`] (a write may be reported more than once,
//! never zero times). `harvest` ORs pages into the caller's set and re-arms tracking
//! for those pages *before* returning, so that the caller's copy (made after harvest)
//! either sees a concurrent write or the write is reported again next time.
//!
//! Backends:
//! - [`ExplicitTracker`]: an atomic bitmap the hypervisor (or the workload simulator)
//!   marks after each write;
//! - [`HashScanTracker`]: re-hashes every page (xxh3) and reports those that differ
//!   from what the engine sent (or, used alone, from its previous scan); works on any
//!   memory, is the test oracle and the engine's safe fallback;
//! - `UffdTracker` (feature `uffd`): userfaultfd write-protect, asynchronous
//!   (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`) when the kernel has it, else
//!   synchronous with a fault-handler thread;
//! - `KvmDirtyLog` (feature `kvm`): KVM's per-slot dirty log (plain or manual
//!   protect); combine it with an [`ExplicitTracker`] for the VMM's own writes;
//! - [`UnionTracker`]: OR of several (e.g. KVM guest writes ∪ VMM writes).

mod explicit;
mod hash_scan;
#[cfg(feature = "kvm")]
pub mod kvm;
#[cfg(feature = "kvm")]
mod kvm_sys;
#[cfg(feature = "uffd")]
pub mod uffd;

pub use explicit::ExplicitTracker;
pub use hash_scan::HashScanTracker;
#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyLog, KvmDirtyLogMode, KvmSlot};
#[cfg(feature = "uffd")]
pub use uffd::{UffdMode, UffdTracker};

use std::sync::Arc;

use crate::memory::{GuestMemory, MemoryError, PageSet};
use crate::proof::PageLedger;

/// Why a dirty-tracking backend cannot serve ([`TrackError::Unavailable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// An explicit bitmap of another size than guest memory.
    #[error("bitmap has {bits} bits but memory has {pages} pages")]
    BitmapSize {
        /// Bits in the bitmap.
        bits: u64,
        /// Guest pages.
        pages: u64,
    },
    /// A KVM memory slot too large for one dirty-log clear.
    #[error("slot {slot} has more than 2^32 pages")]
    SlotTooLarge {
        /// The slot.
        slot: u32,
    },
    /// A KVM memory slot that matches no guest-memory region.
    #[error("slot {slot} at gpa {gpa:#x} matches no guest-memory region")]
    NoRegion {
        /// The slot.
        slot: u32,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// The kernel's userfaultfd cannot write-protect.
    #[error("kernel userfaultfd lacks write-protect support (UFFD_FEATURE_PAGEFAULT_FLAG_WP, Linux >= 5.7)")]
    NoUffdWriteProtect,
    /// The kernel's userfaultfd lacks asynchronous write-protect.
    #[error("kernel userfaultfd lacks UFFD_FEATURE_WP_ASYNC (needs Linux >= 6.7); supported features {features:#x}")]
    NoUffdWpAsync {
        /// The features the kernel offers.
        features: u64,
    },
    /// Write-protect is not offered for a region (e.g. a file mapping).
    #[error("UFFDIO_WRITEPROTECT not offered for the region at host {host:#x}")]
    NoWriteProtect {
        /// The region's host address.
        host: u64,
    },
    /// A region cannot be registered for write-protect tracking (a private or
    /// read-only file mapping such as an image).
    #[error("cannot write-protect-register the region at host {host:#x} (needs writable anonymous, shmem or hugetlbfs memory): {source}")]
    Register {
        /// The region's host address.
        host: u64,
        /// The `UFFDIO_REGISTER` error.
        source: std::io::Error,
    },
    /// No userfaultfd can be opened.
    #[error("cannot open a userfaultfd (syscall and /dev/userfaultfd): {0}")]
    Userfaultfd(#[source] std::io::Error),
    /// `/proc/self/pagemap` cannot be opened.
    #[error("cannot open /proc/self/pagemap: {0}")]
    Pagemap(#[source] std::io::Error),
    /// The kernel lacks the `PAGEMAP_SCAN` ioctl.
    #[error("kernel lacks the PAGEMAP_SCAN ioctl (needs Linux >= 6.7): {0}")]
    NoPagemapScan(#[source] std::io::Error),
    /// Probing `PAGEMAP_SCAN` failed otherwise.
    #[error("PAGEMAP_SCAN probe failed: {0}")]
    PagemapScan(#[source] std::io::Error),
}

/// Errors from a tracker backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// The backend is not available on this kernel/host, or for this memory.
    #[error("dirty tracker {tracker} is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        tracker: &'static str,
        /// Why.
        #[source]
        reason: Unavailable,
    },
    /// A system call failed.
    #[error("dirty tracker {tracker}: {op} failed: {source}")]
    Os {
        /// Backend name.
        tracker: &'static str,
        /// Which operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// harvest/stop before start, or start twice.
    #[error("dirty tracker {0} used out of order (start → harvest* → stop)")]
    Order(&'static str),
    /// Memory access failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// What a backend can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerCaps {
    /// Sees writes made by the guest's CPUs.
    pub sees_guest_writes: bool,
    /// Sees writes made by the VMM/host process through the mapping.
    pub sees_vmm_writes: bool,
    /// Reports exactly the written pages (no false positives beyond re-marks).
    pub exact: bool,
}

/// A dirty-page tracker. See the module docs for the contract.
pub trait DirtyTracker: Send {
    /// Short backend name ("explicit", "hash", "uffd-async", "uffd-sync", "kvm").
    fn name(&self) -> &'static str;
    /// What the backend can see.
    fn caps(&self) -> TrackerCaps;
    /// Arm tracking over all of `mem`. Round 0 sends every page, so nothing written
    /// before `start` needs reporting.
    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError>;
    /// OR the pages written since the last harvest (or start) into `into`, re-arming them.
    fn harvest(&mut self, mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError>;
    /// Disarm tracking and release kernel resources.
    fn stop(&mut self, mem: &GuestMemory) -> Result<(), TrackError>;
    /// The engine's ledger of what it sent, given before `start`. A tracker that
    /// compares page contents takes it as its baseline and returns true: it then
    /// reports every page whose content differs from what was sent, which audits
    /// all of memory at each harvest, and the engine's sampled audit stays off.
    /// Trackers that observe writes have no use for it and keep this default.
    fn follow_sent(&mut self, _sent: &Arc<PageLedger>) -> bool {
        false
    }
}

/// OR-combines several trackers (e.g. KVM's log of guest writes with an explicit
/// bitmap of the VMM's own writes, which KVM cannot see).
pub struct UnionTracker {
    parts: Vec<Box<dyn DirtyTracker>>,
}

impl std::fmt::Debug for UnionTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|p| p.name()))
            .finish()
    }
}

impl UnionTracker {
    /// Combine `parts` (at least one).
    pub fn new(parts: Vec<Box<dyn DirtyTracker>>) -> Self {
        Self { parts }
    }
}

impl DirtyTracker for UnionTracker {
    fn name(&self) -> &'static str {
        "union"
    }
    fn caps(&self) -> TrackerCaps {
        self.parts.iter().fold(
            TrackerCaps {
                sees_guest_writes: false,
                sees_vmm_writes: false,
                exact: true,
            },
            |a, p| {
                let c = p.caps();
                TrackerCaps {
                    sees_guest_writes: a.sees_guest_writes || c.sees_guest_writes,
                    sees_vmm_writes: a.sees_vmm_writes || c.sees_vmm_writes,
                    exact: a.exact && c.exact,
                }
            },
        )
    }
    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        self.parts.iter_mut().try_for_each(|p| p.start(mem))
    }
    fn harvest(&mut self, mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        self.parts.iter_mut().try_for_each(|p| p.harvest(mem, into))
    }
    fn stop(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        self.parts.iter_mut().try_for_each(|p| p.stop(mem))
    }
    fn follow_sent(&mut self, sent: &Arc<PageLedger>) -> bool {
        // Every part gets the ledger; one content-comparing part audits everything.
        self.parts
            .iter_mut()
            .fold(false, |any, p| p.follow_sent(sent) | any)
    }
}

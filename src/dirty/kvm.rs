//! KVM's per-slot dirty log as a [`DirtyTracker`].
//!
//! The VMM registers guest RAM with KVM as memory slots and hands the tracker an
//! `Arc<VmFd>` plus the slot table ([`KvmSlot`]: slot id ↔ the region at that gpa).
//! [`DirtyTracker::start`] turns `KVM_MEM_LOG_DIRTY_PAGES` on for every slot
//! (re-registering it with the same address and size, a flags-only change) and
//! discards whatever the log held; [`DirtyTracker::stop`] turns logging off again, so
//! the slot costs nothing while no migration runs.
//!
//! Two harvest modes:
//! - [`KvmDirtyLogMode::Plain`]: `KVM_GET_DIRTY_LOG` copies and clears the slot's
//!   bitmap and write-protects the reported pages in the same ioctl.
//! - [`KvmDirtyLogMode::ManualProtect`] (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, enabled
//!   on the VM with [`KvmDirtyLog::enable_manual_protect`] *before* the slots are
//!   created): `GET` only copies the bitmap and `KVM_CLEAR_DIRTY_LOG` re-protects the
//!   reported pages. The tracker clears before `harvest` returns, so the caller's
//!   copy always comes after the re-arm (a write between GET and CLEAR would otherwise
//!   be lost). `INITIALLY_SET` is requested when offered, which skips the
//!   write-protect pass over the whole slot when logging is switched on.
//!
//! **KVM does not see the VMM's own writes** to guest memory (loading an image,
//! virtio device emulation, …): those go through the host mapping, not through the
//! guest's page tables. A VMM that writes guest memory while a migration runs must
//! combine this tracker with an [`ExplicitTracker`](super::ExplicitTracker) that it
//! marks after each such write, using [`UnionTracker`](super::UnionTracker):
//!
//! ```ignore
//! let tracker = UnionTracker::new(vec![
//!     Box::new(KvmDirtyLog::new(vm.clone(), slots, mode)),
//!     Box::new(ExplicitTracker::new(vmm_writes_bitmap.clone())),
//! ]);
//! ```

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;

use super::kvm_sys;
use super::{DirtyTracker, TrackError, TrackerCaps};
use crate::memory::{GuestMemory, PageSet};

const NAME: &str = "kvm";
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` (bit 0 of the capability's argument).
const MANUAL_PROTECT_ENABLE: u64 = 1;

/// One KVM memory slot covering exactly one [`GuestRegion`](crate::memory::GuestRegion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmSlot {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical address of the region this slot maps (the region is looked up
    /// by address in the [`GuestMemory`] passed to `start`; sizes must match).
    pub gpa: u64,
    /// Flags the VMM registered the slot with, other than `KVM_MEM_LOG_DIRTY_PAGES`
    /// (e.g. `KVM_MEM_READONLY`); restored by `stop`.
    pub base_flags: u32,
}

/// How dirty pages are harvested and re-armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmDirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` alone (it re-protects the pages it reports).
    Plain,
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect enabled on the VM).
    ManualProtect,
}

#[derive(Debug)]
struct ActiveSlot {
    slot: KvmSlot,
    len: u64,
    host: *mut u8,
    pages: u64,
    /// Page index (in `GuestMemory` numbering) of the slot's first page.
    first_index: u64,
    bitmap: Vec<u64>,
}

// SAFETY: `host` is only passed back to KVM (as the slot's registered address); it is
// never dereferenced by the tracker, so moving the tracker between threads is sound.
unsafe impl Send for ActiveSlot {}

/// Dirty-page tracker over KVM memory slots. See the module docs.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<KvmSlot>,
    mode: KvmDirtyLogMode,
    active: Vec<ActiveSlot>,
    started: bool,
}

fn os(op: &'static str, source: std::io::Error) -> TrackError {
    TrackError::Os {
        tracker: NAME,
        op,
        source,
    }
}

impl KvmDirtyLog {
    /// Enable `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` on `vm` (with `INITIALLY_SET` when
    /// offered) and return [`KvmDirtyLogMode::ManualProtect`]; returns
    /// [`KvmDirtyLogMode::Plain`] when the kernel lacks the capability.
    ///
    /// Ordering requirement: call this right after creating the VM, before any memory
    /// slot is created, because KVM decides how a slot's log is initialised when
    /// logging is switched on for it.
    pub fn enable_manual_protect(vm: &VmFd) -> Result<KvmDirtyLogMode, TrackError> {
        let offered = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as _);
        if offered <= 0 {
            return Ok(KvmDirtyLogMode::Plain);
        }
        let offered = offered as u64;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = MANUAL_PROTECT_ENABLE | (offered & u64::from(KVM_DIRTY_LOG_INITIALLY_SET));
        vm.enable_cap(&cap).map_err(|e| {
            os(
                "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        })?;
        Ok(KvmDirtyLogMode::ManualProtect)
    }

    /// A tracker over `slots` of `vm`. `mode` must match what the VM has enabled
    /// ([`KvmDirtyLog::enable_manual_protect`]'s result).
    pub fn new(vm: Arc<VmFd>, slots: Vec<KvmSlot>, mode: KvmDirtyLogMode) -> Self {
        Self {
            vm,
            slots,
            mode,
            active: Vec::new(),
            started: false,
        }
    }

    /// The harvest mode.
    pub fn mode(&self) -> KvmDirtyLogMode {
        self.mode
    }

    /// Fetch one slot's log into its bitmap and, with manual protect, re-arm the
    /// reported pages. Returns whether any page was dirty.
    fn fetch(vm: &VmFd, mode: KvmDirtyLogMode, s: &mut ActiveSlot) -> Result<bool, TrackError> {
        kvm_sys::get_dirty_log(vm, s.slot.slot, s.pages, &mut s.bitmap)
            .map_err(|e| os("KVM_GET_DIRTY_LOG", e))?;
        let any = s.bitmap.iter().any(|&w| w != 0);
        if any && mode == KvmDirtyLogMode::ManualProtect {
            let pages = u32::try_from(s.pages).map_err(|_| TrackError::Unavailable {
                tracker: NAME,
                reason: super::Unavailable::SlotTooLarge { slot: s.slot.slot },
            })?;
            kvm_sys::clear_dirty_log(vm, s.slot.slot, 0, pages, &mut s.bitmap)
                .map_err(|e| os("KVM_CLEAR_DIRTY_LOG", e))?;
        }
        Ok(any)
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn name(&self) -> &'static str {
        NAME
    }

    fn caps(&self) -> TrackerCaps {
        TrackerCaps {
            sees_guest_writes: true,
            sees_vmm_writes: false,
            exact: true,
        }
    }

    fn start(&mut self, mem: &GuestMemory) -> Result<(), TrackError> {
        if self.started {
            return Err(TrackError::Order(NAME));
        }
        let mut active = Vec::with_capacity(self.slots.len());
        for &slot in &self.slots {
            let (i, region) = mem
                .regions()
                .iter()
                .enumerate()
                .find(|(_, r)| r.gpa() == slot.gpa)
                .ok_or(TrackError::Unavailable {
                    tracker: NAME,
                    reason: super::Unavailable::NoRegion {
                        slot: slot.slot,
                        gpa: slot.gpa,
                    },
                })?;
            active.push(ActiveSlot {
                slot,
                len: region.len() as u64,
                host: region.host_addr(),
                pages: region.pages(),
                first_index: mem.region_first_page(i),
                bitmap: vec![0; kvm_sys::bitmap_words(region.pages())],
            });
        }
        for s in &mut active {
            kvm_sys::set_slot_flags(
                &self.vm,
                s.slot.slot,
                s.slot.gpa,
                s.len,
                s.host,
                s.slot.base_flags | KVM_MEM_LOG_DIRTY_PAGES,
            )
            .map_err(|e| os("KVM_SET_USER_MEMORY_REGION(LOG_DIRTY_PAGES)", e))?;
            // Discard what the log already holds (INITIALLY_SET marks every page; a VMM
            // may have enabled logging earlier) and arm every page: round 0 sends all
            // memory, so only writes from here on matter.
            Self::fetch(&self.vm, self.mode, s)?;
        }
        self.active = active;
        self.started = true;
        Ok(())
    }

    fn harvest(&mut self, _mem: &GuestMemory, into: &mut PageSet) -> Result<(), TrackError> {
        if !self.started {
            return Err(TrackError::Order(NAME));
        }
        for s in &mut self.active {
            // Re-arm happens inside `fetch` (GET re-protects, or CLEAR with manual
            // protect) before we return, so the caller's copy comes after it.
            if !Self::fetch(&self.vm, self.mode, s)? {
                continue;
            }
            if s.first_index % 64 == 0 {
                let base = (s.first_index / 64) as usize;
                let words = into.words_mut();
                for (k, &w) in s.bitmap.iter().enumerate() {
                    if w != 0 {
                        if let Some(dst) = words.get_mut(base + k) {
                            *dst |= w;
                        }
                    }
                }
            } else {
                for (k, &w) in s.bitmap.iter().enumerate() {
                    let mut w = w;
                    while w != 0 {
                        let bit = w.trailing_zeros() as u64;
                        w &= w - 1;
                        into.insert(s.first_index + k as u64 * 64 + bit);
                    }
                }
            }
        }
        Ok(())
    }

    fn stop(&mut self, _mem: &GuestMemory) -> Result<(), TrackError> {
        if !self.started {
            return Err(TrackError::Order(NAME));
        }
        self.started = false;
        for s in self.active.drain(..) {
            kvm_sys::set_slot_flags(
                &self.vm,
                s.slot.slot,
                s.slot.gpa,
                s.len,
                s.host,
                s.slot.base_flags,
            )
            .map_err(|e| os("KVM_SET_USER_MEMORY_REGION(flags off)", e))?;
        }
        Ok(())
    }
}

//! The few KVM ioctls the dirty-log tracker needs that `kvm-ioctls` 0.25 does not wrap
//! with a caller-provided buffer (or at all): `KVM_GET_DIRTY_LOG` into a reused
//! bitmap, `KVM_CLEAR_DIRTY_LOG`, and re-registering a slot with new flags.
//!
//! Every `unsafe` block of the KVM tracker lives in this file.

use std::os::raw::c_void;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region, KVMIO,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Number of `u64` words KVM's dirty bitmap needs for a slot of `pages` pages.
pub(crate) fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// `KVM_GET_DIRTY_LOG` for `slot` into `bitmap` (one bit per page of the slot).
///
/// In the default mode KVM also write-protects the reported pages again (re-arms);
/// with manual protect enabled it only copies the bitmap, and [`clear_dirty_log`]
/// re-arms.
pub(crate) fn get_dirty_log(
    vm: &VmFd,
    slot: u32,
    slot_pages: u64,
    bitmap: &mut [u64],
) -> std::io::Result<()> {
    if bitmap.len() < bitmap_words(slot_pages) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr() as *mut c_void,
        },
    };
    // SAFETY: `vm` is a KVM VM fd; KVM writes at most one bit per page of the slot
    // (`slot_pages`, rounded up to whole u64 words as KVM does) into `dirty_bitmap`,
    // and `bitmap` was checked above to hold that many words. `log` outlives the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: re-arm (write-protect) the pages whose bits are set in
/// `bitmap`, which covers `num_pages` pages of `slot` from `first_page`. KVM requires
/// `first_page` to be a multiple of 64 and `num_pages` a multiple of 64 unless the range
/// ends at the end of the slot.
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> std::io::Result<()> {
    if bitmap.len() < bitmap_words(u64::from(num_pages)) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr() as *mut c_void,
        },
    };
    // SAFETY: `vm` is a KVM VM fd; KVM reads (and may update) one bit per page in
    // `[first_page, first_page + num_pages)` from `dirty_bitmap`, which holds at least
    // that many bits (checked above) and outlives the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Re-register an existing slot with new `flags` (same gpa, size and host address),
/// e.g. to switch `KVM_MEM_LOG_DIRTY_PAGES` on or off. KVM treats this as a
/// flags-only change and keeps the slot's contents and mappings.
pub(crate) fn set_slot_flags(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    host_addr: *mut u8,
    flags: u32,
) -> std::io::Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: the caller (the tracker) passes the host address and length of a
    // `GuestRegion` that the VMM already registered as this slot, so the mapping is
    // valid for as long as the slot exists (the region's own safety contract); only the
    // flags change, which KVM applies without remapping (`KVM_MR_FLAGS_ONLY`). A
    // mismatching address or size is rejected by KVM with EINVAL, not undefined
    // behaviour.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

//! The bridge to rust-vmm's `vm-memory` (feature `vm-memory`): livemig's
//! [`GuestMemory`] over the very mappings of a [`GuestMemoryMmap`], and back.
//!
//! A VMM built on rust-vmm holds its guest RAM in a `GuestMemoryMmap`. On the source,
//! [`GuestMemory::from_vm_memory`] gives the engine a view of it: one region per
//! `vm-memory` region, at the same guest-physical address, over the same host
//! mapping. Nothing is copied and nothing is remapped; the view holds the
//! `GuestMemoryMmap` (an `Arc`), so the mappings outlive every region built on them.
//! On the destination, the VMM allocates its `GuestMemoryMmap` for the source's
//! layout ([`vm_memory_for_layout`]), hands the view to
//! [`Receiver::memory`](crate::receiver::Receiver::memory), and once the migration has
//! committed takes its memory back with [`GuestMemory::vm_memory`] (or simply keeps
//! its own `Arc`): the pages were applied into its mapping.
//!
//! **Access rule.** The view never hands out `&[u8]` over guest memory the guest may
//! write. Reads of a running guest's pages are copies through raw pointers
//! (`GuestRegion::read_pages`), the same access `vm-memory` itself makes for
//! [`VolatileSlice::copy_to`](vm_memory::VolatileSlice::copy_to) of more than a word
//! (`ptr::copy_nonoverlapping` out of the mapping into a caller buffer), so a torn
//! read is a mix of old and new bytes, never undefined contents; the tracker then
//! reports the page dirty and it is sent again. Writes into destination memory
//! happen before any vCPU runs on it.
//!
//! `vm-memory`'s own dirty bitmap (`B`) is not marked by livemig's writes: the
//! destination's pages are written before the guest exists, and the source's
//! memory is only read.
//!
//! ```
//! use std::sync::Arc;
//! use livemig::GuestMemory;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let vm = Arc::new(
//!     GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
//! );
//! vm.write_slice(b"guest", GuestAddress(0x2000)).unwrap();
//! let memory = GuestMemory::from_vm_memory(vm.clone()).unwrap();
//! let mut page = vec![0u8; livemig::PAGE_SIZE];
//! memory.read_pages(2, &mut page).unwrap(); // the same bytes, not a copy made earlier
//! assert_eq!(&page[..5], b"guest");
//! assert!(Arc::ptr_eq(&memory.vm_memory::<()>().unwrap(), &vm));
//! ```

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use ::vm_memory::bitmap::Bitmap;
use ::vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::{GuestMemory, GuestRegion, MemoryError, MemoryLayout, RegionKind};

/// Why a `vm-memory` guest memory could not be shared with livemig.
#[derive(Debug, thiserror::Error)]
pub enum VmMemoryError {
    /// A region's address or length does not fit livemig's page rules (4 KiB aligned,
    /// not empty), or the regions overlap.
    #[error("vm-memory region at gpa {gpa:#x} cannot be shared: {source}")]
    Region {
        /// The region's guest-physical address.
        gpa: u64,
        /// What livemig's memory model refused.
        source: MemoryError,
    },
    /// The memory has no region.
    #[error("vm-memory guest memory has no region")]
    Empty,
    /// `vm-memory` could not allocate memory for a layout.
    #[error("allocating vm-memory guest memory for the layout: {0}")]
    Allocate(#[from] ::vm_memory::mmap::FromRangesError),
}

/// How a `vm-memory` mapping is backed, in livemig's terms: private anonymous
/// memory reads as zero where never populated, which lets the sender skip it.
fn kind_of<B: Bitmap>(region: &GuestRegionMmap<B>) -> RegionKind {
    let flags = region.flags();
    if region.file_offset().is_some() {
        if flags & libc::MAP_SHARED != 0 {
            RegionKind::Shared
        } else {
            RegionKind::File
        }
    } else if flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_PRIVATE != 0 {
        RegionKind::Anonymous
    } else {
        RegionKind::External
    }
}

impl GuestMemory {
    /// livemig's view of a `vm-memory` guest memory: one region per `vm-memory`
    /// region, same guest-physical addresses, same host mappings (no copy). The view
    /// keeps `vm` alive. See the [module docs](self).
    pub fn from_vm_memory<B>(vm: Arc<GuestMemoryMmap<B>>) -> Result<Self, VmMemoryError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let owner: Arc<dyn Any + Send + Sync> = vm.clone();
        let regions = vm
            .iter()
            .map(|r| {
                let gpa = r.start_addr().0;
                let host = NonNull::new(r.as_ptr()).ok_or(VmMemoryError::Region {
                    gpa,
                    source: MemoryError::NoRegion(gpa >> super::PAGE_SHIFT),
                })?;
                let read_only = r.prot() & libc::PROT_WRITE == 0;
                // SAFETY: `host` is the start of this region's mapping of
                // `r.size()` bytes (readable, and writable unless `read_only`, per
                // its protection). The mapping belongs to `vm`, which `owner` keeps
                // alive as long as the region lives; a `GuestMemoryMmap` is
                // immutable, so its regions are neither unmapped nor remapped
                // while it is alive.
                unsafe {
                    GuestRegion::from_shared(
                        gpa,
                        host,
                        r.size(),
                        read_only,
                        kind_of(r),
                        owner.clone(),
                    )
                }
                .map_err(|source| VmMemoryError::Region { gpa, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if regions.is_empty() {
            return Err(VmMemoryError::Empty);
        }
        GuestMemory::new(regions).map_err(|source| VmMemoryError::Region {
            gpa: match &source {
                MemoryError::Overlap(gpa) => *gpa,
                _ => 0,
            },
            source,
        })
    }

    /// The `vm-memory` guest memory this view was built from by
    /// [`GuestMemory::from_vm_memory`] (the same `Arc`), or `None` for memory that
    /// livemig mapped itself or a bitmap type other than `B`.
    pub fn vm_memory<B>(&self) -> Option<Arc<GuestMemoryMmap<B>>>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let owner = self.regions().first()?.shared_owner()?.clone();
        owner.downcast::<GuestMemoryMmap<B>>().ok()
    }
}

/// A fresh `vm-memory` guest memory (private anonymous mappings) with `layout`'s
/// regions: what a destination VMM allocates for an incoming guest before sharing it
/// with the receiver through [`GuestMemory::from_vm_memory`].
pub fn vm_memory_for_layout(layout: &MemoryLayout) -> Result<GuestMemoryMmap, VmMemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len as usize))
        .collect();
    Ok(GuestMemoryMmap::from_ranges(&ranges)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use ::vm_memory::Bytes;

    fn two_regions() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 4 * PAGE_SIZE),
                (GuestAddress(1 << 30), 8 * PAGE_SIZE),
            ])
            .unwrap(),
        )
    }

    #[test]
    fn same_layout_and_same_pages_both_ways() {
        let vm = two_regions();
        let mem = GuestMemory::from_vm_memory(vm.clone()).unwrap();
        assert_eq!(
            mem.layout().regions,
            vec![(0, 4 * PAGE_SIZE as u64), (1 << 30, 8 * PAGE_SIZE as u64)]
        );
        assert!(mem
            .regions()
            .iter()
            .all(|r| r.kind() == RegionKind::Anonymous));
        // vm-memory writes, livemig reads: gfn 0x40001 is page index 4 + 1.
        vm.write_slice(
            &[0xab; PAGE_SIZE],
            GuestAddress((1 << 30) + PAGE_SIZE as u64),
        )
        .unwrap();
        let idx = mem.index_of_gfn(((1 << 30) >> 12) + 1).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        mem.read_pages(idx, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xab));
        // livemig writes, vm-memory reads.
        mem.write_pages(2, &[0x5a; PAGE_SIZE]).unwrap();
        let mut back = vec![0u8; PAGE_SIZE];
        vm.read_slice(&mut back, GuestAddress(2 * PAGE_SIZE as u64))
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn hands_back_the_same_memory_and_keeps_it_mapped() {
        let vm = two_regions();
        let mem = GuestMemory::from_vm_memory(vm.clone()).unwrap();
        assert!(Arc::ptr_eq(&mem.vm_memory::<()>().unwrap(), &vm));
        // A different bitmap type is not this memory.
        assert!(mem.vm_memory::<Option<()>>().is_none());
        assert!(GuestMemory::anonymous(PAGE_SIZE, false)
            .unwrap()
            .vm_memory::<()>()
            .is_none());
        // The view alone keeps the mappings alive.
        vm.write_slice(&[7; 16], GuestAddress(0)).unwrap();
        drop(vm);
        let mut page = vec![0u8; PAGE_SIZE];
        mem.read_pages(0, &mut page).unwrap();
        assert_eq!(&page[..16], &[7; 16]);
    }

    #[test]
    fn refuses_regions_livemig_cannot_page() {
        let vm = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x800), PAGE_SIZE)]).unwrap(),
        );
        let e = GuestMemory::from_vm_memory(vm).unwrap_err();
        assert!(
            matches!(
                e,
                VmMemoryError::Region {
                    gpa: 0x800,
                    source: MemoryError::Unaligned { .. }
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn destination_for_a_layout() {
        let layout = MemoryLayout {
            regions: vec![(0, 4 * PAGE_SIZE as u64), (1 << 32, 2 * PAGE_SIZE as u64)],
        };
        let vm = Arc::new(vm_memory_for_layout(&layout).unwrap());
        let mem = GuestMemory::from_vm_memory(vm).unwrap();
        assert_eq!(mem.layout(), layout);
    }
}

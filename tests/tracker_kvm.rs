//! The tracker conformance scenarios against KVM's dirty log, with a tiny real guest
//! (`livemig::kvm::guest`) dirtying pages. Skips without `/dev/kvm` (fails instead
//! when `LIVEMIG_CI=1`).
#![cfg(feature = "kvm")]

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig::dirty::{
    DirtyTracker, ExplicitTracker, KvmDirtyLog, KvmDirtyLogMode, KvmSlot, UnionTracker,
};
use livemig::kvm::guest;
use livemig::memory::{DirtyBitmap, GuestMemory, GuestRegion, PageSet};

const MEM: usize = 8 << 20;
const PAGES: u64 = 64;

fn kvm_or_skip() -> Option<Kvm> {
    let ci = std::env::var("LIVEMIG_CI").is_ok_and(|v| v == "1");
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) if ci => panic!("LIVEMIG_CI=1 but /dev/kvm is unusable: {e}"),
        Err(e) => {
            eprintln!("skipping: /dev/kvm is unusable: {e}");
            None
        }
    }
}

// Field order matters: the vCPU and VM fds close before the memory they map is unmapped.
struct TinyVm {
    vcpu: VcpuFd,
    vm: Arc<VmFd>,
    mem: GuestMemory,
}

fn tiny_vm(kvm: &Kvm, manual: bool) -> (TinyVm, KvmDirtyLogMode) {
    let vm = kvm.create_vm().unwrap();
    let mode = if manual {
        KvmDirtyLog::enable_manual_protect(&vm).unwrap()
    } else {
        KvmDirtyLogMode::Plain
    };
    let region = GuestRegion::memfd(0, MEM, "tracker-test").unwrap();
    guest::write_boot_image(&region).unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: region.host_addr() as u64,
    };
    // SAFETY: the region's mapping is owned by `TinyVm::mem`, which is dropped after
    // the VM fd (field order), so the slot never points at unmapped memory.
    unsafe { vm.set_user_memory_region(slot).unwrap() };
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    vcpu.set_sregs(&guest::long_mode_sregs(vcpu.get_sregs().unwrap()))
        .unwrap();
    vcpu.set_regs(&guest::initial_regs(PAGES, 0)).unwrap();
    let mem = GuestMemory::new(vec![region]).unwrap();
    (
        TinyVm {
            vcpu,
            vm: Arc::new(vm),
            mem,
        },
        mode,
    )
}

/// Run until the guest completes one pass; returns the pass number.
fn one_pass(vcpu: &mut VcpuFd) -> u32 {
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(port, data) if port == guest::PORT_PASS => {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        }
        VcpuExit::IoOut(port, data) if port == guest::PORT_STALE => {
            panic!("guest found a stale page: {data:?}")
        }
        other => panic!("unexpected exit {other:?}"),
    }
}

fn workset_indices() -> std::ops::Range<u64> {
    let first = guest::WORKSET_GPA / 4096;
    first..first + PAGES
}

fn slots() -> Vec<KvmSlot> {
    vec![KvmSlot {
        slot: 0,
        gpa: 0,
        base_flags: 0,
    }]
}

fn scenario(manual: bool) {
    let Some(kvm) = kvm_or_skip() else { return };
    let (mut t, mode) = tiny_vm(&kvm, manual);
    if manual && mode != KvmDirtyLogMode::ManualProtect {
        eprintln!("host lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; testing plain mode instead");
    }
    let total = t.mem.total_pages();
    let mut tracker = KvmDirtyLog::new(t.vm.clone(), slots(), mode);
    assert!(tracker.caps().sees_guest_writes && !tracker.caps().sees_vmm_writes);
    let mut set = PageSet::new(total);
    assert!(
        tracker.harvest(&t.mem, &mut set).is_err(),
        "harvest before start must fail"
    );
    tracker.start(&t.mem).unwrap();

    // Nothing written since start: nothing reported.
    tracker.harvest(&t.mem, &mut set).unwrap();
    assert!(set.is_empty(), "clean guest reported {} pages", set.count());

    // 1. Pages written by the guest are reported.
    assert_eq!(one_pass(&mut t.vcpu), 1);
    tracker.harvest(&t.mem, &mut set).unwrap();
    for i in workset_indices() {
        assert!(
            set.contains(i),
            "page {i} written by the guest was not reported"
        );
    }
    // Besides the working set, only the page tables (the CPU sets accessed/dirty bits in
    // them) and the GDT may be reported: the code page is never written.
    assert!(
        !set.contains(guest::CODE_GPA / 4096),
        "the code page is not written by the guest"
    );

    // 2. Re-armed: a second harvest without guest activity is empty.
    let mut again = PageSet::new(total);
    tracker.harvest(&t.mem, &mut again).unwrap();
    assert!(
        again.is_empty(),
        "harvest did not re-arm: {} pages reported twice",
        again.count()
    );

    // 3. A page written after harvest is reported next time (exactly the working set).
    assert_eq!(one_pass(&mut t.vcpu), 2);
    let mut next = PageSet::new(total);
    tracker.harvest(&t.mem, &mut next).unwrap();
    let extra: Vec<u64> = next
        .iter()
        .filter(|i| !workset_indices().contains(i) && !(1..=4).contains(i))
        .collect();
    assert!(
        extra.is_empty(),
        "pages outside the working set and page tables reported: {extra:?}"
    );
    for i in workset_indices() {
        assert!(next.contains(i));
    }

    // 4. KVM does not see the VMM's own writes (hence `UnionTracker` with `ExplicitTracker`).
    t.mem.regions()[0].write_u64(5 * 4096, 7).unwrap();
    let mut vmm = PageSet::new(total);
    tracker.harvest(&t.mem, &mut vmm).unwrap();
    assert!(!vmm.contains(5), "KVM unexpectedly saw a VMM write");

    tracker.stop(&t.mem).unwrap();
    assert!(
        tracker.harvest(&t.mem, &mut vmm).is_err(),
        "harvest after stop must fail"
    );
    // Restartable: start again, guest pass reported again.
    tracker.start(&t.mem).unwrap();
    assert_eq!(one_pass(&mut t.vcpu), 3);
    let mut restarted = PageSet::new(total);
    tracker.harvest(&t.mem, &mut restarted).unwrap();
    for i in workset_indices() {
        assert!(restarted.contains(i), "page {i} not reported after restart");
    }
    tracker.stop(&t.mem).unwrap();
}

#[test]
fn kvm_dirty_log_plain() {
    scenario(false);
}

#[test]
fn kvm_dirty_log_manual_protect() {
    scenario(true);
}

#[test]
fn union_with_explicit_sees_vmm_writes() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (mut t, mode) = tiny_vm(&kvm, false);
    let total = t.mem.total_pages();
    let bitmap = Arc::new(DirtyBitmap::new(total));
    let kvm_log = KvmDirtyLog::new(t.vm.clone(), slots(), mode);
    let mut union = UnionTracker::new(vec![
        Box::new(kvm_log),
        Box::new(ExplicitTracker::new(bitmap.clone())),
    ]);
    union.start(&t.mem).unwrap();
    // A VMM write (marked after the write, as the ExplicitTracker contract says) and a guest pass.
    t.mem.regions()[0].write_u64(5 * 4096, 7).unwrap();
    bitmap.mark(5);
    assert_eq!(one_pass(&mut t.vcpu), 1);
    let mut set = PageSet::new(total);
    union.harvest(&t.mem, &mut set).unwrap();
    assert!(set.contains(5), "VMM write missing from the union");
    for i in workset_indices() {
        assert!(set.contains(i), "guest write {i} missing from the union");
    }
    union.stop(&t.mem).unwrap();
}

/// Two slots whose boundary is not a multiple of 64 pages, with the working set
/// straddling it: the tracker must map each slot's bitmap to the right page indexes.
#[test]
fn two_slots_unaligned_boundary() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = kvm.create_vm().unwrap();
    let split = (guest::WORKSET_GPA + 5 * 4096) as usize; // page 517: 517 % 64 != 0
    let low = GuestRegion::memfd(0, split, "low").unwrap();
    let high = GuestRegion::memfd(split as u64, MEM - split, "high").unwrap();
    guest::write_boot_image(&low).unwrap();
    for (slot, r) in [&low, &high].into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.gpa(),
            memory_size: r.len() as u64,
            userspace_addr: r.host_addr() as u64,
        };
        // SAFETY: both regions are moved into `mem` below, which outlives `vm` and
        // `vcpu` (declared after it, so dropped before it).
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    let mem = GuestMemory::new(vec![low, high]).unwrap();
    vm.create_irq_chip().unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    vcpu.set_sregs(&guest::long_mode_sregs(vcpu.get_sregs().unwrap()))
        .unwrap();
    vcpu.set_regs(&guest::initial_regs(PAGES, 0)).unwrap();
    let vm = Arc::new(vm);
    let slots = vec![
        KvmSlot {
            slot: 0,
            gpa: 0,
            base_flags: 0,
        },
        KvmSlot {
            slot: 1,
            gpa: split as u64,
            base_flags: 0,
        },
    ];
    let mut tracker = KvmDirtyLog::new(vm.clone(), slots, KvmDirtyLogMode::Plain);
    tracker.start(&mem).unwrap();
    assert_eq!(one_pass(&mut vcpu), 1);
    assert_eq!(one_pass(&mut vcpu), 2);
    let mut set = PageSet::new(mem.total_pages());
    tracker.harvest(&mem, &mut set).unwrap();
    for i in workset_indices() {
        assert!(
            set.contains(i),
            "page {i} missing (slot boundary at page 517)"
        );
    }
    let extra: Vec<u64> = set
        .iter()
        .filter(|i| !workset_indices().contains(i) && !(1..=4).contains(i))
        .collect();
    assert!(extra.is_empty(), "misplaced pages: {extra:?}");
    tracker.stop(&mem).unwrap();

    // A slot that matches no region is refused at start.
    let mut wrong = KvmDirtyLog::new(
        vm,
        vec![KvmSlot {
            slot: 0,
            gpa: 4096,
            base_flags: 0,
        }],
        KvmDirtyLogMode::Plain,
    );
    assert!(wrong.start(&mem).is_err());
}

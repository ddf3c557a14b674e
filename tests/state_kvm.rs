//! vCPU and VM state handoff within one process: a tiny guest runs on VM A, its state
//! is saved, encoded, decoded and restored into VM B (mapping the same memory), and
//! the guest goes on there from the next pass without finding a stale page. Also:
//! every truncation or corruption of a real blob is rejected with an error.
//! Skips without `/dev/kvm` (fails instead when `LIVEMIG_CI=1`).
#![cfg(feature = "kvm")]

use std::ptr::NonNull;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig::kvm::{guest, probe_msrs, VcpuState, VmState};
use livemig::memory::GuestRegion;

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

fn vm_on(kvm: &Kvm, host: NonNull<u8>) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host.as_ptr() as u64,
    };
    // SAFETY: `host` is the test's memfd region, which outlives both VMs (it is
    // declared before them in the test and dropped last).
    unsafe { vm.set_user_memory_region(slot).unwrap() };
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    (vm, vcpu)
}

fn pass(vcpu: &mut VcpuFd) -> u32 {
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(port, data) if port == guest::PORT_PASS => {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        }
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn state_moves_between_vms_and_guest_continues() {
    let Some(kvm) = kvm_or_skip() else { return };
    let region = GuestRegion::memfd(0, MEM, "state-test").unwrap();
    guest::write_boot_image(&region).unwrap();
    let host = NonNull::new(region.host_addr()).unwrap();

    let (vm_a, mut a) = vm_on(&kvm, host);
    a.set_sregs(&guest::long_mode_sregs(a.get_sregs().unwrap()))
        .unwrap();
    a.set_regs(&guest::initial_regs(PAGES, 0)).unwrap();
    assert_eq!(pass(&mut a), 1);
    assert_eq!(pass(&mut a), 2);
    // Complete the pending `out` before saving (re-enter with immediate_exit).
    a.set_kvm_immediate_exit(1);
    let _ = a.run();
    a.set_kvm_immediate_exit(0);

    let msrs = probe_msrs(&kvm, &a).unwrap();
    assert!(!msrs.is_empty());
    let mut vm_blob = Vec::new();
    VmState::save(&vm_a).unwrap().encode(&mut vm_blob);
    let mut vcpu_blob = Vec::new();
    VcpuState::save(&a, &msrs).unwrap().encode(&mut vcpu_blob);
    assert!(vcpu_blob.len() > 4096, "xsave alone is 4 KiB");
    drop(a);
    drop(vm_a);

    // Corruption and truncation of real blobs are errors, never panics.
    for cut in (0..vcpu_blob.len()).step_by(97) {
        assert!(
            VcpuState::decode(&vcpu_blob[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    for cut in 0..vm_blob.len() {
        assert!(
            VmState::decode(&vm_blob[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    let mut bad = vcpu_blob.clone();
    bad[..8].copy_from_slice(b"NOTSTATE");
    assert!(VcpuState::decode(&bad).is_err());
    let mut bad = vcpu_blob.clone();
    bad[8] = 2; // format version
    assert!(VcpuState::decode(&bad).is_err());
    let mut bad = vcpu_blob.clone();
    bad[20] ^= 0xff; // first section's length
    assert!(VcpuState::decode(&bad).is_err());

    let (vm_b, mut b) = vm_on(&kvm, host);
    VmState::decode(&vm_blob).unwrap().restore(&vm_b).unwrap();
    VcpuState::decode(&vcpu_blob).unwrap().restore(&b).unwrap();
    // The guest goes on from pass 3 and checks every page on the way.
    for expected in 3..=5 {
        assert_eq!(pass(&mut b), expected);
    }
    let regs = b.get_regs().unwrap();
    assert_eq!(regs.r8, regs.r9 * PAGES);
}

#[test]
fn participants_veto_bad_blobs_and_restore_good_ones() {
    use livemig::device::{RestoreState, SaveState};
    use livemig::kvm::{StateTimings, VcpuRestorer, VcpuSaver, VmRestorer, VmSaver};
    use std::sync::{Arc, Mutex};

    let Some(kvm) = kvm_or_skip() else { return };
    let region = GuestRegion::memfd(0, MEM, "participant-test").unwrap();
    guest::write_boot_image(&region).unwrap();
    let host = NonNull::new(region.host_addr()).unwrap();
    let (vm_a, mut a) = vm_on(&kvm, host);
    a.set_sregs(&guest::long_mode_sregs(a.get_sregs().unwrap()))
        .unwrap();
    a.set_regs(&guest::initial_regs(PAGES, 0)).unwrap();
    assert_eq!(pass(&mut a), 1);
    a.set_kvm_immediate_exit(1);
    let _ = a.run();
    a.set_kvm_immediate_exit(0);
    let msrs = probe_msrs(&kvm, &a).unwrap();
    let timings = Arc::new(StateTimings::default());
    let vm_a = Arc::new(vm_a);
    let mut vm_saver = VmSaver::new(vm_a.clone(), timings.clone());
    let mut vcpu_saver = VcpuSaver::new("vcpu0", Arc::new(Mutex::new(a)), msrs, timings.clone());
    let (mut vm_blob, mut vcpu_blob) = (Vec::new(), Vec::new());
    vm_saver.save(&mut vm_blob).unwrap();
    vcpu_saver.save(&mut vcpu_blob).unwrap();
    assert!(timings.bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);

    let (vm_b, b) = vm_on(&kvm, host);
    let b = Arc::new(Mutex::new(b));
    let mut vm_restorer = VmRestorer::new(Arc::new(vm_b), timings.clone());
    let mut vcpu_restorer = VcpuRestorer::new("vcpu0", b.clone(), timings);
    // Wrong version, garbage, a VM blob given to a vCPU: vetoes, not panics.
    assert!(vcpu_restorer
        .validate_state(vcpu_saver.version() + 1, &vcpu_blob)
        .is_err());
    assert!(vcpu_restorer
        .validate_state(vcpu_saver.version(), b"garbage")
        .is_err());
    assert!(vcpu_restorer
        .validate_state(vcpu_saver.version(), &vm_blob)
        .is_err());
    vcpu_restorer.discard();
    // The good blobs validate, then restore (VM first), and the guest goes on.
    vm_restorer
        .validate_state(vm_saver.version(), &vm_blob)
        .unwrap();
    vcpu_restorer
        .validate_state(vcpu_saver.version(), &vcpu_blob)
        .unwrap();
    vm_restorer.restore(vm_saver.version(), &vm_blob).unwrap();
    vcpu_restorer
        .restore(vcpu_saver.version(), &vcpu_blob)
        .unwrap();
    assert_eq!(pass(&mut b.lock().unwrap()), 2);
}

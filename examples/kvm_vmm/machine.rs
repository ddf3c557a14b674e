//! The machine: a VM, its guest RAM in rust-vmm `vm-memory` registered as KVM slot 0,
//! an in-kernel irqchip and one vCPU; booting the test guest into long mode.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use livemig::dirty::{KvmDirtyLog, KvmDirtyLogMode};
use livemig::kvm::{guest, SharedVcpu};
use livemig::memory::GuestMemory;
use livemig::PAGE_SIZE;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{err, Opts, Res};

/// Planted in xmm7 on the source (through `KVM_SET_XSAVE`), checked on the destination.
const XMM7_MAGIC: [u32; 4] = [0x1234_5678, 0x9abc_def0, 0x0bad_f00d, 0x5eed_1e55];
/// u32 index of xmm7 in the legacy FXSAVE area (byte 160 + 7 * 16).
const XMM7_WORD: usize = (160 + 7 * 16) / 4;
/// u32 index of XSTATE_BV (byte 512 of the xsave area).
const XSTATE_BV_WORD: usize = 512 / 4;

/// One VM. Field order: the vCPU and VM fds are dropped before the memory they map.
pub struct Machine {
    pub vcpu: SharedVcpu,
    pub vm: Arc<VmFd>,
    pub kvm: Kvm,
    pub mode: KvmDirtyLogMode,
    /// The guest RAM as this VMM holds it: rust-vmm `vm-memory`, one region at gpa 0.
    pub ram: Arc<GuestMemoryMmap>,
    /// livemig's view of the same mapping (no copy), for the engine or the receiver.
    pub mem: Arc<GuestMemory>,
}

/// The KVM memory slot of the guest RAM.
pub const SLOT: u32 = 0;

pub fn create_machine(opts: &Opts) -> Res<Machine> {
    let kvm = Kvm::new().map_err(err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
    // Ordering requirement: manual protect must be enabled before the slot exists.
    let mode = if opts.plain_dirty_log {
        KvmDirtyLogMode::Plain
    } else {
        KvmDirtyLog::enable_manual_protect(&vm).map_err(err("enable manual protect"))?
    };
    let bytes = (opts.mem_mib as usize) << 20;
    if guest::WORKSET_GPA + opts.pages * PAGE_SIZE as u64 > bytes as u64 {
        return Err(format!(
            "{} pages do not fit in {} MiB",
            opts.pages, opts.mem_mib
        ));
    }
    let ram = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).map_err(err("guest RAM"))?,
    );
    let host = ram
        .get_host_address(GuestAddress(0))
        .map_err(err("guest RAM host address"))?;
    let slot = kvm_userspace_memory_region {
        slot: SLOT,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: bytes as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping belongs to `Machine::ram` (and is kept alive by
    // `Machine::mem` too), which outlives the VM fd (field order, and the process
    // keeps both Arcs until exit); a `GuestMemoryMmap` never remaps its regions.
    unsafe { vm.set_user_memory_region(slot) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
    let _ = vm.set_tss_address(0xfffb_d000);
    vm.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
    let vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    let mem = Arc::new(GuestMemory::from_vm_memory(ram.clone()).map_err(err("guest memory"))?);
    Ok(Machine {
        vcpu: Arc::new(Mutex::new(vcpu)),
        vm: Arc::new(vm),
        kvm,
        mode,
        ram,
        mem,
    })
}

pub fn boot_guest(m: &Machine, opts: &Opts) -> Res<()> {
    guest::write_boot_image(&m.mem.regions()[0]).map_err(err("boot image"))?;
    let vcpu = m
        .vcpu
        .lock()
        .map_err(|_| "vCPU lock poisoned".to_string())?;
    let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&guest::long_mode_sregs(sregs))
        .map_err(err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&guest::initial_regs(opts.pages, opts.spins))
        .map_err(err("KVM_SET_REGS"))?;
    let mut xsave = vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    xsave.region[XMM7_WORD..XMM7_WORD + 4].copy_from_slice(&XMM7_MAGIC);
    // SSE state valid (else KVM ignores xmm).
    xsave.region[XSTATE_BV_WORD] |= 0b10;
    // SAFETY: a legacy 4 KiB xsave area just read with KVM_GET_XSAVE, two words changed.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    Ok(())
}

pub fn xmm7_ok(m: &Machine) -> Res<bool> {
    let vcpu = m
        .vcpu
        .lock()
        .map_err(|_| "vCPU lock poisoned".to_string())?;
    let xsave = vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    Ok(xsave.region[XMM7_WORD..XMM7_WORD + 4] == XMM7_MAGIC)
}

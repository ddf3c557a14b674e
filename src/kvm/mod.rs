//! KVM vCPU and VM state as device-state participants (feature `kvm`).
//!
//! The source saves each vCPU's architectural state and the VM-wide in-kernel devices
//! (PIC, IOAPIC, kvmclock) while the guest is paused; the destination, which created
//! its VM and vCPUs at setup (before any page moved, so that cost is not downtime),
//! validates every blob and then restores it. State travels in this crate's own
//! versioned format ([`state`]): a header (magic, format version, kind) followed by
//! length-prefixed sections, one per KVM structure.
//!
//! # Ordering requirements
//!
//! Before saving, the guest must be paused, and a pending `KVM_EXIT_IO`/MMIO exit
//! must have been completed by re-entering `KVM_RUN` once with `immediate_exit = 1`
//! (an I/O exit is only finished by the next `KVM_RUN`; saving before that loses the
//! instruction's effect or replays it).
//!
//! Order of participants: the VM-wide state first, then the vCPUs, on **both** sides
//! (the livemig receiver restores in the order the source saved). Restoring the
//! in-kernel irqchip before the vCPUs' LAPICs is the order Firecracker and QEMU use;
//! saving the VM state first is harmless because nothing changes while paused.
//!
//! VM ([`VmState`]): `irqchip` PIC master, PIC slave, IOAPIC, then `clock`. The clock is
//! restored with `flags = 0` (the flags from `GET_CLOCK` describe the source host).
//!
//! Save, per vCPU ([`VcpuState::save`]):
//! 1. `KVM_GET_MP_STATE` **first**: it runs `kvm_apic_accept_events`, which may change
//!    the other registers (a pending INIT/SIPI is folded into the vCPU state);
//! 2. `regs`, `sregs`, `xsave`, `xcrs`, `debugregs`, `lapic`, `tsc_khz`, `cpuid2`;
//! 3. `msrs` (the indices readable on this host, probed once at setup with
//!    [`probe_msrs`], not during the brownout);
//! 4. `vcpu_events` **last**: reading the other state may still queue events.
//!
//! Restore, per vCPU ([`VcpuState::restore`], into a vCPU that has never run):
//! 1. `set_cpuid2` **first**: KVM checks CR4 and XCR0 (sregs, xcrs, xsave) against
//!    the guest CPUID, and derives the LAPIC/MSR behaviour from it;
//! 2. `tsc_khz` (before MSRs so that `IA32_TSC` is scaled with the right rate);
//! 3. `mp_state`, `regs`, `sregs`, `xsave`, `xcrs`, `debugregs`, `lapic`;
//! 4. `msrs` (after `sregs`/`lapic`: EFER and APIC_BASE are validated against them);
//!    `KVM_SET_MSRS` stops at the first refused MSR, so the rest are retried one by one;
//! 5. `vcpu_events` **last**: pending exceptions/interrupts are injected relative to
//!    the restored registers.
//!
//! Register [`participant::VmSaver`] before the [`participant::VcpuSaver`]s on the
//! source; on the destination the order of registration does not matter.

pub mod guest;
pub mod participant;
pub mod state;

pub use participant::{SharedVcpu, StateTimings, VcpuRestorer, VcpuSaver, VmRestorer, VmSaver};
pub use state::{probe_msrs, StateError, VcpuState, VmState, STATE_FORMAT_VERSION};
